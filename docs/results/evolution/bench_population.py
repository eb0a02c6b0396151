"""Seconds to score a NAMM population on one prompt: one member at a time vs one batch.

    OMP_NUM_THREADS=1 python docs/results/evolution/bench_population.py --population 16 --length 1024

Three ways to score P members (BAM parameters ~ N(0, 0.065²), as in a first CMA-ES generation)
on the same prompt with greedy decoding of 8 tokens: (1) one member per ``generate`` call,
(2) all members as the rows of one batch but with the rows made distinct (first token changed,
so nothing is shared), (3) the batch ``namm evolve`` runs: identical rows, the tokens before the
first memory update computed once. Writes a JSON line with the timings.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import namm
from namm.tasks.corpus import corpus_tokens


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer = namm.load_model(args.model)
    prompt = corpus_tokens(tokenizer, args.length, split="heldout", seed=0)
    policy = namm.make_policy("namm", checkpoint="zeros")
    params = torch.randn(args.population, policy.num_params, generator=torch.Generator().manual_seed(0)) * 0.065

    def run(prompts: list[torch.Tensor], members: torch.Tensor) -> None:
        policy.set_population(members)
        namm.generate(model, tokenizer, prompts, policy=policy, max_new_tokens=args.new_tokens, eos_token_id=None)

    one_by_one = timed(lambda: [run([prompt], params[i:i + 1]) for i in range(args.population)])
    distinct = [torch.cat([torch.tensor([int(prompt[0]) + i]), prompt[1:]]) for i in range(args.population)]
    batched_unshared = timed(lambda: run(distinct, params))
    batched = timed(lambda: run([prompt] * args.population, params))
    result = {"model": args.model, "population": args.population, "prompt_tokens": len(prompt),
              "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
              "one_by_one_s": round(one_by_one, 1), "batched_no_sharing_s": round(batched_unshared, 1),
              "batched_shared_prefix_s": round(batched, 1),
              "speedup_batched_vs_one_by_one": round(one_by_one / batched, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
