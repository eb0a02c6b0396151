"""The campaign's fitness under real eviction: an evolved NAMM against the baselines at equal budget.

    python benchmarks/real_loglik.py --checkpoint runs/smollm2-135m-budget/best \\
        [--tasks niah_multikey,niah_multivalue,kv_retrieval,variable_tracking,passage_retrieval] \\
        [--length 2048] [--samples 4] [--seed 50] [--budgets 0.25,0.5] [--out docs/results/real-loglik.json]

    # choose among a campaign's candidates (every evaluated CMA-ES mean is kept in means/):
    python benchmarks/real_loglik.py --checkpoint runs/R/means/gen-0150 --checkpoint runs/R/means/gen-0200 \\
        --baselines streaming

A validation check, not an evaluation: the prompts are fresh ones (another seed and length) of the
tasks a campaign trains on. Every policy reads each prompt and its reference answer teacher-forced
through the memory runtime (real progressive eviction, updates and all), and the score is the
campaign's fitness (``--fitness``): by default ``loglik``, the mean log-probability of the answer
tokens, or ``margin``, the answer's weakest token margin (positive when greedy decoding emits it),
minus the full cache's on the same prompt, averaged per task, then over tasks (0 = as good as the
full cache). ``--question-after-compression``: the query-agnostic protocol, the context compressed
before the question is read. Every row also reports ``exact``, how many prompts greedy decoding
would answer exactly (every answer token the argmax), and ``accuracy``, the share of answer tokens
that are.
The NAMM runs in budget mode at each budget on its checkpoint's schedule (or ``--namm-schedule``),
and in threshold mode (its checkpoint's threshold and floor, no baselines) for the budget
``threshold``; every baseline at the same budget on its own default schedule or on each of
``--baseline-schedules`` (rows ``NAME:SCHEDULE``). With several ``--checkpoint``s each NAMM row is
named ``namm@<folder>``. Prints a table and (``--out``) writes the per-prompt values as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import namm
from namm.eval.intervals import bootstrap_interval
from namm.evolve.fitness import (ANSWER_STATISTICS, answer_fitness, answer_statistic, teacher_forced_logits,
                                 tokenize_samples)
from namm.evolve.proxy import continuation_logits, position_rule_held, record_prompt, replay
from namm.policies.base import SCHEDULES, MemoryPolicy
from namm.tasks import get_task

TRAINING_TASKS = "niah_multikey,niah_multivalue,kv_retrieval,variable_tracking,passage_retrieval"
BASELINES = "recency,streaming,h2o,tova"
STATISTICS = (*ANSWER_STATISTICS, "accuracy")


def summary(stats: dict[str, torch.Tensor]) -> dict:
    """Mean of each statistic over the prompts, and ``exact``: how many prompts greedy decoding
    would answer exactly (every answer token the argmax: a positive margin)."""
    return {**{f"mean_{name}": float(v.mean()) for name, v in stats.items()},
            "accuracy": float(stats["accuracy"].mean()), "exact": int((stats["margin"] > 0).sum())}


def by_task(values: torch.Tensor, task_of: torch.Tensor) -> list[list[float]]:
    """The per-prompt values grouped by task (the bootstrap resamples each task on its own)."""
    return [values[task_of == t].tolist() for t in range(int(task_of.max()) + 1)]


def paired(rows: list[dict], task_of: torch.Tensor, statistic: str) -> list[dict]:
    """Every NAMM row against every baseline at the same budget: the mean per-prompt difference
    (NAMM minus baseline) of the statistic and of exactness, with bootstrap 95% intervals."""
    out = []
    for a in [r for r in rows if r["policy"].startswith("namm")]:
        for b in [r for r in rows if r["budget"] == a["budget"] and not r["policy"].startswith("namm")]:
            diff = torch.tensor(a["values"]) - torch.tensor(b["values"])
            exact = (torch.tensor(a["exact_values"]) - torch.tensor(b["exact_values"])).float()
            out.append({"budget": a["budget"], "namm": a["policy"], "baseline": b["policy"],
                        f"{statistic}_difference": float(diff.mean()),
                        f"{statistic}_difference_ci": bootstrap_interval(by_task(diff, task_of)),
                        "exact_difference": float(exact.mean()),
                        "exact_difference_ci": bootstrap_interval(by_task(exact, task_of))})
    return out


THRESHOLD = "threshold"  # the --budgets entry that runs the NAMM in threshold mode


def budget_label(budget: float | str) -> str:
    """A budget as printed: two decimals, or ``threshold``."""
    return budget if isinstance(budget, str) else f"{budget:.2f}"


def baselines(names: str, schedules: str | None, budget: float) -> dict:
    """Every named baseline at ``budget``: on its own schedule (``schedules`` None), else on each of
    the comma-separated ``schedules``, labelled ``NAME:SCHEDULE``."""
    names = [n for n in names.split(",") if n]
    if schedules is None:
        return {name: namm.make_policy(name, budget=budget) for name in names}
    return {f"{name}:{schedule}": namm.make_policy(name, budget=budget, schedule=schedule)
            for name in names for schedule in schedules.split(",")}


def recorded_scores(model, prompts: list, contenders: dict[float, dict[str, MemoryPolicy]]) -> dict:
    """``{(budget, label): (stats, cache fraction)}`` of every contender, and ``(None, "full")``, on
    the recorded evaluator: each prompt (its context, if query-agnostic) is read once with the full
    cache and recorded (:func:`namm.evolve.proxy.record_prompt`), every contender compresses that
    recording once (a NAMM replays its selection, a baseline selects on the recorded keys), and one
    batched forward reads the rest (question, if not read yet, and answer) over every contender's
    cache. On the prompt-end schedule this is real eviction exactly (tests/test_real_loglik.py
    checks it)."""
    policies = [(budget, label, policy) for budget, per in contenders.items() for label, policy in per.items()]
    namms = [policy for _, _, policy in policies if policy.name == "namm"]
    if not namms:
        raise ValueError("the recorded evaluator reads features through a NAMM: give a --checkpoint")
    first = namms[0]
    for policy in namms:
        if policy.schedule != "prompt-end":
            raise ValueError(f"the recorded evaluator is exact on the prompt-end schedule only; a checkpoint runs "
                             f"on {policy.schedule}")
        if policy.features != first.features or not (torch.equal(policy.normalization.mean, first.normalization.mean)
                                                      and torch.equal(policy.normalization.std, first.normalization.std)):
            raise ValueError("the recorded evaluator needs checkpoints with one feature normalisation (one run)")
    values: dict[tuple, list] = {}
    for prompt in tqdm(prompts, desc="recorded prompts", unit="prompt", disable=not sys.stderr.isatty()):
        record = record_prompt(model, first, prompt.token_ids, prompt.answer_ids, prompt.key, prompt.task,
                               context_tokens=prompt.context_tokens)
        held = [torch.ones(1, *record.features[0].shape[:3], dtype=torch.bool)]
        for _, _, policy in policies:
            held.append(replay(record, policy, policy.params[None]) if policy.name == "namm"
                        else position_rule_held(record, policy))
        held = torch.cat(held)
        logits = continuation_logits(model, record, held)
        after = len(record.continuation)
        cache = ((held.float().mean((1, 2)).sum(-1) + after) / (record.seen + after)).tolist()
        stats = {name: answer_statistic(logits, record.answer, name).tolist() for name in STATISTICS}
        for i, key in enumerate([(None, "full")] + [(budget, label) for budget, label, _ in policies]):
            values.setdefault(key, []).append(({name: v[i] for name, v in stats.items()}, cache[i]))
        del record, logits
    return {key: ({name: torch.tensor([s[name] for s, _ in rows]) for name in STATISTICS},
                  sum(c for _, c in rows) / len(rows)) for key, rows in values.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, action="append",
                   help="budget-mode NAMM checkpoint (a run's best/, means/gen-NNNN or a name); repeat to compare several")
    p.add_argument("--model", default="smollm2-135m", help="model: registry name or path (default %(default)s)")
    p.add_argument("--tasks", default=TRAINING_TASKS,
                   help="comma-separated tasks (default: the campaign's training tasks, %(default)s)")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default %(default)s)")
    p.add_argument("--samples", type=int, default=4, help="prompts per task")
    p.add_argument("--seed", type=int, default=50,
                   help="seed of the prompts; keep it apart from the campaign's training seeds (default %(default)s)")
    p.add_argument("--budgets", default="0.25,0.5",
                   help="comma-separated budgets; 'threshold' runs the NAMM in threshold mode (default 0.25,0.5)")
    p.add_argument("--baselines", default=BASELINES, help="comma-separated baselines ('' for none)")
    p.add_argument("--fitness", choices=ANSWER_STATISTICS, default="loglik",
                   help="the answer statistic: loglik (mean log-probability) or margin (weakest token's margin)")
    p.add_argument("--question-after-compression", action="store_true",
                   help="query-agnostic: every policy compresses the context before the question is read")
    p.add_argument("--baseline-schedules", default=None,
                   help="comma-separated schedules to run every baseline on (progressive, prompt-end); "
                        "default: each baseline's own")
    p.add_argument("--namm-schedule", choices=SCHEDULES, default=None,
                   help="run every NAMM checkpoint on this schedule (default: the one it records)")
    p.add_argument("--evaluator", choices=("real", "recorded"), default="real",
                   help="real (default): every policy reads every prompt under real eviction; recorded: each "
                        "prompt (its context, with --question-after-compression) is read once with the full cache "
                        "and every policy compresses that recording once, then reads the rest and the answer "
                        "(exact for NAMMs and for baselines that read no queries, all on the prompt-end schedule; "
                        "several times faster)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--out", type=Path,
                   help="write the rows and per-prompt values to this JSON file, rewritten after every row "
                        "(default: print only)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = namm.load_model(args.model)
    tasks = args.tasks.split(",")
    samples = [(t, s) for t, name in enumerate(tasks)
               for s in get_task(name).samples(tokenizer, args.length, args.samples, seed=args.seed)]
    prompts = tokenize_samples(tokenizer, model, samples, args.question_after_compression)
    task_of = torch.tensor([p.task for p in prompts])

    checkpoints = {("namm" if len(args.checkpoint) == 1 else f"namm@{Path(c).name}"): c for c in args.checkpoint}
    budgets = [b if b == THRESHOLD else float(b) for b in args.budgets.split(",")]
    schedules = "prompt-end" if args.evaluator == "recorded" else args.baseline_schedules
    contenders = {budget: {**{label: namm.make_policy("namm", checkpoint=c, schedule=args.namm_schedule,
                                                      budget=None if budget == THRESHOLD else budget)
                              for label, c in checkpoints.items()},
                           **({} if budget == THRESHOLD else baselines(args.baselines, schedules, budget))}
                  for budget in budgets}
    start = time.perf_counter()
    if args.evaluator == "recorded":
        recorded = recorded_scores(model, prompts, contenders)

    def score(policy, label: str = "full", budget: float | None = None) -> tuple[dict[str, torch.Tensor], float]:
        """Per statistic, the (n,) values of every prompt; and the mean cache fraction."""
        if args.evaluator == "recorded":
            return recorded[(budget, label)]
        runs = [teacher_forced_logits(model, policy, [prompt])[0] for prompt in prompts]
        stats = {name: torch.tensor([float(answer_statistic(logits, p.answer_ids, name))
                                     for p, (logits, _) in zip(prompts, runs)]) for name in STATISTICS}
        return stats, sum(f for _, f in runs) / len(runs)

    full_stats, _ = score(namm.make_policy("full"))
    full = full_stats[args.fitness]
    result = {"checkpoint": args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint,
              "model": args.model, "tasks": tasks, "length": args.length, "samples": args.samples, "seed": args.seed,
              "fitness": args.fitness, "evaluator": args.evaluator,
              "protocol": "query-agnostic" if args.question_after_compression else "query-aware",
              "prompts": [p.key for p in prompts], "full_values": full.tolist(), "rows": [],
              "full": summary(full_stats)}
    width = max(10, *map(len, checkpoints))
    print(f"{'budget':>6} {'policy':>{width}} {'fitness':>8} {'cache':>6} {'exact':>6} {'tokens':>6}  per task")
    print(f"{'-':>6} {'full':>{width}} {0:>8.3f} {1:>6.3f} {result['full']['exact']:>6d} "
          f"{result['full']['accuracy']:>6.3f}")
    for budget, per_budget in contenders.items():
        for name, policy in per_budget.items():
            stats, cache = score(policy, name, budget)
            values = stats[args.fitness]
            fitness = float(answer_fitness(values[None], full, task_of)[0])
            gaps = by_task(values - full, task_of)
            per_task = [sum(g) / len(g) for g in gaps]
            row = {"budget": budget, "policy": name, "fitness": fitness,
                   "fitness_ci": bootstrap_interval(gaps), "cache_fraction": cache,
                   "per_task": dict(zip(tasks, per_task)), "values": values.tolist(),
                   "exact_values": (stats["margin"] > 0).int().tolist(), **summary(stats)}
            result["rows"].append(row)
            print(f"{budget_label(budget):>6} {name:>{width}} {fitness:>8.3f} {cache:>6.3f} {row['exact']:>6d} "
                  f"{row['accuracy']:>6.3f}  " + " ".join(f"{v:.2f}" for v in per_task), flush=True)
            result["paired"] = paired(result["rows"], task_of, args.fitness)
            result["seconds"] = time.perf_counter() - start
            if args.out:  # after every row, so a long run can be read (and stopped) midway
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("NAMM minus baseline, per prompt (bootstrap 95% intervals):")
    for d in result["paired"]:
        print(f"{budget_label(d['budget']):>6} {d['namm']} - {d['baseline']}: {args.fitness} "
              f"{d[f'{args.fitness}_difference']:+.3f} [{d[f'{args.fitness}_difference_ci'][0]:+.3f}, "
              f"{d[f'{args.fitness}_difference_ci'][1]:+.3f}]  exact {d['exact_difference']:+.3f} "
              f"[{d['exact_difference_ci'][0]:+.3f}, {d['exact_difference_ci'][1]:+.3f}]")


if __name__ == "__main__":
    main()
