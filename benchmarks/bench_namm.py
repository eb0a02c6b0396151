"""NAMM prefill cost on the embedded model, as ratios against the full cache measured in one run.

    python benchmarks/bench_namm.py [--short 4096] [--long 8000] [--repeats 1] [--threads N] [--out FILE.json]

* short prompt: NAMM with zero parameters (keeps everything: the pure cost of the policy) and
  NAMM with random parameters, each against ``full`` (target <= 1.3x for the zero NAMM);
* long prompt: a NAMM that keeps ~30% of every layer (random parameters, top 30% by score)
  against ``full`` (target < 1.0x: the smaller cache pays for the policy);
* the share of prefill time spent in memory updates (``policy_seconds``: attention of the
  buffered queries, features, scoring, selection and compaction), and the time of one layer's
  update by stage at 2k and 4k cached tokens. ``--short 0 --long 0`` gives only the latter.

Contenders alternate within each repeat so background load hits them alike; the best time counts.
Prompts are held-out corpus text. Normalisation: the shipped ``smollm2-135m-zeros`` statistics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import namm
from namm.benchmark import update_view
from namm.policies.namm import NAMMPolicy
from namm.policies.namm.selection import select_tokens
from namm.tasks.corpus import corpus_tokens

MODEL = "smollm2-135m"
STATS = "smollm2-135m-zeros"


def random_namm(seed: int, **options) -> NAMMPolicy:
    policy = namm.make_policy("namm", checkpoint=STATS, **options)
    policy.params = torch.randn(policy.num_params, generator=torch.Generator().manual_seed(seed)) * 0.3
    return policy


def contenders(kind: str) -> dict[str, namm.MemoryPolicy]:
    if kind == "short":
        return {"full": namm.make_policy("full"), "namm-zeros": namm.make_policy("namm", checkpoint=STATS),
                "namm-random": random_namm(0)}
    return {"full": namm.make_policy("full"), "namm-30%": random_namm(0, threshold=-1e30, max_fraction=0.3)}


def measure(model, prompt: torch.Tensor, policies: dict, repeats: int) -> dict:
    best: dict[str, namm.GenerationOutput] = {}
    for _ in range(repeats):
        for name, policy in policies.items():
            out = namm.generate(model, None, prompt, policy=policy, max_new_tokens=0)
            if name not in best or out.prefill_seconds < best[name].prefill_seconds:
                best[name] = out
    full_s = best["full"].prefill_seconds
    return {name: {"prefill_s": out.prefill_seconds, "ratio_vs_full": out.prefill_seconds / full_s,
                   "policy_s": out.policy_seconds, "policy_share": out.policy_seconds / out.prefill_seconds,
                   "cache_fraction": out.cache_fraction, "kv_bytes_peak": out.kv_bytes_peak,
                   "kv_bytes_full_peak": out.kv_bytes_full_peak}
            for name, out in best.items()}


def update_split(model, sizes: list[int], repeats: int = 3) -> dict:
    """Seconds of one layer's memory update, by stage, on random queries/keys of the model's shape
    at cache sizes ``sizes``: the runtime's attention of the buffered queries, NAMM features,
    BAM scoring and selection."""
    policy = random_namm(0)
    rows = {}
    for size in sizes:
        total = torch.zeros(4, dtype=torch.float64)
        for i in range(repeats + 1):  # the first run warms up and is not counted
            view = update_view(model, size, policy.n_up, seed=i)
            marks = [time.perf_counter()]
            view.attention()
            marks.append(time.perf_counter())
            x = policy.token_features(view)
            marks.append(time.perf_counter())
            scores = policy.net.score(x, view.valid, policy.row_params(view.rows))
            marks.append(time.perf_counter())
            select_tokens(scores, view.valid, policy.threshold)
            marks.append(time.perf_counter())
            total += torch.tensor(marks).diff() * (i > 0)
        rows[size] = dict(zip(("attention_s", "features_s", "scoring_s", "selection_s"), (total / repeats).tolist()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=4096, help="short prompt length (default 4096; 0 skips)")
    parser.add_argument("--long", type=int, default=8000, help="long prompt length (default 8000; 0 skips)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed prefills of every contender per prompt, taken in turns; the best time counts "
                             "(default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = namm.load_model(MODEL)
    figures = {"model": MODEL, "threads": torch.get_num_threads(), "repeats": args.repeats}
    for kind, length in (("short", args.short), ("long", args.long)):
        if length <= 0:
            continue
        prompt = corpus_tokens(tokenizer, length, split="heldout", seed=3)
        figures[f"{kind}_{length}"] = rows = measure(model, prompt, contenders(kind), args.repeats)
        print(f"prefill {length} tokens ({figures['threads']} threads):")
        print(f"  {'policy':<12} {'seconds':>8} {'vs full':>8} {'policy share':>13} {'cache frac':>11}")
        for name, row in rows.items():
            print(f"  {name:<12} {row['prefill_s']:>8.2f} {row['ratio_vs_full']:>7.3f}x {row['policy_share']:>13.1%} "
                  f"{row['cache_fraction']:>11.3f}")
    figures["update_split"] = split = update_split(model, [2048, 4096])
    print("one layer's memory update, seconds by stage (random queries and keys):")
    print(f"  {'cache':>6} {'attention':>10} {'features':>9} {'scoring':>8} {'selection':>10}")
    for size, row in split.items():
        print(f"  {size:>6} {row['attention_s']:>10.3f} {row['features_s']:>9.3f} {row['scoring_s']:>8.3f} "
              f"{row['selection_s']:>10.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
