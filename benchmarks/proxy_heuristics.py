"""Hand-set memory rules against evolved NAMMs, scored by a campaign's own proxy on held-in prompts.

    python benchmarks/proxy_heuristics.py --run runs/smollm2-135m-margin \\
        [--checkpoint runs/smollm2-135m-margin/means/gen-0235 ...] [--max-length 1100] [--per-task 2] \\
        [--budgets 0.2,0.4,0.6] [--out docs/results/evolution-v2/proxy-heuristics.json]

A diagnostic of what a campaign can learn, not an evaluation: the prompts are the shortest of the
run's training pool (``--per-task`` per task, at most ``--max-length`` tokens), scored with the run's
proxy evaluator, fitness statistic and protocol (docs/algorithm.md §7-8), in budget mode at each
budget. Contenders:

* NAMM parameter vectors of the run's scorer: the all-zero NAMM (every score ties; ties keep the
  oldest tokens), the run's current CMA-ES mean, and every ``--checkpoint``;
* rules, each a weighted sum of per-token quantities read from the recorded features:
  ``sinks`` (the first 4 positions, StreamingLLM's attention sinks), ``recent`` (minus the distance
  to the newest token), ``oldest`` (minus the position), ``ends`` (minus the distance to the nearer
  end of the sequence) and ``log_attention`` (log of the un-normalised spectrogram EMA's DC bin: the
  attention the token received lately, H2O-like evidence on a log scale).

The question it answers: does the attention a token received tell anything that recency and the
sinks do not, on the run's tasks and protocol; and where does the evolved NAMM stand among rules a
human would write. Prints a table; ``--out`` writes it as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import Tensor

import namm
from namm.evolve.cmaes import CMAES
from namm.evolve.fitness import answer_fitness
from namm.evolve.proxy import ProxyScorer
from namm.evolve.trainer import Trainer, build_policy, load_run_config
from namm.policies.namm.checkpoint import load_namm_checkpoint
from namm.policies.namm.features import FeatureConfig, Normalization, recency_frequencies

SINKS = 4
QUANTITIES = ("sinks", "recent", "oldest", "ends", "log_attention")
SINK_WEIGHT = 1e3  # larger than any other rule term: the sinks are always kept
RULES: dict[str, dict[str, float]] = {
    "rule:streaming": {"sinks": SINK_WEIGHT, "recent": 1.0},
    "rule:oldest": {"oldest": 1.0},
    "rule:ends": {"sinks": SINK_WEIGHT, "ends": 1.0},
    "rule:h2o-like": {"sinks": SINK_WEIGHT, "log_attention": 1.0},
    **{f"rule:streaming+{a}*log_attention": {"sinks": SINK_WEIGHT, "recent": 1.0, "log_attention": a}
       for a in (0.01, 0.03, 0.1)},
}


class RuleScorer:
    """Scores tokens by fixed rules: parameter row p holds one weight per quantity of ``QUANTITIES``.

    Works on the proxy's recorded features, where every update holds every token of the prompt so
    far, so a token's position is the largest distance in its head minus its own distance."""

    num_params = len(QUANTITIES)

    def __init__(self, features: FeatureConfig, normalization: Normalization):
        self.features, self.normalization = features, normalization

    def quantities(self, x: Tensor) -> Tensor:
        """(..., K, len(QUANTITIES)) per-token quantities of features ``x`` (..., K, dim)."""
        half = self.features.recency_dims // 2
        omega = float(recency_frequencies(self.features)[-1])  # the slowest recency frequency
        distance = torch.atan2(x[..., half - 1], x[..., 2 * half - 1]) / omega  # exact for distance < pi / omega
        distance = distance.round()
        position = distance.amax(-1, keepdim=True) - distance
        tokens = distance.shape[-1]
        dc = self.normalization.invert(x[..., 2 * half:], self.features.eps)[..., 0]
        return torch.stack([(position < SINKS).float(), -distance / tokens, -position / tokens,
                            -torch.minimum(position, distance) / tokens, torch.log(dc.clamp(min=1e-12))], dim=-1)

    def score_shared(self, x: Tensor, params: Tensor) -> Tensor:
        """(P, ...) scores of the tokens of ``x`` (..., dim) under each rule row of ``params`` (P, n)."""
        return torch.einsum("...q,pq->p...", self.quantities(x), params.to(x.device, torch.float32))


def rule_params(rules: dict[str, dict[str, float]]) -> Tensor:
    """(len(rules), len(QUANTITIES)) weights of each rule."""
    return torch.tensor([[rule.get(q, 0.0) for q in QUANTITIES] for rule in rules.values()])


def held_in_prompts(pool: list, tasks: int, per_task: int, max_length: int) -> list:
    """The ``per_task`` shortest prompts of each task (at most ``max_length`` tokens), task by task."""
    chosen = []
    for t in range(tasks):
        mine = sorted((p for p in pool if p.task == t and len(p.token_ids) <= max_length), key=lambda p: len(p.token_ids))
        chosen += mine[:per_task]
    return chosen


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a namm evolve run directory")
    parser.add_argument("--checkpoint", type=Path, action="append", default=[], help="a NAMM checkpoint (repeatable)")
    parser.add_argument("--model", default=None, help="model to load (default: the run's)")
    parser.add_argument("--max-length", type=int, default=1100, help="longest prompt used (tokens)")
    parser.add_argument("--per-task", type=int, default=2, help="prompts per training task")
    parser.add_argument("--budgets", default="0.2,0.4,0.6", help="comma-separated budgets")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", type=Path, help="write the table as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    config = load_run_config(args.run)
    model, tokenizer = namm.load_model(args.model or config.model)
    pool = Trainer(config, args.run, model, tokenizer, progress=False).pool
    prompts = held_in_prompts(pool, len(config.tasks), args.per_task, args.max_length)
    if not prompts:
        raise SystemExit(f"no prompt of the run's pool has at most {args.max_length} tokens")
    tasks = torch.tensor([p.task for p in prompts])
    policy = build_policy(args.run / "normalization", config)
    rules_policy = copy.copy(policy)
    rules_policy.net = RuleScorer(policy.features, policy.normalization)
    proxy = ProxyScorer(model, policy, progress=False, statistic=config.fitness)
    rules_proxy = ProxyScorer(model, rules_policy, progress=False, statistic=config.fitness)
    rules_proxy.records, rules_proxy.full_cache = proxy.records, proxy.full_cache  # one recording serves both
    full = proxy.full(prompts)
    state = CMAES.load(args.run / "state")
    vectors = {"namm:zeros": torch.zeros(policy.num_params), f"namm:cmaes-mean@{state.generation}": state.mean}
    vectors |= {f"namm:{c.name}": load_namm_checkpoint(str(c)).params for c in args.checkpoint}
    contenders = [(proxy, policy, list(vectors), torch.stack([v.float() for v in vectors.values()])),
                  (rules_proxy, rules_policy, list(RULES), rule_params(RULES))]
    rows = {name: {"fitness": {}, "cache_fraction": {}} for _, _, names, _ in contenders for name in names}
    for budget in budgets:
        for scorer, pol, names, params in contenders:
            pol.set_budget(budget)
            scores = scorer.members(params, prompts)
            fitness = answer_fitness(scores.scores, full, tasks)
            for i, name in enumerate(names):
                rows[name]["fitness"][budget] = float(fitness[i])
                rows[name]["cache_fraction"][budget] = float(scores.cache_fraction[i].mean())
    result = {"run": str(args.run), "statistic": config.fitness,
              "protocol": "query-agnostic" if config.question_after_compression else "query-aware",
              "prompts": [p.key for p in prompts], "prompt_tokens": [len(p.token_ids) for p in prompts],
              "budgets": budgets, "rows": rows}
    width = max(len(n) for n in rows)
    print(f"{'contender':<{width}}  " + "  ".join(f"{b:>8}" for b in budgets) + "      mean")
    for name, row in rows.items():
        values = [row["fitness"][b] for b in budgets]
        print(f"{name:<{width}}  " + "  ".join(f"{v:8.3f}" for v in values) + f"  {sum(values) / len(values):8.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
