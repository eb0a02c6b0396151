"""Run a memory policy over benchmark samples and record predictions, scores, memory and speed.

Results go to an output folder that doubles as a resume point:

* ``config.json``: what was run (task, policy, model, options).
* ``predictions.jsonl``: one row per finished sample (with a digest of the sample), appended and
  flushed as soon as its batch finishes, so an interrupted run loses at most the batch in flight.
  A rerun skips finished samples, so asking for more samples later only runs the new ones.
* ``metrics.json``: the aggregate (score 0-100 with a bootstrap 95% interval, cache fraction, KV
  fraction after compressions and at peak, KV bytes, tokens/s, wall time), the policy's
  compression schedule and the protocol: ``query-aware`` (the whole prompt is read before any
  compression) or ``query-agnostic`` (the context is compressed before the question is seen,
  kvpress's convention).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import IO, Iterable

from tqdm.auto import tqdm

from namm.eval.intervals import bootstrap_interval
from namm.memory.generation import GenerationOutput, generate, generate_shared
from namm.policies.base import MemoryPolicy
from namm.tasks.base import Sample
from namm.tasks.longbench import read_jsonl
from namm.tasks.metrics import get_metric, score_sample

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
CONFIG = "config.json"
QUERY_AWARE, QUERY_AGNOSTIC = "query-aware", "query-agnostic"


def sample_digest(sample: Sample) -> str:
    """A short hash of everything that defines one sample (prompt, answers, metric, limits)."""
    return hashlib.sha256(json.dumps(sample.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def samples_digest(samples: list[Sample]) -> str:
    """A short hash of a list of samples, in order."""
    return hashlib.sha256("".join(sample_digest(s) for s in samples).encode("ascii")).hexdigest()[:16]


def policy_label(policy: MemoryPolicy) -> dict:
    """Name and options of a policy, for config.json, with its compression schedule when it evicts."""
    label = {"policy": policy.name}
    for key in ("budget", "n_up", "threshold", "checkpoint", "extra_tokens"):
        value = getattr(policy, key, None)
        if value is not None:
            label[key] = value if isinstance(value, (int, float, str)) else repr(value)
    if policy.evicts:
        label["schedule"] = policy.schedule
    return label


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a crash never leaves a half-written file)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_predictions(path: Path) -> dict[str, dict]:
    """Finished rows by sample id. A torn last line (a crash mid-write) is ignored, so that sample
    simply reruns; any other malformed line is an error naming its line number."""
    if not path.exists():
        return {}
    rows = read_jsonl(path, ("id",), torn_tail_ok=True)
    for row in rows:
        del row["_line"]
    return {str(row["id"]): row for row in rows}


def _check_config(out: Path, config: dict) -> None:
    file = out / CONFIG
    if file.exists():
        try:
            old = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ValueError(f"{file} is not valid JSON; delete it or choose another output folder") from None
        keys = ("task", "model", "policy_config", "protocol")
        diff = [k for k in keys if old.get(k) != config.get(k)]
        if diff:
            raise ValueError(f"{out} holds results of a different run (differs in: {', '.join(diff)}); "
                             "choose another output folder or delete it")
    write_json(file, config)


def _truncate_file(path: Path) -> None:
    """Drop a torn last line so appended rows start on a fresh line."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def _batches(samples: list[Sample], size: int) -> Iterable[list[Sample]]:
    """Consecutive groups of at most ``size`` samples that share ``max_new_tokens``."""
    batch: list[Sample] = []
    for s in samples:
        if batch and (len(batch) == size or s.max_new_tokens != batch[0].max_new_tokens):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def compressed_fraction(out: GenerationOutput, extra_bytes: int = 0) -> float:
    """Mean (KV bytes + ``extra_bytes``) / full-cache KV bytes right after each compression of one
    generation (without extra bytes: the quantity a budget bounds); the fraction held at the end
    when nothing was compressed."""
    if not out.history:
        return (out.kv_bytes + extra_bytes) / out.kv_bytes_full
    return sum((h.kv_bytes + extra_bytes) / h.kv_bytes_full for h in out.history) / len(out.history)


def _run_batch(model, tokenizer, policies: list[MemoryPolicy], batch: list[Sample], agnostic: bool) -> list[list[dict]]:
    """The prediction rows of one batch for each policy (several policies share one prefill)."""
    prompts = [s.context for s in batch] if agnostic else [s.prompt for s in batch]
    options = dict(record_history=True, max_new_tokens=batch[0].max_new_tokens,
                   question=[s.question for s in batch] if agnostic else None)
    if len(policies) == 1:
        start = time.perf_counter()
        outs = generate(model, tokenizer, prompts, policy=policies[0], **options)
        return [_prediction_rows(batch, outs, time.perf_counter() - start)]
    shared = generate_shared(model, tokenizer, prompts, policies, **options)
    runs = [_prediction_rows(batch, outs, outs[0].prefill_seconds + outs[0].decode_seconds) for outs in shared]
    for rows in runs:
        for row in rows:
            row["prefill_shared_by"] = len(policies)  # its prefill_s and wall_s count the whole shared prefill
    return runs


def _prediction_rows(batch: list[Sample], outs: list[GenerationOutput], wall: float) -> list[dict]:
    """predictions.jsonl rows of a batch's outputs; ``wall``: the batch's seconds, shared by its rows."""
    prompt_total = sum(o.prompt_tokens for o in outs) or 1
    new_total = sum(len(o.token_ids) for o in outs) or 1
    rows = []
    for s, o in zip(batch, outs):
        share = o.prompt_tokens / prompt_total
        rows.append({
            "id": s.id, "sample_digest": sample_digest(s), "prediction": o.text, "answers": s.answers,
            "score": score_sample(s, o.text),
            "metric": s.metric, "prompt_tokens": o.prompt_tokens, "new_tokens": len(o.token_ids),
            "cache_fraction": o.cache_fraction, "cache_tokens_per_layer": o.cache_tokens_per_layer,
            "kv_bytes_peak": o.kv_bytes_peak, "kv_bytes_full_peak": o.kv_bytes_full_peak,
            "kv_fraction": compressed_fraction(o), "kv_fraction_peak": o.kv_bytes_peak / o.kv_bytes_full_peak,
            "less_state_bytes": o.less_state_bytes, "memory_fraction": compressed_fraction(o, o.less_state_bytes),
            "memory_fraction_peak": (o.kv_bytes_peak + o.less_state_bytes) / o.kv_bytes_full_peak,
            "prefill_s": o.prefill_seconds * share, "decode_s": o.decode_seconds * len(o.token_ids) / new_total,
            "wall_s": wall * share,
        })
    return rows


def aggregate(rows: list[dict]) -> dict:
    """The metrics.json numbers of a list of prediction rows: ``score_ci`` is the bootstrap 95%
    interval of the score; ``kv_fraction`` the mean over samples of :func:`compressed_fraction`
    (the memory a budget sets), ``kv_fraction_peak`` the largest peak KV bytes / full-cache KV
    bytes (at the end) of any sample; ``less_state_bytes`` the largest LESS state of a sample and
    ``memory_fraction`` / ``memory_fraction_peak`` the same fractions with it counted (rows
    written before LESS state was recorded count none)."""
    n = len(rows)
    if n == 0:
        raise ValueError("no finished samples to aggregate")
    prefill_s = sum(r["prefill_s"] for r in rows)
    decode_s = sum(r["decode_s"] for r in rows)
    return {
        "n": n,
        "score": 100.0 * sum(r["score"] for r in rows) / n,
        "score_ci": bootstrap_interval([[100.0 * r["score"] for r in rows]]),
        "cache_fraction": sum(r["cache_fraction"] for r in rows) / n,
        "kv_fraction": sum(r["kv_fraction"] for r in rows) / n,
        "kv_fraction_peak": max(r["kv_fraction_peak"] for r in rows),
        "less_state_bytes": max(r.get("less_state_bytes", 0) for r in rows),
        "memory_fraction": sum(r.get("memory_fraction", r["kv_fraction"]) for r in rows) / n,
        "memory_fraction_peak": max(r.get("memory_fraction_peak", r["kv_fraction_peak"]) for r in rows),
        "kv_bytes_peak": max(r["kv_bytes_peak"] for r in rows),
        "kv_bytes_full_peak": max(r["kv_bytes_full_peak"] for r in rows),
        "kv_bytes_peak_mean": sum(r["kv_bytes_peak"] for r in rows) / n,
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / n,
        "prefill_tokens_per_s": sum(r["prompt_tokens"] for r in rows) / prefill_s if prefill_s else 0.0,
        "decode_tokens_per_s": sum(r["new_tokens"] for r in rows) / decode_s if decode_s else 0.0,
        "wall_s": sum(r["wall_s"] for r in rows),
    }


def evaluate(model, tokenizer, policy: MemoryPolicy, samples: list[Sample], out_dir: str | Path | None = None,
             batch_size: int = 1, progress: bool = True, task: str | None = None, model_name: str | None = None,
             extra: dict | None = None, question_after_compression: bool = False) -> dict:
    """Answer every sample with ``policy`` and return the metrics.json dict.

    ``question_after_compression`` runs the query-agnostic protocol (see :func:`namm.generate`'s
    ``question``): every sample must carry its question apart.

    With ``out_dir``, writes config.json, predictions.jsonl (row by row) and metrics.json there,
    and skips samples already in predictions.jsonl (resume). ``task`` and ``model_name`` label the
    results (default: from the sample ids and the model config); ``extra`` is merged into
    metrics.json and config.json (e.g. the budget as the user wrote it).
    """
    return evaluate_shared(model, tokenizer, [policy], samples, [out_dir], batch_size, progress, task, model_name,
                           [extra], question_after_compression)[0]


def evaluate_shared(model, tokenizer, policies: list[MemoryPolicy], samples: list[Sample],
                    out_dirs: list[str | Path | None], batch_size: int = 1, progress: bool = True,
                    task: str | None = None, model_name: str | None = None, extras: list[dict | None] | None = None,
                    question_after_compression: bool = False) -> list[dict]:
    """:func:`evaluate` for several policies at once, each into its own ``out_dirs`` entry (with
    its ``extras`` entry), every batch prefilled once for all of them
    (:func:`~namm.memory.generation.generate_shared`: the policies must compress only after the
    prompt). Each run's answers and memory are what :func:`evaluate` gives it alone; its timings
    count the whole shared prefill. A batch runs for the policies that still lack one of its samples."""
    if not samples:
        raise ValueError("no samples to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    extras = extras or [None] * len(policies)
    if not (len(policies) == len(out_dirs) == len(extras)) or not policies:
        raise ValueError("give one output folder and one extra per policy")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique")
    for s in samples:
        get_metric(s.metric)
        if question_after_compression and s.question is None:
            raise ValueError(f"sample {s.id} carries no separate question, which --question-after-compression "
                             "needs (its template has no question part after the context)")
    protocol = QUERY_AGNOSTIC if question_after_compression else QUERY_AWARE
    task = task or samples[0].id.rsplit("-", 3)[0]
    model_name = model_name or str(getattr(model.config, "_name_or_path", "model"))
    runs = [_Run.open(policy, out_dir, samples, task, model_name, protocol, extra or {})
            for policy, out_dir, extra in zip(policies, out_dirs, extras)]
    pending = [s for s in samples if any(s.id not in run.done for run in runs)]
    names = ", ".join(dict.fromkeys(run.label["policy"] for run in runs))
    bar = tqdm(total=len(samples), initial=len(samples) - len(pending), desc=f"{task} · {names}", unit="sample",
               disable=not progress)
    try:
        for batch in _batches(pending, batch_size):
            needing = [i for i, run in enumerate(runs) if any(s.id not in run.done for s in batch)]
            answers = _run_batch(model, tokenizer, [policies[i] for i in needing], batch, question_after_compression)
            for i, rows in zip(needing, answers):
                runs[i].record(rows)
            bar.update(len(batch))
            if len(runs) == 1:
                bar.set_postfix(score=f"{aggregate([runs[0].done[i] for i in ids if i in runs[0].done])['score']:.1f}")
    finally:
        bar.close()
        for run in runs:
            run.close()
    return [run.finish(ids) for run in runs]


@dataclass
class _Run:
    """One policy's results during an evaluation: its finished rows and its output folder."""

    label: dict
    config: dict
    extra: dict
    done: dict[str, dict]
    out: Path | None
    handle: IO[str] | None

    @classmethod
    def open(cls, policy: MemoryPolicy, out_dir: str | Path | None, samples: list[Sample], task: str,
             model_name: str, protocol: str, extra: dict) -> "_Run":
        """Check (or write) the folder's config.json and read the rows already answered there."""
        label = policy_label(policy)
        config = {"task": task, "model": model_name, "policy": label["policy"], "policy_config": label,
                  "protocol": protocol, "n": len(samples), **extra}
        if out_dir is None:
            return cls(label, config, extra, {}, None, None)
        from namm.commands.common import writable_dir

        out = writable_dir(str(out_dir))
        _check_config(out, config)
        done = read_predictions(out / PREDICTIONS)
        _truncate_file(out / PREDICTIONS)
        for sample in samples:
            if sample.id in done and done[sample.id].get("sample_digest") != sample_digest(sample):
                raise ValueError(f"{out}: sample {sample.id} differs from the one already answered there; "
                                 "choose another output folder or delete it")
        return cls(label, config, extra, done, out, (out / PREDICTIONS).open("a", encoding="utf-8"))

    def record(self, rows: list[dict]) -> None:
        """Keep the rows of samples not answered yet, appended to predictions.jsonl and synced."""
        for row in rows:
            if row["id"] in self.done:
                continue
            self.done[row["id"]] = row
            if self.handle is not None:
                self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def finish(self, ids: list[str]) -> dict:
        """The metrics.json dict of the finished run (written to its folder)."""
        config = self.config
        metrics = {"task": config["task"], "policy": self.label["policy"], "schedule": self.label.get("schedule"),
                   "protocol": config["protocol"], "model": config["model"],
                   **aggregate([self.done[i] for i in ids]), "policy_config": self.label, **self.extra}
        if self.out is not None:
            write_json(self.out / METRICS, metrics)
        return metrics
