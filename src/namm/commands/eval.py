"""``namm eval``: score a memory policy on a benchmark task or a LongBench-format JSONL file."""

from __future__ import annotations

import argparse
from pathlib import Path

from namm.commands.common import add_model_args, add_policy_args, policy_from_args, set_threads, writable_dir

PERPLEXITY = "perplexity"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a memory policy on a long-context task",
        description="Answer the samples of a task (or of a LongBench-format JSONL file) with a memory policy and "
                    "write OUT/metrics.json (score 0-100, cache fraction, KV bytes, tokens/s, wall time), "
                    "OUT/predictions.jsonl (one row per sample) and OUT/config.json. Rerunning with the same "
                    "arguments resumes: finished samples are skipped. Tasks: the offline synthetic suite (passkey, "
                    "niah_*, variable_tracking, common_words, frequent_words, kv_retrieval, multidoc_qa, "
                    "passage_retrieval), LongBench (longbench/NAME), InfiniteBench (infinitebench/NAME), ChouBun "
                    "(choubun/NAME) and 'perplexity' (held-out corpus text); see `namm eval --list-tasks`.")
    add_model_args(p)
    add_policy_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--task", help="task name (see --list-tasks)")
    source.add_argument("--data-file", help="LongBench-format JSONL file (fields: input, context, answers, optional "
                                            "all_classes, length, _id); needs --metric")
    source.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    p.add_argument("--metric", help="metric for --data-file (e.g. qa_f1, rouge, classification, retrieval, count, "
                                    "code_sim, string_match_all)")
    p.add_argument("--template", default=None,
                   help="with --data-file: the LongBench task whose prompt template to use (default: the rows' "
                        "'dataset' field when it names one, else a plain context + question prompt)")
    add_sample_args(p, samples=20)
    p.add_argument("--normalize", action="store_true",
                   help="also report the score as a percentage of the full-cache score (computed once per model "
                        "and sample set, then cached)")
    p.add_argument("--out", help="output folder (required unless --list-tasks)")
    p.set_defaults(run=run)


def add_sample_args(p: argparse.ArgumentParser, samples: int) -> None:
    """Arguments shared with ``namm compare``: length, sample count, seed, batch size, quiet."""
    p.add_argument("--length", type=int, default=2048,
                   help="prompt length in tokens for synthetic tasks and perplexity; truncation limit (middle "
                        "truncation) for dataset tasks (default 2048)")
    p.add_argument("--samples", type=int, default=samples,
                   help=f"samples per task (default {samples}; datasets: the first N rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic generators (default 0)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per forward batch (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_samples(args: argparse.Namespace, tokenizer) -> tuple[str, list]:
    """(task label, samples) for the task or data file the arguments name."""
    if args.data_file:
        from namm.tasks.longbench import samples_from_jsonl

        if not args.metric:
            raise ValueError("--data-file needs --metric")
        samples = samples_from_jsonl(args.data_file, args.metric, tokenizer, max_length=args.length,
                                     n=args.samples, template=args.template)
        return Path(args.data_file).stem, samples
    from namm.tasks import get_task

    if args.metric:
        raise ValueError("--metric goes with --data-file; a task brings its own metric")
    return args.task, get_task(args.task).samples(tokenizer, args.length, args.samples, seed=args.seed)


def check_args(args: argparse.Namespace) -> None:
    """Clear errors for bad arguments before any model is loaded."""
    from namm.tasks import task_names
    from namm.tasks.metrics import get_metric

    if not args.out:
        raise ValueError("--out is required")
    if not (args.task or args.data_file):
        raise ValueError("give --task or --data-file")
    if args.task and args.task != PERPLEXITY and args.task not in task_names():
        raise ValueError(f"unknown task {args.task!r}; choose one of: {', '.join(task_names() + [PERPLEXITY])}")
    if args.data_file and not Path(args.data_file).is_file():
        raise FileNotFoundError(f"no such file: {args.data_file}")
    if args.metric:
        get_metric(args.metric)
    for name in ("samples", "length", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


def run(args: argparse.Namespace) -> int:
    import namm
    from namm.eval.runner import evaluate

    if args.list_tasks:
        from namm.tasks import task_names

        print("\n".join(task_names() + [PERPLEXITY]))
        return 0
    check_args(args)
    set_threads(args)
    policy = policy_from_args(args)
    if args.task == PERPLEXITY:
        from namm.eval.perplexity import check_perplexity_policy

        check_perplexity_policy(policy)
    out = writable_dir(args.out)
    model, tokenizer = namm.load_model(args.model)
    extra = {"budget": args.budget, "checkpoint": args.checkpoint, "length": args.length, "seed": args.seed}
    if args.task == PERPLEXITY:
        metrics = run_perplexity(model, tokenizer, policy, args, out, extra)
    else:
        task, samples = load_samples(args, tokenizer)
        metrics = evaluate(model, tokenizer, policy, samples, out_dir=out, batch_size=args.batch_size,
                           progress=not args.quiet, task=task, model_name=args.model, extra=extra)
        if args.normalize or args.policy == "full":
            metrics = add_reference(metrics, model, tokenizer, samples, args, task, out)
    print(summary(metrics, out))
    return 0


def add_reference(metrics: dict, model, tokenizer, samples, args, task: str, out: Path) -> dict:
    """Attach the full-cache reference (cached; a full-policy run becomes the reference)."""
    from namm.eval.report import normalized_score, reference_metrics, store_reference
    from namm.eval.runner import METRICS, write_json

    if args.policy == "full" and not args.checkpoint:
        store_reference(args.model, samples, out)
    if not args.normalize:
        return metrics
    ref = reference_metrics(model, tokenizer, samples, args.model, task, args.batch_size, not args.quiet)
    metrics = {**metrics, "reference_score": ref["score"],
               "normalized_score": normalized_score(metrics["score"], ref["score"])}
    write_json(out / METRICS, metrics)
    return metrics


def run_perplexity(model, tokenizer, policy, args: argparse.Namespace, out: Path, extra: dict) -> dict:
    """Perplexity of ``--length`` held-out corpus tokens under the policy."""
    from namm.eval.perplexity import evaluate_perplexity
    from namm.eval.runner import CONFIG, METRICS, policy_label, write_json
    from namm.tasks.corpus import corpus_tokens

    tokens = corpus_tokens(tokenizer, args.length, "heldout", args.seed)
    label = policy_label(policy)
    write_json(out / CONFIG, {"task": PERPLEXITY, "model": args.model, "policy": label["policy"],
                              "policy_config": label, **extra})
    result = evaluate_perplexity(model, tokens, policy, chunk_size=128, progress=not args.quiet)
    metrics = {"task": PERPLEXITY, "policy": label["policy"], "model": args.model, "n": 1, **result,
               "policy_config": label, **extra}
    write_json(out / METRICS, metrics)
    return metrics


def summary(metrics: dict, out: Path) -> str:
    """One readable paragraph of the main numbers."""
    head = f"{metrics['task']} · {metrics['policy']} on {metrics['model']}"
    if metrics["task"] == PERPLEXITY:
        return (f"{head}: perplexity {metrics['perplexity']:.3f} over {metrics.get('tokens')} tokens, cache fraction "
                f"{metrics.get('cache_fraction', 1.0):.3f}\nwrote {out / 'metrics.json'}")
    lines = [f"{head}: score {metrics['score']:.1f} (n={metrics['n']})"]
    if metrics.get("normalized_score") is not None:
        lines.append(f"normalised score {metrics['normalized_score']:.1f}% of full cache ({metrics['reference_score']:.1f})")
    lines.append(f"cache fraction {metrics['cache_fraction']:.3f}, KV peak {metrics['kv_bytes_peak'] / 2**20:.1f} MiB "
                 f"of {metrics['kv_bytes_full_peak'] / 2**20:.1f} MiB full")
    lines.append(f"prefill {metrics['prefill_tokens_per_s']:.0f} tok/s, decode {metrics['decode_tokens_per_s']:.1f} tok/s, "
                 f"wall {metrics['wall_s']:.1f} s")
    lines.append(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")
    return "\n".join(lines)
