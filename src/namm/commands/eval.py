"""``namm eval``: score a memory policy on a benchmark task or a LongBench-format JSONL file."""

from __future__ import annotations

import argparse
from pathlib import Path

from namm.commands.common import (
    add_model_args, add_policy_args, load_model_from_args, locked_output_dir, policy_from_args, set_threads,
    show_progress,
)

PERPLEXITY = "perplexity"
DEFAULT_LENGTH = 2048  # synthetic prompts and perplexity sequences


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a memory policy on a long-context task",
        description="Answer the samples of a task (or of a LongBench-format JSONL file) with a memory policy and "
                    "write OUT/metrics.json (score 0-100, cache fraction, KV bytes, tokens/s, wall time), "
                    "OUT/predictions.jsonl (one row per sample) and OUT/config.json. Rerunning with the same "
                    "arguments resumes: finished samples are skipped. Tasks: the offline synthetic suite (passkey, "
                    "niah_*, variable_tracking, common_words, frequent_words, kv_retrieval, multidoc_qa, "
                    "passage_retrieval), LongBench (longbench/NAME), InfiniteBench (infinitebench/NAME), ChouBun "
                    "(choubun/NAME) and 'perplexity' (held-out corpus text); see `namm eval --list-tasks`. "
                    "--question-after-compression runs the query-agnostic protocol (kvpress's): the context is "
                    "compressed before the question is seen.")
    add_model_args(p)
    add_policy_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--task", help="task name (see --list-tasks)")
    source.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    add_data_file_args(p, source)
    add_sample_args(p, samples=20)
    p.add_argument("--normalize", action="store_true",
                   help="also report the score as a percentage of the full-cache score (computed once per model "
                        "and sample set, then cached)")
    p.add_argument("--out", help="output folder (required unless --list-tasks)")
    p.set_defaults(run=run)


def add_data_file_args(p: argparse.ArgumentParser, source) -> None:
    """``--data-file`` (into the ``source`` group of mutually exclusive inputs), ``--metric`` and
    ``--template``: shared with ``namm compare``."""
    source.add_argument("--data-file", help="LongBench-format JSONL file (fields: input, context, answers, optional "
                                            "all_classes, length, _id); needs --metric")
    p.add_argument("--metric", help="metric for --data-file (e.g. qa_f1, rouge, classification, retrieval, count, "
                                    "code_sim, string_match_all)")
    p.add_argument("--template", default=None,
                   help="with --data-file: the LongBench task whose prompt template to use, or a format string over "
                        "the rows' fields such as '{context}\\n\\n{input}' (\\n and \\t read as newline and tab); "
                        "default: the rows' 'dataset' field when it names a task, else a plain context + question "
                        "prompt. The part after {context} is the question of --question-after-compression")


def add_sample_args(p: argparse.ArgumentParser, samples: int) -> None:
    """Arguments shared with ``namm compare``: length, sample count, seed, batch size, protocol, quiet."""
    p.add_argument("--length", type=int, default=None,
                   help=f"prompt length in tokens for synthetic tasks and perplexity (default {DEFAULT_LENGTH}); "
                        "truncation limit (middle truncation) for dataset tasks and --data-file (default: the "
                        "model's context minus the answer length; the prompts cut are counted)")
    p.add_argument("--samples", type=int, default=samples,
                   help=f"samples per task (default {samples}; datasets: the first N rows; perplexity: N held-out "
                        "sequences of --length tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic generators (default 0)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per forward batch (default 1)")
    p.add_argument("--question-after-compression", action="store_true",
                   help="query-agnostic protocol: prefill the context, compress it once with every policy (whatever "
                        "its schedule), then feed the question with no compression before the answer's first "
                        "token. Default: query-aware (the whole prompt, question included, is read first)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_samples(args: argparse.Namespace, tokenizer, context: int,
                 task: str | None = None) -> tuple[str, list, int | None]:
    """(task label, samples, length) for ``task`` (default ``--task``) or, without one, the data
    file the arguments name. ``context``: the model's context, the default length limit of dataset
    prompts (minus the answer length; a data file's length is then None: it depends on each row's
    template)."""
    if task is None and args.data_file:
        from namm.tasks.longbench import samples_from_jsonl

        samples = samples_from_jsonl(args.data_file, args.metric, tokenizer, max_length=args.length,
                                     n=args.samples, template=cli_template(args.template), model_context=context)
        return Path(args.data_file).stem, samples, args.length
    from namm.tasks import get_task
    from namm.tasks.longbench import DatasetTask

    name = task or args.task
    chosen = get_task(name)
    length = args.length or (context - chosen.spec["max_new_tokens"] if isinstance(chosen, DatasetTask)
                             else DEFAULT_LENGTH)
    return name, chosen.samples(tokenizer, length, args.samples, seed=args.seed), length


def cut_note(samples: list) -> str:
    """A line saying how many prompts were cut to fit their length limit (empty when none was)."""
    cut = sum(s.truncated for s in samples)
    if not cut:
        return ""
    return f"{cut} of {len(samples)} prompts were longer than the length limit and were cut in the middle"


def cli_template(text: str | None) -> str | None:
    """A --template as typed in a shell: the two characters \\n and \\t read as newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t") if text else None


def check_data_file_args(args: argparse.Namespace) -> None:
    """Clear errors for --data-file, --metric and --template before any model is loaded."""
    from namm.tasks.longbench import template_spec
    from namm.tasks.metrics import get_metric

    if args.data_file:
        if not Path(args.data_file).is_file():
            raise FileNotFoundError(f"no such file: {args.data_file}")
        if not args.metric:
            raise ValueError("--data-file needs --metric")
        get_metric(args.metric)
        template_spec(cli_template(args.template), {})
    elif args.metric or args.template:
        raise ValueError("--metric and --template go with --data-file; a task brings its own")


def check_args(args: argparse.Namespace) -> None:
    """Clear errors for bad arguments before any model is loaded."""
    from namm.tasks import task_names

    if not args.out:
        raise ValueError("--out is required")
    if not (args.task or args.data_file):
        raise ValueError("give --task or --data-file")
    if args.task and args.task != PERPLEXITY and args.task not in task_names():
        raise ValueError(f"unknown task {args.task!r}; choose one of: {', '.join(task_names() + [PERPLEXITY])}")
    check_data_file_args(args)
    for name in ("samples", "length", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.task == PERPLEXITY and args.question_after_compression:
        raise ValueError("perplexity reads a text with no question; drop --question-after-compression")


def run(args: argparse.Namespace) -> int:
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
    with locked_output_dir(args.out) as out:
        return evaluate_into(args, policy, out)


def evaluate_into(args: argparse.Namespace, policy, out: Path) -> int:
    """Run the evaluation (task or perplexity) and write its files into ``out``."""
    from namm.eval.runner import evaluate
    from namm.memory.generation import model_context

    model, tokenizer = load_model_from_args(args)
    extra = {"budget": args.budget, "checkpoint": args.checkpoint, "seed": args.seed}
    if args.task == PERPLEXITY:
        extra["length"] = args.length or DEFAULT_LENGTH
        metrics = run_perplexity(model, tokenizer, policy, args, out, extra)
    else:
        task, samples, length = load_samples(args, tokenizer, model_context(model))
        metrics = evaluate(model, tokenizer, policy, samples, out_dir=out, batch_size=args.batch_size,
                           progress=show_progress(args), task=task, model_name=args.model,
                           extra={**extra, "length": length, "prompts_cut": sum(s.truncated for s in samples)},
                           question_after_compression=args.question_after_compression)
        if args.normalize or args.policy == "full":
            metrics = add_reference(metrics, model, tokenizer, samples, args, task, out)
        note = cut_note(samples)
        if note:
            print(note)
    print(summary(metrics, out))
    return 0


def add_reference(metrics: dict, model, tokenizer, samples, args, task: str, out: Path) -> dict:
    """Attach the full-cache reference (cached; a full-policy run becomes the reference)."""
    from namm.eval.report import normalized_score, reference_metrics, store_reference
    from namm.eval.runner import METRICS, write_json

    if args.policy == "full" and not args.checkpoint and not args.question_after_compression:
        store_reference(args.model, model, samples, out)
    if not args.normalize:
        return metrics
    ref = reference_metrics(model, tokenizer, samples, args.model, task, args.batch_size, show_progress(args))
    metrics = {**metrics, "reference_score": ref["score"],
               "normalized_score": normalized_score(metrics["score"], ref["score"])}
    write_json(out / METRICS, metrics)
    return metrics


def run_perplexity(model, tokenizer, policy, args: argparse.Namespace, out: Path, extra: dict) -> dict:
    """Perplexity of ``--samples`` disjoint held-out corpus sequences of ``extra["length"]`` tokens
    (consecutive slices of the split) under the policy."""
    from namm.eval.perplexity import evaluate_perplexity_over
    from namm.eval.runner import CONFIG, METRICS, policy_label, write_json
    from namm.tasks.corpus import corpus_tokens

    length = extra["length"]
    tokens = corpus_tokens(tokenizer, args.samples * length, "heldout", args.seed)
    label = policy_label(policy)
    write_json(out / CONFIG, {"task": PERPLEXITY, "model": args.model, "policy": label["policy"],
                              "policy_config": label, **extra})
    result = evaluate_perplexity_over(model, list(tokens.view(args.samples, length)), policy, chunk_size=128,
                                      progress=show_progress(args))
    metrics = {"task": PERPLEXITY, "policy": label["policy"], "model": args.model, **result,
               "policy_config": label, **extra}
    write_json(out / METRICS, metrics)
    return metrics


def memory_line(metrics: dict) -> str:
    """KV peak, LESS state and their total as a fraction of the full cache."""
    return (f"memory: KV peak {metrics['kv_bytes_peak'] / 2**20:.2f} MiB + LESS state "
            f"{metrics['less_state_bytes'] / 2**10:.1f} KiB of {metrics['kv_bytes_full_peak'] / 2**20:.2f} MiB full "
            f"(peak memory fraction {metrics['memory_fraction_peak']:.4f})")


def summary(metrics: dict, out: Path) -> str:
    """One readable paragraph of the main numbers."""
    head = f"{metrics['task']} · {metrics['policy']} on {metrics['model']}"
    if metrics["task"] == PERPLEXITY:
        return (f"{head}: perplexity {metrics['perplexity']:.3f} over {metrics['n']} sequences "
                f"({metrics['tokens']} tokens scored), cache fraction {metrics['cache_fraction']:.3f}\n"
                f"{memory_line(metrics)}\nwrote {out / 'metrics.json'}")
    low, high = metrics["score_ci"]
    lines = [f"{head} ({metrics['protocol']}): score {metrics['score']:.1f} [95% CI {low:.1f}, {high:.1f}] "
             f"(n={metrics['n']})"]
    if metrics.get("normalized_score") is not None:
        lines.append(f"normalised score {metrics['normalized_score']:.1f}% of full cache ({metrics['reference_score']:.1f})")
    lines.append(f"KV fraction {metrics['kv_fraction']:.3f} (peak {metrics['kv_fraction_peak']:.3f}); "
                 + memory_line(metrics))
    lines.append(f"prefill {metrics['prefill_tokens_per_s']:.0f} tok/s, decode {metrics['decode_tokens_per_s']:.1f} tok/s, "
                 f"wall {metrics['wall_s']:.1f} s")
    lines.append(f"wrote {out / 'metrics.json'} and {out / 'predictions.jsonl'}")
    return "\n".join(lines)
