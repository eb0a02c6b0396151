"""``namm compare``: several policies x budgets x tasks in one command -> a table and a plot."""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
from pathlib import Path

from namm.commands.common import (
    add_model_args, add_schedule_arg, load_model_from_args, locked_output_dir, policy_from_args, set_threads,
    show_progress,
)
from namm.commands.eval import add_data_file_args, add_sample_args, check_data_file_args, cut_note, load_samples

DEFAULT_POLICIES = "full,recency,streaming,h2o,l2,snapkv,tova"
DEFAULT_TASKS = "passkey,niah_single,kv_retrieval"
DEFAULT_BUDGETS = "0.25,0.5"
MATCHED = "matched"  # plan placeholder: the budget measured on the --match-cache policy's run of the task


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare memory policies across budgets and tasks",
        description="Evaluate every policy at every budget on every task (policies without a budget, such as "
                    "full, run once per task), then write OUT/results.md (markdown table: score with a bootstrap "
                    "95% interval, normalised score, schedule, protocol, mean and peak KV fraction, KV bytes, "
                    "tokens/s), OUT/results.json and OUT/score_vs_cache.png. Each run lives in "
                    "OUT/runs/TASK/POLICY[-BUDGET][-SCHEDULE][-query-agnostic] and resumes when the command is "
                    "rerun; full-cache reference scores are cached and reused. --match-cache POLICY compares at "
                    "equal memory: every other policy runs at POLICY's measured mean KV fraction on each task. Runs of a "
                    "task that compress only after the prompt (the prompt-end schedule, without LESS) or never "
                    "(full) share one prefill per batch: the same answers as run one by one, in a fraction of the "
                    "time (their tokens/s count the whole shared prefill).")
    add_model_args(p)
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated policies (default: {DEFAULT_POLICIES})")
    p.add_argument("--budgets", default=None,
                   help=f"comma-separated budgets for baselines (default: {DEFAULT_BUDGETS})")
    p.add_argument("--match-cache", default=None, metavar="POLICY",
                   help="run POLICY first on each task (on its own settings, e.g. namm in threshold mode), then "
                        "every other policy that takes a budget at POLICY's measured mean KV fraction on that task "
                        "(replaces --budgets)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--tasks", default=None, help=f"comma-separated tasks (default: {DEFAULT_TASKS})")
    add_data_file_args(p, source)
    p.add_argument("--checkpoint", default=None, help="NAMM checkpoint for policy namm (default: the policy's own)")
    p.add_argument("--n-up", type=int, default=None, help="tokens between memory updates (default 512)")
    p.add_argument("--less", default=None,
                   help="add LESS (shipped kernels name or a `namm less-train` path) to every policy but full")
    add_schedule_arg(p)
    add_sample_args(p, samples=10)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=run)


def split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    return list(dict.fromkeys(items))


def accepts(policy: str, option: str) -> bool:
    """Whether a registered policy's constructor takes ``option`` (the baselines and namm take a
    budget, full does not), read off its signature: no policy is built and no checkpoint loaded."""
    from namm.policies.registry import policy_class

    return option in inspect.signature(policy_class(policy)).parameters


def plan(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """Every (task, policy, budget) to run, validated before any model is loaded. The full cache
    runs first on each task (its answers are the reference every later row is normalised by, so they
    are computed once); with ``--match-cache`` the matched policy comes next and the others' budget
    is :data:`MATCHED`; with ``--data-file`` the one task is the file's stem."""
    from namm.policies.budget import Budget
    from namm.policies.registry import policy_names
    from namm.tasks import task_names

    policies = split_list(args.policies, "policies")
    if args.match_cache:
        if args.budgets:
            raise ValueError("--match-cache measures the budgets; drop --budgets")
        policies = [args.match_cache] + [p for p in policies if p != args.match_cache]
        budgets = [MATCHED]
    else:
        budgets = split_list(args.budgets or DEFAULT_BUDGETS, "budgets")
        for b in budgets:
            Budget(b)
    policies = sorted(policies, key=lambda p: p != "full")  # stable: the others keep their order
    for p in policies:
        if p not in policy_names():
            raise ValueError(f"unknown policy {p!r}; choose one of: {', '.join(policy_names())}")
    check_data_file_args(args)
    tasks = [Path(args.data_file).stem] if args.data_file else split_list(args.tasks or DEFAULT_TASKS, "tasks")
    for t in tasks if not args.data_file else []:
        if t not in task_names():
            raise ValueError(f"unknown task {t!r}; choose one of: {', '.join(task_names())}")
    if args.samples < 1 or (args.length is not None and args.length < 1) or args.batch_size < 1:
        raise ValueError("--samples, --length and --batch-size must be >= 1")
    runs = []
    for t in tasks:
        for p in policies:
            for b in (budgets if p != args.match_cache and accepts(p, "budget") else [None]):
                runs.append((t, p, b))
    return runs


def matched_budget(kv_fraction: float) -> str:
    """The budget, as a string of four decimals in (0, 1], that holds a measured mean KV fraction."""
    return f"{min(max(kv_fraction, 1e-4), 1.0):.4f}"


def run_name(args: argparse.Namespace, policy, budget: str | None) -> str:
    """The folder of one run: POLICY[-BUDGET][-SCHEDULE][-query-agnostic]."""
    parts = [policy.name] + ([budget] if budget else []) + ([args.schedule] if args.schedule and policy.evicts else [])
    return "-".join(parts + (["query-agnostic"] if args.question_after_compression else []))


def build_policy(args: argparse.Namespace, policy: str, budget: str | None):
    n_up = args.n_up if args.n_up is not None and accepts(policy, "n_up") else None
    options = argparse.Namespace(policy=policy, budget=budget, n_up=n_up, schedule=args.schedule,
                                 checkpoint=args.checkpoint if policy == "namm" else None,
                                 less=args.less if policy != "full" else None)
    return policy_from_args(options)


def resolve_run(args: argparse.Namespace, policy_name: str, budget: str | None, matched: str | None):
    """(policy, budget used, policy matched to) of one planned run; a :data:`MATCHED` budget takes
    the ``matched`` one measured on the task."""
    matched_to = args.match_cache if budget == MATCHED else None
    used = matched if matched_to else budget
    return build_policy(args, policy_name, used), used, matched_to


def run(args: argparse.Namespace) -> int:
    runs = plan(args)
    with locked_output_dir(args.out) as out:
        return run_plan(args, runs, out)


def run_plan(args: argparse.Namespace, runs: list[tuple[str, str, str | None]], out: Path) -> int:
    """Evaluate every planned (task, policy, budget); the tables and the plot are rewritten after
    each finished run, so a stopped command leaves the table of what it finished."""
    from namm.eval.plots import plot_score_vs_cache
    from namm.eval.report import markdown_table, mean_rows, normalized_score, reference_metrics, store_reference
    from namm.eval.runner import PREDICTIONS, evaluate_shared, read_predictions
    from namm.memory.generation import model_context, prefill_shareable

    set_threads(args)
    model, tokenizer = load_model_from_args(args)
    rows, references, matched = [], {}, {}
    pending = list(runs)
    while pending:
        task, policy_name, budget = pending.pop(0)
        if task not in references:
            _, references[task], _ = load_samples(args, tokenizer, model_context(model),
                                                  None if args.data_file else task)
            note = cut_note(references[task])
            if note:
                print(f"{task}: {note}")
        samples = references[task]
        group = [resolve_run(args, policy_name, budget, matched.get(task))]
        if prefill_shareable(group[0][0]):  # later runs of the task that compress after the prompt (or never)
            for item in [r for r in pending if r[0] == task and r[1] != args.match_cache]:
                if item[2] != MATCHED or task in matched:
                    run_item = resolve_run(args, item[1], item[2], matched.get(task))
                    if prefill_shareable(run_item[0]):
                        group.append(run_item)
                        pending.remove(item)
        dirs = [out / "runs" / task / run_name(args, policy, used) for policy, used, _ in group]
        extras = [{"budget": used, "matched_to": matched_to, "length": args.length, "seed": args.seed,
                   "prompts_cut": sum(s.truncated for s in samples)} for _, used, matched_to in group]
        results = evaluate_shared(model, tokenizer, [policy for policy, _, _ in group], samples, dirs,
                                  batch_size=args.batch_size, progress=show_progress(args), task=task,
                                  model_name=args.model, extras=extras,
                                  question_after_compression=args.question_after_compression)
        for (policy, _, _), run_dir, metrics in zip(group, dirs, results):
            if policy.name == args.match_cache:
                matched[task] = matched_budget(metrics["kv_fraction"])
            if policy.name == "full" and not args.question_after_compression:
                store_reference(args.model, model, samples, run_dir)
            done = read_predictions(run_dir / PREDICTIONS)
            ref = reference_metrics(model, tokenizer, samples, args.model, task, args.batch_size, show_progress(args))
            rows.append({**metrics, "sample_scores": [100.0 * done[s.id]["score"] for s in samples],
                         "reference_score": ref["score"],
                         "normalized_score": normalized_score(metrics["score"], ref["score"])})
        text = write_results(args, out, rows, markdown_table, mean_rows, plot_score_vs_cache)
    print("\n".join(text[:-3]))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'score_vs_cache.png'}")
    return 0


def write_results(args, out: Path, rows: list[dict], markdown_table, mean_rows, plot) -> list[str]:
    """Write results.md, results.json and the plot of ``rows``; returns the lines of results.md."""
    means = mean_rows(rows)
    command = "namm compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["compare"] else ""
    protocol = "query-agnostic" if args.question_after_compression else "query-aware"
    length = f"{args.length} tokens" if args.length else "default length"
    matching = (f" Every policy that takes a budget ran at {args.match_cache}'s measured mean KV fraction on each "
                "task (budget column: the budget used)." if args.match_cache else "")
    text = [
        f"# Memory policies compared on {args.model}",
        "",
        f"{args.samples} samples per task, prompts of {length} (seed {args.seed}), {protocol} protocol; score "
        "0-100 with a percentile bootstrap 95% interval over samples (1000 resamples; mean rows resample each task "
        "on its own); normalised = score as % of the full-cache score on the same samples; KV fraction = KV bytes "
        "held / full-cache KV bytes right after each compression (what a budget bounds; mean over compressions and "
        "samples), peak = the largest peak KV bytes / full-cache KV bytes of any sample; KV MiB = peak KV-cache "
        f"bytes per sample (mean); tokens/s measured on this machine during the run.{matching}",
        "",
        f"Reproduce: `{command}`" if command else "",
        "",
        "## Mean over tasks",
        "",
        markdown_table(means),
        "",
        "## Per task",
        "",
        markdown_table(rows),
        "",
        "![score vs cache fraction](score_vs_cache.png)",
        "",
    ]
    (out / "results.md").write_text("\n".join(text), encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"rows": rows, "mean": means}, indent=2) + "\n", encoding="utf-8")
    plot(rows + means, out / "score_vs_cache.png",
         title=f"{args.model}: score vs cache fraction ({length}, n={args.samples} per task)")
    return text
