"""What sharing the prefill saves: prompt-end policies run one by one against one shared prefill.

    python benchmarks/shared_prefill.py [--model smollm2-135m] [--task niah_single] [--length 2048]
        [--samples 2] [--policies recency,streaming,h2o,l2,tova,random] [--budgets 0.25,0.5]
        [--query-agnostic] [--threads N] [--out FILE.json]

Every policy runs on the prompt-end schedule over the same batch of prompts, first with
:func:`namm.generate` once per (policy, budget), then with :func:`namm.memory.generation.generate_shared`
(one prefill for all of them). Prints both wall times and their ratio, measured in this one run,
and checks that every policy's answers and memory are the same both ways (exits 1 if not).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import namm
from namm.commands.common import set_threads
from namm.memory.generation import generate_shared
from namm.tasks import get_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model: registry name or path (default: %(default)s)")
    p.add_argument("--task", default="niah_single", help="task the prompts come from (default: %(default)s)")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default: %(default)s)")
    p.add_argument("--samples", type=int, default=2, help="prompts, run as one batch")
    p.add_argument("--seed", type=int, default=300, help="seed of the prompts (default: %(default)s)")
    p.add_argument("--policies", default="recency,streaming,h2o,l2,tova,random",
                   help="comma-separated policies, each run on the prompt-end schedule at every budget "
                        "(default: %(default)s)")
    p.add_argument("--budgets", default="0.25,0.5",
                   help="comma-separated budgets (fractions of the tokens kept) (default: %(default)s)")
    p.add_argument("--query-agnostic", action="store_true", help="compress the context before the question")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    set_threads(args)
    model, tokenizer = namm.load_model(args.model)
    samples = get_task(args.task).samples(tokenizer, args.length, args.samples, seed=args.seed)
    budgets = [float(b) for b in args.budgets.split(",")]

    def policies():
        return [namm.make_policy(name, budget=b, schedule="prompt-end") for name in args.policies.split(",")
                for b in budgets]

    agnostic = args.query_agnostic
    prompts = [s.context for s in samples] if agnostic else [s.prompt for s in samples]
    options = dict(max_new_tokens=samples[0].max_new_tokens, record_history=True,
                   question=[s.question for s in samples] if agnostic else None)
    start = time.perf_counter()
    alone = [namm.generate(model, tokenizer, prompts, policy=policy, **options) for policy in policies()]
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    shared = generate_shared(model, tokenizer, prompts, policies(), **options)
    shared_s = time.perf_counter() - start
    same = all([o.token_ids for o in a] == [o.token_ids for o in s] and [o.kv_bytes for o in a] == [o.kv_bytes for o in s]
               for a, s in zip(alone, shared))
    figures = {"model": args.model, "task": args.task, "length": args.length, "prompts": len(samples),
               "runs": len(alone), "protocol": "query-agnostic" if agnostic else "query-aware",
               "one_by_one_s": round(alone_s, 2), "shared_s": round(shared_s, 2),
               "speedup": round(alone_s / shared_s, 2), "same_answers_and_memory": same}
    print(f"{len(alone)} prompt-end runs x {len(samples)} prompts of {args.length} tokens on {args.model}: "
          f"one by one {alone_s:.1f} s, shared prefill {shared_s:.1f} s, {alone_s / shared_s:.2f}x faster; "
          f"same answers and memory: {same}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
