"""``namm compare``: several policies x budgets x tasks in one command -> a table and a plot."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from namm.commands.common import add_model_args, add_schedule_arg, policy_from_args, set_threads, writable_dir
from namm.commands.eval import add_sample_args

DEFAULT_POLICIES = "full,recency,streaming,h2o,l2,snapkv,tova"
DEFAULT_TASKS = "passkey,niah_single,kv_retrieval"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare memory policies across budgets and tasks",
        description="Evaluate every policy at every budget on every task (policies without a budget, such as "
                    "full and namm, run once per task), then write OUT/results.md (markdown table: raw and "
                    "normalised score, schedule, mean cache fraction, KV bytes, tokens/s), OUT/results.json and "
                    "OUT/score_vs_cache.png. Each run lives in OUT/runs/TASK/POLICY[-BUDGET][-SCHEDULE] and resumes when "
                    "the command is rerun; full-cache reference scores are cached and reused.")
    add_model_args(p)
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated policies (default: {DEFAULT_POLICIES})")
    p.add_argument("--budgets", default="0.25,0.5", help="comma-separated budgets for baselines (default: 0.25,0.5)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated tasks (default: {DEFAULT_TASKS})")
    p.add_argument("--checkpoint", default=None, help="NAMM checkpoint for policy namm (default: the policy's own)")
    p.add_argument("--n-up", type=int, default=None, help="tokens between memory updates (default 512)")
    add_schedule_arg(p)
    add_sample_args(p, samples=10)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=run)


def split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    return list(dict.fromkeys(items))


def accepts(policy: str, **option) -> bool:
    """Whether a registered policy takes an option (baselines take a budget; full and namm do not)."""
    from namm.policies.base import make_policy

    try:
        make_policy(policy, **option)
    except TypeError:
        return False
    return True


def plan(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """Every (task, policy, budget) to run, validated before any model is loaded."""
    from namm.policies.base import Budget, policy_names
    from namm.tasks import task_names

    policies, tasks = split_list(args.policies, "policies"), split_list(args.tasks, "tasks")
    budgets = split_list(args.budgets, "budgets")
    for b in budgets:
        Budget(b)
    for p in policies:
        if p not in policy_names():
            raise ValueError(f"unknown policy {p!r}; choose one of: {', '.join(policy_names())}")
    for t in tasks:
        if t not in task_names():
            raise ValueError(f"unknown task {t!r}; choose one of: {', '.join(task_names())}")
    if args.samples < 1 or args.length < 1 or args.batch_size < 1:
        raise ValueError("--samples, --length and --batch-size must be >= 1")
    runs = []
    for t in tasks:
        for p in policies:
            for b in (budgets if accepts(p, budget=0.5) else [None]):
                runs.append((t, p, b))
    return runs


def build_policy(args: argparse.Namespace, policy: str, budget: str | None):
    n_up = args.n_up if args.n_up is not None and accepts(policy, n_up=args.n_up) else None
    options = argparse.Namespace(policy=policy, budget=budget, n_up=n_up, schedule=args.schedule,
                                 checkpoint=args.checkpoint if policy == "namm" else None)
    return policy_from_args(options)


def run(args: argparse.Namespace) -> int:
    import namm
    from namm.eval.plots import plot_score_vs_cache
    from namm.eval.report import markdown_table, mean_rows, normalized_score, reference_metrics, store_reference
    from namm.eval.runner import evaluate
    from namm.tasks import get_task

    runs = plan(args)
    out = writable_dir(args.out)
    set_threads(args)
    model, tokenizer = namm.load_model(args.model)
    rows, references = [], {}
    for task, policy_name, budget in runs:
        if task not in references:
            samples = get_task(task).samples(tokenizer, args.length, args.samples, seed=args.seed)
            references[task] = samples
        samples = references[task]
        policy = build_policy(args, policy_name, budget)
        name = policy_name if budget is None else f"{policy_name}-{budget}"
        run_dir = out / "runs" / task / (f"{name}-{args.schedule}" if args.schedule and policy.evicts else name)
        metrics = evaluate(model, tokenizer, policy, samples, out_dir=run_dir, batch_size=args.batch_size,
                           progress=not args.quiet, task=task, model_name=args.model,
                           extra={"budget": budget, "length": args.length, "seed": args.seed})
        if policy_name == "full":
            store_reference(args.model, samples, run_dir)
        rows.append(metrics)
    for row in rows:
        ref = reference_metrics(model, tokenizer, references[row["task"]], args.model, row["task"],
                                args.batch_size, not args.quiet)
        row["reference_score"] = ref["score"]
        row["normalized_score"] = normalized_score(row["score"], ref["score"])
    write_results(args, out, rows, markdown_table, mean_rows, plot_score_vs_cache)
    return 0


def write_results(args, out: Path, rows: list[dict], markdown_table, mean_rows, plot) -> None:
    means = mean_rows(rows)
    command = "namm compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["compare"] else ""
    text = [
        f"# Memory policies compared on {args.model}",
        "",
        f"{args.samples} samples per task, prompts of {args.length} tokens (seed {args.seed}); score 0-100; "
        "normalised = score as % of the full-cache score on the same samples; cache fraction = retained / seen "
        "tokens at the end of generation, averaged over layers and samples; KV MiB = peak KV-cache bytes per "
        "sample (mean); tokens/s measured on this machine during the run.",
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
         title=f"{args.model}: score vs cache fraction ({args.length} tokens, n={args.samples} per task)")
    print("\n".join(text[:-3]))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'score_vs_cache.png'}")
