"""``namm calibrate``: measure the NAMM normalisation statistics of a model and save them as a
(zero-parameter) NAMM checkpoint, the starting point of evolution."""

from __future__ import annotations

import argparse
from pathlib import Path

from namm.commands.common import add_model_args, load_model_from_args, read_text_file, set_threads, show_progress


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate NAMM feature normalisation on a model",
        description="Run the keep-everything NAMM feature pipeline over a task's prompts (or prompt files), pool the "
                    "mean and std of the attention-spectrogram EMA per frequency bin over layers, heads, tokens, "
                    "updates and prompts, and save them with all-zero scorer parameters as a NAMM checkpoint "
                    "(OUT.json + OUT.safetensors, or OUT/namm.* for a folder). Use it with "
                    "`--policy namm --checkpoint OUT.json` or as the start of `namm evolve`.")
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="task whose prompts to use (see `namm eval --list-tasks`)")
    source.add_argument("--prompt-file", nargs="+", help="text file(s), one prompt each")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens for --task (default 2048)")
    p.add_argument("--samples", type=int, default=8, help="number of task prompts (default 8)")
    p.add_argument("--seed", type=int, default=0, help="task sampling seed (default 0)")
    p.add_argument("--n-up", type=int, default=512, help="tokens between memory updates (default 512)")
    p.add_argument("--end-pad", type=int, default=0,
                   help="zeros appended to each attention signal before the STFT, so the newest queries fall "
                        "under a full window (default 0, the paper; 16 weighs every query alike)")
    p.add_argument("--robust", action="store_true",
                   help="centre each bin at its median and scale it by its interquartile range / 1.349 instead of "
                        "the mean and std, so the few attention sinks do not set the scale of every other token "
                        "(namm's addition, docs/algorithm.md §4; default: mean and std, the paper)")
    p.add_argument("--scorer", default="bam", choices=["bam", "mlp"], help="scorer architecture of the checkpoint")
    p.add_argument("--out", required=True, help="checkpoint path: FILE.json / FILE.safetensors, or a folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def task_prompts(args: argparse.Namespace, tokenizer) -> list[str]:
    from namm.tasks import get_task, task_names

    if args.task not in task_names():
        raise ValueError(f"unknown task {args.task!r}; choose one of: {', '.join(task_names())}")
    return [s.prompt for s in get_task(args.task).samples(tokenizer, args.length, args.samples, seed=args.seed)]


def run(args: argparse.Namespace) -> int:
    import namm
    from namm.memory.generation import model_context, tokenize_prompts
    from namm.policies.namm.calibration import calibrate_normalization
    from namm.policies.namm.checkpoint import namm_config, save_namm_checkpoint
    from namm.policies.namm.features import FeatureConfig

    set_threads(args)
    features = FeatureConfig(n_up=args.n_up, end_pad=args.end_pad)
    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    texts = [read_text_file(f) for f in args.prompt_file] if args.prompt_file else None
    model, tokenizer = load_model_from_args(args)
    texts = texts if texts is not None else task_prompts(args, tokenizer)
    ids = tokenize_prompts(tokenizer, texts, model_context(model))
    if all(len(x) < args.n_up for x in ids):
        raise ValueError(f"every prompt is shorter than --n-up {args.n_up} tokens: nothing to calibrate on")
    mean, std = calibrate_normalization(model, ids, features=features, progress=show_progress(args),
                                       robust=args.robust)
    provenance = {
        "kind": "calibration", "model": args.model, "namm_version": namm.__version__,
        "task": args.task, "length": args.length if args.task else None, "seed": args.seed if args.task else None,
        "prompt_files": [str(Path(f)) for f in args.prompt_file] if args.prompt_file else None,
        "prompts": len(ids), "prompt_tokens": int(sum(len(x) for x in ids)),
        "statistics": "median, IQR / 1.349" if args.robust else "mean, std",
    }
    path = save_namm_checkpoint(args.out, params=namm.make_policy("namm", checkpoint="zeros", scorer=args.scorer).params, mean=mean,
                                std=std, config=namm_config(features, args.scorer), provenance=provenance)
    print(f"calibrated on {len(ids)} prompts ({provenance['prompt_tokens']} tokens) of {args.model}; saved {path}")
    print("bin   median      IQR/1.349" if args.robust else "bin   mean        std")
    for k, (m, s) in enumerate(zip(mean.tolist(), std.tolist())):
        print(f"{k:>3}  {m:.6g}  {s:.6g}")
    return 0
