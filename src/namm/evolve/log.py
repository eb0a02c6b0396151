"""The per-generation training log of an evolution run (JSONL + CSV) and its training curve."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = [
    "generation", "stage_generation", "fitness_best", "fitness_mean", "fitness_median", "sigma",
    "cache_fraction_mean", "cache_fraction_best", "score_mean", "full_score_mean", "eval_fitness",
    "eval_cache_fraction", "eval_score", "eval_full_score", "eval_improved", "wall_s", "total_wall_s",
]


class TrainingLog:
    """``log.jsonl`` (one JSON object per generation), ``log.csv`` and ``curve.png`` in a run directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.jsonl = self.directory / "log.jsonl"
        self.csv = self.directory / "log.csv"
        self.png = self.directory / "curve.png"

    def rows(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, row: dict) -> None:
        """Add one generation (dropping any logged generation >= it: a run killed after logging
        but before saving its state repeats that generation on resume)."""
        rows = [r for r in self.rows() if r["generation"] < row["generation"]] + [row]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def plot(self, path: str | Path | None = None, title: str | None = None, fitness: str = "task") -> Path:
        """Training curve: fitness of the population (best, mean, median) and of the evaluated
        CMA-ES mean, and the mean cache fraction, per generation. ``fitness`` names the run's
        fitness (``task``: a score ratio, level with the full cache at 1; ``loglik``/``margin``: a
        difference, level at 0), for the axis label and the full-cache line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        members = [r for r in rows if "fitness_best" in r]  # a run's start row (generation 0) has none
        gens = [r["generation"] for r in members]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
        for key, label in [("fitness_best", "best member"), ("fitness_median", "median member"),
                           ("fitness_mean", "population mean")]:
            top.plot(gens, [r[key] for r in members], label=label)
        evals = [r for r in rows if r.get("eval_fitness") is not None]
        if evals:
            top.plot([r["generation"] for r in evals], [r["eval_fitness"] for r in evals], "ko-",
                     label="CMA-ES mean (all training prompts)")
        ratio = fitness == "task"
        top.axhline(1.0 if ratio else 0.0, color="grey", lw=0.8, ls="--")
        measure = "score / full-cache score" if ratio else f"{fitness} minus full cache's"
        top.set_ylabel(f"fitness: {measure}\n(minus memory penalty, if any)")
        top.legend(fontsize=8)
        top.set_title(title or "NAMM evolution")
        bottom.plot(gens, [r["cache_fraction_mean"] for r in members], label="population mean")
        if evals:
            bottom.plot([r["generation"] for r in evals], [r["eval_cache_fraction"] for r in evals], "ko-",
                        label="CMA-ES mean")
        bottom.set_ylabel("cache fraction")
        bottom.set_xlabel("generation")
        bottom.legend(fontsize=8)
        fig.tight_layout()
        out = Path(path) if path else self.png
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out
