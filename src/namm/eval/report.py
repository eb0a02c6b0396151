"""Full-cache reference scores (cached once per model and sample set) and comparison tables."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from namm.eval.runner import METRICS, PREDICTIONS, evaluate, samples_digest
from namm.policies.base import make_policy
from namm.tasks.base import Sample


def reference_dir(model_name: str, samples: list[Sample]) -> Path:
    """Where the full-cache results for these samples on this model live (under the namm cache)."""
    from namm.models import cache_dir

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_")[-60:] or "model"
    return cache_dir() / "references" / f"{slug}-{samples_digest(samples)}"


def cached_reference(model_name: str, samples: list[Sample]) -> dict | None:
    """The full-cache metrics for these samples if they were computed before, else None."""
    file = reference_dir(model_name, samples) / METRICS
    if not file.is_file():
        return None
    metrics = json.loads(file.read_text(encoding="utf-8"))
    return metrics if metrics.get("n") == len(samples) else None


def store_reference(model_name: str, samples: list[Sample], run_dir: Path) -> None:
    """Keep a finished full-cache run as the reference for these samples (no recomputation later)."""
    target = reference_dir(model_name, samples)
    if cached_reference(model_name, samples) is None:
        target.mkdir(parents=True, exist_ok=True)
        for name in (PREDICTIONS, METRICS):
            shutil.copyfile(run_dir / name, target / name)


def reference_metrics(model, tokenizer, samples: list[Sample], model_name: str, task: str,
                      batch_size: int = 1, progress: bool = True) -> dict:
    """The full-cache metrics for these samples: from the cache, or computed once and cached."""
    found = cached_reference(model_name, samples)
    if found is not None:
        return found
    return evaluate(model, tokenizer, make_policy("full"), samples, out_dir=reference_dir(model_name, samples),
                    batch_size=batch_size, progress=progress, task=task, model_name=model_name)


def normalized_score(score: float, reference: float) -> float | None:
    """Score as a percentage of the full-cache score (None when the reference scored 0)."""
    return 100.0 * score / reference if reference > 0 else None


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """A markdown table of comparison rows (task, policy, budget, schedule, n, score,
    normalized_score, cache_fraction, kv_bytes_peak_mean, prefill/decode tokens per second)."""
    header = ("| task | policy | budget | schedule | n | score | normalised | cache fraction | KV MiB (peak, mean) "
              "| prefill tok/s | decode tok/s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['policy']} | {r.get('budget') or '–'} | {r.get('schedule') or '–'} | {r['n']} "
            f"| {_fmt(r['score'])} "
            f"| {_fmt(r.get('normalized_score'))} | {_fmt(r['cache_fraction'], 3)} "
            f"| {_fmt(r['kv_bytes_peak_mean'] / 2**20, 1)} | {_fmt(r['prefill_tokens_per_s'], 0)} "
            f"| {_fmt(r['decode_tokens_per_s'], 1)} |")
    return "\n".join(lines)


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per (policy, budget, schedule) averaging score, normalised score, cache fraction,
    KV bytes and speed over tasks (task = 'mean')."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r.get("budget"), r.get("schedule")), []).append(r)
    out = []
    for (policy, budget, schedule), rs in groups.items():
        norms = [r["normalized_score"] for r in rs if r.get("normalized_score") is not None]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        out.append({
            "task": "mean", "policy": policy, "budget": budget, "schedule": schedule, "n": sum(r["n"] for r in rs),
            "score": mean("score"), "normalized_score": sum(norms) / len(norms) if norms else None,
            "cache_fraction": mean("cache_fraction"), "kv_bytes_peak_mean": mean("kv_bytes_peak_mean"),
            "prefill_tokens_per_s": mean("prefill_tokens_per_s"), "decode_tokens_per_s": mean("decode_tokens_per_s"),
        })
    return out
