"""How well the proxy evaluator ranks NAMM members against real eviction (Spearman correlation).

    python benchmarks/proxy_rank.py --run runs/smollm2-135m-budget [--members 16] [--prompts 4]
                                    [--max-length 2096] [--budget 0.4] [--out FILE.json]

Two member sets, each scored on the same held-in prompts of the run's training pool (at most
``max-length`` + 64 tokens, spread over its tasks) by the proxy and by real progressive eviction with the
answer teacher-forced (``AnswerScorer``), in budget mode at ``budget``:

* ``cmaes``: a population drawn from the run's current CMA-ES state (what the proxy must rank
  during the campaign);
* ``random``: N(0, 1) parameter vectors (members that behave very differently).

Reports the Spearman rank correlation of the members' fitness (mean over prompts of the answer
log-likelihood minus the full cache's), and the mean per-prompt correlation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import namm
from namm.eval.ranking import spearman
from namm.evolve.cmaes import CMAES
from namm.evolve.fitness import AnswerScorer
from namm.evolve.proxy import ProxyScorer
from namm.evolve.trainer import Trainer, build_policy, load_run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True,
                        help="evolution run folder (its config, training pool, normalization and CMA-ES state)")
    parser.add_argument("--members", type=int, default=16,
                        help="members in each set, cmaes (at most its population size) and random "
                             "(default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=4,
                        help="prompts of the run's training pool, taken in turn from its tasks (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=2096,
                        help="use only pool prompts of at most this many tokens, plus 64 tokens of slack "
                             "(default: %(default)s)")
    parser.add_argument("--budget", type=float, default=0.4,
                        help="budget-mode budget (fraction of tokens kept) of every member (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_run_config(args.run)
    model, tokenizer = namm.load_model(config.model)
    pool = Trainer(config, args.run, model, tokenizer, progress=False).pool
    short = [p for p in pool if len(p.token_ids) <= args.max_length + 64]
    by_task = [[p for p in short if p.task == t] for t in range(len(config.tasks))]
    prompts = []  # round-robin over the tasks
    for i in range(max(len(group) for group in by_task)):
        prompts += [group[i] for group in by_task if i < len(group)]
    prompts = prompts[: args.prompts]
    policy = build_policy(args.run / "normalization", config)
    policy.set_budget(args.budget)
    state = CMAES.load(args.run / "state")
    sets = {"cmaes": state.ask()[: args.members],
            "random": torch.randn(args.members, policy.num_params, generator=torch.Generator().manual_seed(1))}
    proxy = ProxyScorer(model, policy, progress=False)
    real = AnswerScorer(model, tokenizer, policy, progress=False)
    full_proxy, full_real = proxy.full(prompts), real.full(prompts)
    result = {"run": str(args.run), "generation": state.generation, "budget": args.budget,
              "prompts": [p.key for p in prompts], "prompt_tokens": [len(p.token_ids) for p in prompts], "sets": {}}
    for name, params in sets.items():
        gap_proxy = proxy.members(params, prompts).scores - full_proxy
        gap_real = real.members(params, prompts).scores - full_real
        per_prompt = [spearman(gap_proxy[:, i], gap_real[:, i]) for i in range(len(prompts))]
        result["sets"][name] = {
            "members": len(params), "spearman": spearman(gap_proxy.mean(1), gap_real.mean(1)),
            "spearman_per_prompt_mean": sum(per_prompt) / len(per_prompt), "spearman_per_prompt": per_prompt,
            "fitness_proxy": gap_proxy.mean(1).tolist(), "fitness_real": gap_real.mean(1).tolist(),
        }
        print(f"{name:>7}: Spearman {result['sets'][name]['spearman']:.3f} over {len(params)} members "
              f"(per prompt mean {result['sets'][name]['spearman_per_prompt_mean']:.3f}), {len(prompts)} prompts, "
              f"budget {args.budget}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
