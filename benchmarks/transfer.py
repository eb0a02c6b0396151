"""Zero-shot transfer: one NAMM evolved on one model, run unchanged on other model families.

    python benchmarks/transfer.py [--checkpoint smollm2-135m] [--models gemma3-270m,qwen2.5-coder-0.5b] \\
        [--lengths 2048,4096] [--tasks niah_single,passkey,multidoc_qa] [--samples 32] [--seed 100] \\
        [--baselines recency,streaming,h2o,l2,tova,random] [--out docs/results/transfer]

For every model and length it runs (or resumes: rerun the same command) one ``namm compare`` with
the full cache, the NAMM and every baseline at the NAMM's measured mean KV fraction per task
(``--match-cache namm``), so every row is at equal memory. The NAMM keeps its source model's
normalisation statistics, and sliding-window layers hold nothing older than their window
(docs/algorithm.md §6, §11). Then it writes ``OUT/README.md`` (one table, scores with bootstrap
95% intervals) and ``OUT/summary.json`` from every run under ``OUT``, this invocation's and earlier
ones', so a grid filled in pieces ends in one table; each run's own tables are in
``OUT/<model>/L<length>/`` and keep the tasks of earlier commands at that model and length.
Transfer is a measurement: nothing here is tuned on the target models.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from namm.eval.intervals import format_difference, paired_difference

BASELINES = "recency,streaming,h2o,l2,tova,random"


def compare(out: Path, model: str, length: int, args: argparse.Namespace) -> None:
    """Run (or resume) one ``namm compare`` into ``out``."""
    tasks = tasks_with_earlier(out, args.tasks)
    command = [sys.executable, "-m", "namm", "compare", "--model", model, "--policies",
               f"full,namm,{args.baselines}", "--match-cache", "namm", "--checkpoint", args.checkpoint,
               "--tasks", tasks, "--length", str(length), "--samples", str(args.samples), "--seed", str(args.seed),
               "--batch-size", str(args.batch_size), "--quiet", "--out", str(out),
               *(["--threads", str(args.threads)] if args.threads else [])]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def tasks_with_earlier(run: Path, requested: str) -> str:
    """The tasks of an earlier run in ``run``, then the requested ones: ``namm compare`` writes its
    tables from the tasks it is given, so a later command over other tasks keeps the earlier rows
    (their runs are complete and resume without recomputing)."""
    results = run / "results.json"
    earlier = [r["task"] for r in run_rows(results)] if results.exists() else []
    return ",".join(dict.fromkeys([*earlier, *(t for t in requested.split(",") if t)]))


def run_rows(results: Path) -> list[dict]:
    """The per-(task, policy) rows of one ``namm compare`` run's ``results.json``."""
    return json.loads(results.read_text())["rows"]


def run_dir(out: Path, model: str, length: int) -> Path:
    """Where the run of one model (a shipped name or a path) and length lives under ``out``."""
    return out / Path(model).name / f"L{length}"


def collected_rows(out: Path) -> list[dict]:
    """Per-task rows of every run under ``out``, tagged with their model and length."""
    rows = []
    for results in sorted(out.glob("*/L*/results.json")):
        model, length = results.parent.parent.name, int(results.parent.name.removeprefix("L"))
        rows += [{**r, "model": model, "length": length} for r in run_rows(results)]
    return rows


def baseline_columns(rows: list[dict], requested: list[str]) -> list[str]:
    """The requested baselines, then any other baseline found in earlier runs."""
    found = {r["policy"] for r in rows} - {"full", "namm"}
    return requested + sorted(found - set(requested))


def cell(row: dict | None) -> str:
    if row is None:
        return "–"
    low, high = row["score_ci"]
    return f"{row['score']:.1f} [{low:.1f}, {high:.1f}]"


def minus(namm: dict, row: dict | None) -> str:
    """NAMM minus a baseline, paired over the same prompts, with its bootstrap interval."""
    if row is None:
        return "–"
    return format_difference(*paired_difference(namm["sample_scores"], row["sample_scores"]))


def table(rows: list[dict], baselines: list[str], args: argparse.Namespace, argv: list[str]) -> str:
    """The transfer table: per (model, length, task) the full cache, the NAMM and every baseline."""
    head = ["model", "length", "task", "n", "full", "NAMM", "NAMM KV", *baselines, "NAMM above all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    paired_head = ["model", "length", "task", *(f"− {b}" for b in baselines)]
    paired = ["| " + " | ".join(paired_head) + " |", "|" + "---|" * len(paired_head)]
    keys = sorted({(r["model"], r["length"], r["task"]) for r in rows})
    for model, length, task in keys:
        by = {r["policy"]: r for r in rows if (r["model"], r["length"], r["task"]) == (model, length, task)}
        namm = by.get("namm")
        if namm is None:
            continue
        ran = [b for b in baselines if b in by]
        above = bool(ran) and all(namm["score"] > by[b]["score"] for b in ran)
        lines.append("| " + " | ".join([model, str(length), task, str(namm["n"]), cell(by.get("full")), cell(namm),
                                         f"{namm['kv_fraction']:.3f}", *(cell(by.get(b)) for b in baselines),
                                         "yes" if above else "no"]) + " |")
        paired.append("| " + " | ".join([model, str(length), task, *(minus(namm, by.get(b)) for b in baselines)]) + " |")
    return "\n".join([
        "# Zero-shot transfer of a NAMM to other model families",
        "",
        f"NAMM checkpoint `{args.checkpoint}` (its provenance names the model it was evolved on), run unchanged. "
        f"Every run under `{args.out}` (this command's and earlier ones'); prompts of seed {args.seed}, query-aware; "
        "n samples per task and length. Every baseline runs at the NAMM's measured mean KV fraction on that task "
        "(NAMM KV: KV bytes held after each compression over the full cache's). Scores 0-100 with a bootstrap 95% "
        "interval over samples; – = not run; NAMM above all = above every baseline run on that row.",
        "",
        f"Reproduce: `python benchmarks/transfer.py {' '.join(argv)}`",
        "",
        *lines,
        "",
        "NAMM minus each baseline on the same prompts (points of score, paired bootstrap 95% interval):",
        "",
        *paired,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="smollm2-135m", help="NAMM checkpoint (shipped name or path)")
    p.add_argument("--models", default="gemma3-270m,qwen2.5-coder-0.5b",
                   help="comma-separated target models the NAMM runs on (default: %(default)s)")
    p.add_argument("--lengths", default="2048,4096",
                   help="comma-separated prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--tasks", default="niah_single,passkey,multidoc_qa",
                   help="comma-separated offline tasks (default: %(default)s)")
    p.add_argument("--baselines", default=BASELINES,
                   help="comma-separated baselines, each run at the NAMM's measured KV fraction (default: %(default)s)")
    p.add_argument("--samples", type=int, default=32, help="prompts per task and length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=100,
                   help="seed of the evaluation prompts; keep it apart from training seeds (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts decoded together (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("docs/results/transfer"),
                   help="folder of the runs, README.md and summary.json; rerunning resumes (default: %(default)s)")
    args = p.parse_args(argv)
    for model in [m for m in args.models.split(",") if m]:
        for length in [int(x) for x in args.lengths.split(",")]:
            compare(run_dir(args.out, model, length), model, length, args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = collected_rows(args.out)
    baselines = baseline_columns(rows, [b for b in args.baselines.split(",") if b])
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows, baselines, args, sys.argv[1:] if argv is None else argv)
    (args.out / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
