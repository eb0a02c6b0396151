"""Full-cache reference scores (cached once per model and sample set), bootstrap intervals and
comparison tables."""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from namm.eval.intervals import bootstrap_interval
from namm.eval.runner import METRICS, PREDICTIONS, evaluate, samples_digest
from namm.policies.registry import make_policy
from namm.tasks.base import Sample


def reference_dir(model_name: str, model, samples: list[Sample]) -> Path:
    """Where the full-cache results for these samples on this model live (under the namm cache).
    The model's dtype and device type are part of the key: a bfloat16 or GPU run answers
    differently from a float32 CPU run, so neither serves as the other's reference."""
    from namm.models import cache_dir

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_")[-60:] or "model"
    if Path(model_name).exists():  # a local folder or .gguf file: replacing it must not reuse the old answers
        slug += f"-{local_model_fingerprint(Path(model_name))}"
    variant = f"{str(model.dtype).removeprefix('torch.')}-{model.device.type}"
    return cache_dir() / "references" / f"{slug}-{variant}-{samples_digest(samples)}"


def local_model_fingerprint(path: Path) -> str:
    """A short digest of a local model's files (a folder's files, or the one file): names, sizes,
    modification times."""
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    listing = "\n".join(f"{f.name}:{st.st_size}:{st.st_mtime_ns}" for f in files for st in [f.stat()])
    return hashlib.sha256(listing.encode()).hexdigest()[:8]


def cached_reference(model_name: str, model, samples: list[Sample]) -> dict | None:
    """The full-cache metrics for these samples if they were computed before, else None."""
    file = reference_dir(model_name, model, samples) / METRICS
    if not file.is_file():
        return None
    metrics = json.loads(file.read_text(encoding="utf-8"))
    return metrics if metrics.get("n") == len(samples) else None


@contextmanager
def _reference_held(target: Path) -> Iterator[None]:
    """Hold ``target`` (a reference folder) for this process: a second command that needs the same
    reference waits here and then reads it, instead of computing it again beside the first."""
    target.mkdir(parents=True, exist_ok=True)
    with open(target / ".lock", "a", encoding="utf-8") as handle:  # closing the file releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def store_reference(model_name: str, model, samples: list[Sample], run_dir: Path) -> None:
    """Keep a finished full-cache run as the reference for these samples (no recomputation later)."""
    target = reference_dir(model_name, model, samples)
    with _reference_held(target):
        if cached_reference(model_name, model, samples) is None:
            for name in (PREDICTIONS, METRICS):
                shutil.copyfile(run_dir / name, target / name)


def reference_metrics(model, tokenizer, samples: list[Sample], model_name: str, task: str,
                      batch_size: int = 1, progress: bool = True) -> dict:
    """The full-cache metrics for these samples: from the cache, or computed once and cached."""
    target = reference_dir(model_name, model, samples)
    with _reference_held(target):
        found = cached_reference(model_name, model, samples)
        if found is not None:
            return found
        return evaluate(model, tokenizer, make_policy("full"), samples, out_dir=target, batch_size=batch_size,
                        progress=progress, task=task, model_name=model_name)


def normalized_score(score: float, reference: float) -> float | None:
    """Score as a percentage of the full-cache score (None when the reference scored 0)."""
    return 100.0 * score / reference if reference > 0 else None


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _budget_cell(row: dict) -> str:
    matched = row.get("matched_to")
    if matched:
        return f"{row['budget']} (matched to {matched})" if row.get("budget") else f"matched to {matched}"
    return str(row.get("budget") or "–")


def _score_cell(row: dict) -> str:
    ci = row.get("score_ci")
    return _fmt(row["score"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def markdown_table(rows: list[dict]) -> str:
    """A markdown table of comparison rows (task, policy, budget, schedule, protocol, n, score with
    its 95% interval, normalized_score, kv_fraction, kv_fraction_peak, memory_fraction (KV + LESS
    state), kv_bytes_peak_mean, prefill/decode tokens per second)."""
    header = ("| task | policy | budget | schedule | protocol | n | score [95% CI] | normalised | KV fraction "
              "| KV fraction peak | KV + LESS fraction | KV MiB peak | prefill tok/s | decode tok/s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['policy']} | {_budget_cell(r)} | {r.get('schedule') or '–'} "
            f"| {r.get('protocol') or '–'} | {r['n']} | {_score_cell(r)} | {_fmt(r.get('normalized_score'))} "
            f"| {_fmt(r['kv_fraction'], 3)} | {_fmt(r['kv_fraction_peak'], 3)} "
            f"| {_fmt(r.get('memory_fraction', r['kv_fraction']), 3)} | {_fmt(r['kv_bytes_peak_mean'] / 2**20, 1)} | {_fmt(r['prefill_tokens_per_s'], 0)} "
            f"| {_fmt(r['decode_tokens_per_s'], 1)} |")
    return "\n".join(lines)


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per (policy, budget, schedule, protocol) averaging score, normalised score, cache
    and KV fractions, KV bytes and speed over tasks (task = 'mean'; rows matched to a policy's
    memory group by that policy, whatever their per-task budget). With every row's
    ``sample_scores`` (0-100), the score gets a bootstrap interval resampling each task on its own."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        budget = None if r.get("matched_to") else r.get("budget")
        groups.setdefault((r["policy"], budget, r.get("matched_to"), r.get("schedule"), r.get("protocol")),
                          []).append(r)
    out = []
    for (policy, budget, matched_to, schedule, protocol), rs in groups.items():
        norms = [r["normalized_score"] for r in rs if r.get("normalized_score") is not None]
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        scored = all(r.get("sample_scores") for r in rs)
        out.append({
            "task": "mean", "policy": policy, "budget": budget, "matched_to": matched_to, "schedule": schedule,
            "protocol": protocol, "n": sum(r["n"] for r in rs), "score": mean("score"),
            "score_ci": bootstrap_interval([r["sample_scores"] for r in rs]) if scored else None,
            "normalized_score": sum(norms) / len(norms) if norms else None,
            "cache_fraction": mean("cache_fraction"), "kv_fraction": mean("kv_fraction"),
            "memory_fraction": sum(r.get("memory_fraction", r["kv_fraction"]) for r in rs) / len(rs),
            "kv_fraction_peak": max(r["kv_fraction_peak"] for r in rs),
            "kv_bytes_peak_mean": mean("kv_bytes_peak_mean"),
            "prefill_tokens_per_s": mean("prefill_tokens_per_s"), "decode_tokens_per_s": mean("decode_tokens_per_s"),
        })
    return out
