"""How reliably one generation's prompts rank an evolution run's members (split-half Spearman).

    python benchmarks/fitness_reliability.py --run runs/NAME [--around CKPT --sigma 0.065] [--budgets 0.2,0.6]
                                             [--per-task 1,2,4] [--draws 500] [--record-cache DIR] [--out FILE.json]

A population drawn from the run's current CMA-ES state (and, with ``--around``, populations drawn
around given checkpoints) is scored once, with the run's own evaluator and fitness, on every prompt
of its training pool at each budget. From those scores, per member set:

* ``split_half``: Spearman between the member rankings on two disjoint draws of k prompts per task
  (what two generations with different prompts would say about the same members);
* ``vs_pool``: Spearman between a k-per-task draw's ranking and the whole pool's (how well a
  generation's selection follows the held-in fitness the run reports);
* ``across_budgets``: Spearman between the whole pool's rankings at two budgets (a generation
  draws one budget).

Low values mean a generation's selection is mostly the noise of its draw, which caps how far the
CMA-ES mean can climb on the held-in prompts.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

import namm
from namm.commands.common import record_cache_dir
from namm.eval.ranking import spearman
from namm.eval.runner import write_json
from namm.evolve.cmaes import CMAES
from namm.evolve.fitness import answer_fitness
from namm.evolve.trainer import Trainer, load_run_config
from namm.policies.namm.checkpoint import load_namm_checkpoint


def stratified_halves(tasks: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint index sets with ``k`` prompts of every task each."""
    a, b = [], []
    for task in torch.unique(tasks):
        ids = (tasks == task).nonzero().flatten()
        order = ids[torch.randperm(len(ids), generator=gen)]
        a.append(order[:k])
        b.append(order[k: 2 * k])
    return torch.cat(a), torch.cat(b)


def summary(values: list[float]) -> dict:
    low, high = np.percentile(values, [2.5, 97.5])
    return {"mean": float(np.mean(values)), "p2.5": float(low), "p97.5": float(high)}


def reliability(values: dict, full: torch.Tensor, tasks: torch.Tensor, sizes: list[int], draws: int) -> dict:
    """Split-half and draw-against-pool Spearman per budget and draw size, the whole pool's fitness
    and its spread over members, and the whole pool's agreement across budgets, from the (P, n)
    member answer statistics ``values[budget]``."""
    gen = torch.Generator().manual_seed(0)
    out: dict = {"budgets": {}, "across_budgets": {}}
    whole = {budget: answer_fitness(v, full, tasks) for budget, v in values.items()}
    for budget, v in values.items():
        rows = {}
        for k in sizes:
            split, vs_pool = [], []
            for _ in range(draws):
                a, b = stratified_halves(tasks, k, gen)
                fa = answer_fitness(v[:, a], full[a], tasks[a])
                split.append(spearman(fa, answer_fitness(v[:, b], full[b], tasks[b])))
                vs_pool.append(spearman(fa, whole[budget]))
            rows[k] = {"split_half": summary(split), "vs_pool": summary(vs_pool)}
        out["budgets"][str(budget)] = {"per_task": rows, "fitness": whole[budget].tolist(),
                                       "fitness_spread": float(whole[budget].std())}
    for b1, b2 in itertools.combinations(values, 2):
        out["across_budgets"][f"{b1},{b2}"] = spearman(whole[b1], whole[b2])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="evolution run folder (config, pool, CMA-ES state)")
    parser.add_argument("--model", help="load the model from here instead of the run's config (a moved run)")
    parser.add_argument("--budgets", help="comma-separated budgets (default: the run's two ends)")
    parser.add_argument("--per-task", default="1,2,4",
                        help="prompts per task in a draw, comma-separated (default: %(default)s)")
    parser.add_argument("--draws", type=int, default=500, help="random draws per size (default: %(default)s)")
    parser.add_argument("--around", action="append", default=[], metavar="CKPT",
                        help="also score a set of members drawn around this NAMM checkpoint's parameters, N(params, "
                             "--sigma^2 I), as many as the run's population (repeatable; same scorer as the run)")
    parser.add_argument("--sigma", type=float, default=0.065, help="step size of the --around sets (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: %(default)s)")
    parser.add_argument("--record-cache", type=Path,
                        help="the proxy's recordings of the pool, as `namm evolve --record-cache` keeps them (read, "
                             "and written where missing)")
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_run_config(args.run)
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(config.budgets or [None])
    sizes = [int(k) for k in args.per_task.split(",")]
    if args.record_cache:
        try:
            record_cache_dir(str(args.record_cache), config.evaluator)
        except (ValueError, OSError) as error:
            parser.error(str(error))
    model, tokenizer = namm.load_model(args.model or config.model)
    trainer = Trainer(config, args.run, model, tokenizer, progress=False, record_cache=args.record_cache)
    trainer.build_scorer()
    state = CMAES.load(args.run / "state")
    sets = {f"cmaes-state@{state.generation}": state.ask()}
    for i, path in enumerate(args.around):
        centre = load_namm_checkpoint(path).params
        if centre.numel() != state.config.num_params:
            parser.error(f"--around {path} has {centre.numel()} parameters; the run's scorer has {state.config.num_params}")
        noise = torch.randn(config.population, centre.numel(), generator=torch.Generator().manual_seed(i))
        sets[f"around:{path}"] = centre + args.sigma * noise
    pool, scorer = trainer.pool, trainer.scorer
    tasks = torch.tensor([p.task for p in pool])
    smallest = int(torch.bincount(tasks).min())
    if 2 * max(sizes) > smallest:
        parser.error(f"--per-task {max(sizes)} needs {2 * max(sizes)} prompts per task; the pool has {smallest}")
    full = scorer.full(pool, config.eval_batch_size)
    result = {"run": str(args.run), "pool_per_task": smallest, "draws": args.draws, "sigma": args.sigma, "sets": {}}
    for name, params in sets.items():
        values = {}
        for budget in budgets:
            trainer.policy.set_budget(budget)
            values[budget] = scorer.members(params, pool).scores
        trainer.policy.set_budget(None)
        result["sets"][name] = reliability(values, full, tasks, sizes, args.draws)
        for budget, row in result["sets"][name]["budgets"].items():
            for k, stats in row["per_task"].items():
                print(f"{name}, budget {budget}, {k} per task: split-half Spearman {stats['split_half']['mean']:.3f}, "
                      f"vs the whole pool {stats['vs_pool']['mean']:.3f} ({len(params)} members)")
        for pair, rho in result["sets"][name]["across_budgets"].items():
            print(f"{name}, whole pool, budgets {pair}: Spearman {rho:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
