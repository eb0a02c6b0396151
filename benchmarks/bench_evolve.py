"""Cost of one evolution generation on the embedded model: the proxy evaluator against real eviction.

    python benchmarks/bench_evolve.py [--population 32] [--prompts 16] [--length 1584] [--scorer mlp:8]
                                      [--real-prompts 1] [--threads 2] [--out FILE.json]

* recording: seconds per prompt of the once-per-run full-cache pass of the proxy (features at every
  update, keys and values), reported apart since a campaign pays it once per prompt;
* proxy: seconds for ``population`` members on ``prompts`` prompts (replay + continuation forward),
  and fitness evaluations (member x prompt) per second;
* real: seconds for the same population on ``real-prompts`` prompts under real progressive eviction
  with teacher-forced answers, extrapolated to ``prompts`` prompts, and the ratio real / proxy.

Prompts are training-style niah_multikey / kv_retrieval / passage_retrieval prompts at ``length``
tokens; members are drawn N(0, sigma^2) with sigma = 0.065 (a first CMA-ES generation). Budget
mode at 0.4. Normalisation: the shipped ``smollm2-135m-zeros`` statistics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import namm
from namm.evolve.fitness import AnswerScorer, tokenize_samples
from namm.evolve.proxy import ProxyScorer
from namm.policies.namm.checkpoint import load_namm_checkpoint, zeros_checkpoint
from namm.tasks.registry import get_task

TASKS = ["niah_multikey", "kv_retrieval", "passage_retrieval"]


def scorer_spec(text: str) -> str | dict:
    """"bam", "mlp" (linear) or "mlp:8,8" (hidden sizes)."""
    if text.startswith("mlp:"):
        return {"kind": "mlp", "hidden": [int(h) for h in text[4:].split(",")]}
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=32,
                        help="members of the generation, drawn N(0, 0.065^2) like a first CMA-ES generation "
                             "(default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=16,
                        help="prompts every member is scored on, cycling through niah_multikey, kv_retrieval and "
                             "passage_retrieval (default: %(default)s)")
    parser.add_argument("--length", type=int, default=1584, help="prompt length in tokens (default: %(default)s)")
    parser.add_argument("--scorer", default="mlp:8",
                        help="NAMM scorer: bam, mlp (linear) or mlp:H1,H2,... (hidden sizes) (default: %(default)s)")
    parser.add_argument("--real-prompts", type=int, default=1,
                        help="prompts actually run under real eviction; their time is extrapolated to --prompts "
                             "prompts (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file (default: print only)")
    args = parser.parse_args()
    if not 1 <= args.real_prompts <= args.prompts:
        parser.error(f"--real-prompts must be between 1 and --prompts ({args.prompts}), got {args.real_prompts}")
    torch.set_num_threads(args.threads)
    model, tokenizer = namm.load_model("smollm2-135m")
    samples = [(0, s) for i in range(args.prompts)
               for s in get_task(TASKS[i % len(TASKS)]).samples(tokenizer, args.length, 1, seed=7000 + i)]
    prompts = tokenize_samples(tokenizer, model, samples)
    for i, p in enumerate(prompts):
        p.task = i % len(TASKS)
    stats = load_namm_checkpoint("smollm2-135m-zeros").normalization
    policy = namm.make_policy("namm", checkpoint=zeros_checkpoint(scorer_spec(args.scorer), normalization=stats))
    params = torch.randn(args.population, policy.num_params, generator=torch.Generator().manual_seed(0)) * 0.065
    policy.set_budget(0.4)

    proxy = ProxyScorer(model, policy, progress=False)
    start = time.perf_counter()
    proxy.record(prompts)
    proxy.full(prompts)
    record_s = time.perf_counter() - start
    start = time.perf_counter()
    proxy.members(params, prompts)
    proxy_s = time.perf_counter() - start

    real = AnswerScorer(model, tokenizer, policy, progress=False)
    start = time.perf_counter()
    real.members(params, prompts[: args.real_prompts])
    real_s = (time.perf_counter() - start) * args.prompts / args.real_prompts

    evaluations = args.population * args.prompts
    result = {
        "population": args.population, "prompts": args.prompts, "length": args.length, "scorer": args.scorer,
        "prompt_tokens_mean": sum(len(p.token_ids) for p in prompts) / len(prompts), "threads": args.threads,
        "record_s_per_prompt": record_s / args.prompts, "proxy_generation_s": proxy_s,
        "proxy_evaluations_per_s": evaluations / proxy_s, "real_generation_s_extrapolated": real_s,
        "real_prompts_measured": args.real_prompts, "real_evaluations_per_s": evaluations / real_s,
        "real_over_proxy": real_s / proxy_s,
    }
    print(f"population {args.population} x {args.prompts} prompts x {result['prompt_tokens_mean']:.0f} tokens, "
          f"scorer {args.scorer}, {args.threads} threads")
    print(f"  recording (once per prompt and run): {result['record_s_per_prompt']:.1f} s per prompt")
    print(f"  proxy generation: {proxy_s:.1f} s ({result['proxy_evaluations_per_s']:.2f} evaluations/s)")
    print(f"  real eviction:    {real_s:.1f} s extrapolated from {args.real_prompts} prompt(s) "
          f"({result['real_evaluations_per_s']:.3f} evaluations/s) -> real / proxy = {result['real_over_proxy']:.1f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
