"""Does a NAMM keep the needle? A diagnostic of what its selection drops on retrieval prompts.

    python benchmarks/needle_kept.py --checkpoint runs/NAME [--model qwen2.5-coder-0.5b] \\
        [--task niah_multikey] [--length 2048] [--samples 8] [--seed 60] [--budgets 0.25,0.5] [--out FILE.json]
        [--budgets threshold,threshold+floor=0.35+max_fraction=0.5,0.25+pool=13]

For prompts whose reference answer appears verbatim in the context (the NIAH tasks, passkey), each
prompt is read once with the full cache and recorded on the NAMM's schedule (the proxy recorder,
docs/algorithm.md §8), and the NAMM's selection is replayed on the recording, in budget mode at each
budget and, for the entry ``threshold``, in threshold mode at the checkpoint's threshold. A mode may
change the selection with ``+threshold=T`` (threshold mode's cut), ``+floor=F``, ``+pool=P`` or
``+max_fraction=M``; one recording serves every variant, since they share the checkpoint's features
and scorer. Reported per mode: the share of (layer, KV head) pairs that still hold every token of
the answer's first occurrence, the share of the needle's tokens they hold, the share of pairs that
hold some of its tokens but not all (the selection cuts through the needle), the share of all tokens
held, and (budgets only) the whole-needle share for the normalised DC bin alone (the attention the
update's queries paid each token) under the same neighbour pool. When the DC bin keeps the needle
and the NAMM does not, the scorer's other inputs outweigh the attention signal. Use validation
prompts (a training task at a fresh seed), not the evaluation suite.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import Tensor

import namm
from namm.commands.common import set_threads
from namm.evolve.fitness import tokenize_samples
from namm.evolve.proxy import record_prompt, replay
from namm.policies.namm.selection import pooled_scores
from namm.policies.selection import keep_top
from namm.tasks import get_task


def first_occurrence(haystack: list[int], needle: list[int]) -> int | None:
    """Index of the first occurrence of ``needle`` in ``haystack``, None when absent."""
    n = len(needle)
    return next((i for i in range(len(haystack) - n + 1) if haystack[i:i + n] == needle), None)


def dc_held(features: Tensor, recency_dims: int, pool: int, budget: float) -> Tensor:
    """(L, H, K) bool: each head's top ``ceil(budget * K)`` tokens by the normalised DC bin alone,
    max-pooled over ``pool`` neighbours, for one recorded update's features (L, H, K, dim) whose DC
    bin follows the ``recency_dims`` recency numbers."""
    L, H, K, _ = features.shape
    valid = torch.ones(L, H, K, dtype=torch.bool)
    count = torch.full((L,), math.ceil(budget * K))
    return keep_top(pooled_scores(features[..., recency_dims], valid, pool), count, valid)


def whole_needle_share(held: Tensor, start: int, length: int) -> float:
    """Share of (layer, head) pairs of ``held`` (L, H, K) that keep tokens ``start .. start+length-1``."""
    return float(held[:, :, start:start + length].all(-1).float().mean())


def needle_token_share(held: Tensor, start: int, length: int) -> float:
    """Share of the needle's tokens ``start .. start+length-1`` held, over all (layer, head) pairs."""
    return float(held[:, :, start:start + length].float().mean())


def cut_needle_share(held: Tensor, start: int, length: int) -> float:
    """Share of (layer, head) pairs that hold some of the needle's tokens but not all of them."""
    part = held[:, :, start:start + length]
    return float((part.any(-1) & ~part.all(-1)).float().mean())


SELECTION_OPTIONS = {"threshold": float, "floor": float, "pool": int, "max_fraction": float}


def parse_mode(entry: str) -> tuple[float | None, dict]:
    """One ``--budgets`` entry: (budget fraction, or None for threshold mode; selection options),
    e.g. ``threshold+floor=0.35+max_fraction=0.5`` -> (None, {"floor": 0.35, "max_fraction": 0.5})."""
    head, *changes = entry.strip().split("+")
    options = {}
    for change in changes:
        name, _, value = change.partition("=")
        if name not in SELECTION_OPTIONS or not value:
            raise ValueError(f"mode {entry!r}: expected +NAME=VALUE with NAME one of {', '.join(SELECTION_OPTIONS)}")
        options[name] = SELECTION_OPTIONS[name](value)
    return (None if head == "threshold" else float(head)), options


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a NAMM checkpoint on the prompt-end schedule")
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="model: registry name or path (default: %(default)s)")
    p.add_argument("--task", default="niah_multikey",
                   help="task whose reference answer appears verbatim in the context (default: %(default)s)")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--samples", type=int, default=8, help="prompts to diagnose (default: %(default)s)")
    p.add_argument("--seed", type=int, default=60,
                   help="seed of the prompts; pick one apart from training and evaluation seeds (default: %(default)s)")
    p.add_argument("--budgets", default="0.25,0.5",
                   help="budget fractions and/or 'threshold' (the checkpoint's threshold mode), each optionally "
                        "with +threshold=T, +floor=F, +pool=P, +max_fraction=M changing the selection")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--out", type=Path,
                   help="also write the per-prompt rows and their means to this JSON file (default: print only)")
    args = p.parse_args(argv)
    set_threads(args)
    model, tokenizer = namm.load_model(args.model)
    samples = get_task(args.task).samples(tokenizer, args.length, args.samples, seed=args.seed)
    prompts = tokenize_samples(tokenizer, model, [(0, s) for s in samples])
    modes = [(entry.strip(), *parse_mode(entry)) for entry in args.budgets.split(",")]
    policy = namm.make_policy("namm", checkpoint=args.checkpoint)
    policy.bind(model)
    variants = {tag: namm.make_policy("namm", checkpoint=policy.loaded_checkpoint, budget=budget, **options)
                for tag, budget, options in modes}
    if policy.schedule != "prompt-end":
        raise ValueError(f"the checkpoint runs on the {policy.schedule} schedule; "
                         "this diagnostic replays prompt-end only")
    rows = []
    for sample, prompt in zip(samples, prompts):
        answer = tokenizer(sample.answers[0], add_special_tokens=False).input_ids
        start = first_occurrence(prompt.token_ids.tolist(), answer)
        if start is None:
            raise ValueError(f"prompt {prompt.key}: its answer {sample.answers[0]!r} does not occur in the prompt")
        record = record_prompt(model, policy, prompt.token_ids, prompt.answer_ids, prompt.key, prompt.task)
        row = {"prompt": prompt.key, "needle_start": start, "needle_tokens": len(answer)}
        for tag, budget, _ in modes:
            variant = variants[tag]
            held = replay(record, variant, variant.params[None])[0]
            row[f"namm@{tag}"] = whole_needle_share(held, start, len(answer))
            row[f"namm_tokens@{tag}"] = needle_token_share(held, start, len(answer))
            row[f"namm_cut@{tag}"] = cut_needle_share(held, start, len(answer))
            row[f"held@{tag}"] = float(held.float().mean())
            if budget is not None:
                by_dc = dc_held(record.features[-1], variant.features.recency_dims, variant.pool, budget)
                row[f"dc@{tag}"] = whole_needle_share(by_dc, start, len(answer))
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0] if "@" in key}
    print("mean share of (layer, head) pairs holding the whole needle:", json.dumps(summary))
    result = {"checkpoint": args.checkpoint, "model": args.model, "task": args.task, "length": args.length,
              "seed": args.seed, "rows": rows, "mean": summary}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
