"""``namm calibrate``: measure the NAMM normalisation statistics of a model and save them as a
(zero-parameter) NAMM checkpoint, the starting point of evolution; with ``--checkpoint``, give an
existing NAMM the statistics of another model (docs/algorithm.md §11)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from namm.commands.common import add_model_args, load_model_from_args, read_text_file, set_threads, show_progress

if TYPE_CHECKING:
    from torch import Tensor

    from namm.policies.namm.checkpoint import NAMMCheckpoint


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate NAMM feature normalisation on a model",
        description="Run the keep-everything NAMM feature pipeline over a task's prompts (or prompt files), pool the "
                    "mean and std of the attention-spectrogram EMA per frequency bin over layers, heads, tokens, "
                    "updates and prompts, and save them with all-zero scorer parameters as a NAMM checkpoint "
                    "(OUT.json + OUT.safetensors, or OUT/namm.* for a folder). Use it with "
                    "`--policy namm --checkpoint OUT.json` or as the start of `namm evolve`. With --checkpoint SRC, "
                    "keep SRC's scorer, selection (score cut, pool, mode) and feature settings and replace only its "
                    "statistics by this model's, so that threshold mode applies SRC's score cut in this model's "
                    "feature scale (transfer, docs/algorithm.md §11).")
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="task whose prompts to use (see `namm eval --list-tasks`)")
    source.add_argument("--prompt-file", nargs="+", help="text file(s), one prompt each")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens for --task (default 2048)")
    p.add_argument("--samples", type=int, default=8, help="number of task prompts (default 8)")
    p.add_argument("--seed", type=int, default=0, help="task sampling seed (default 0)")
    p.add_argument("--checkpoint",
                   help="an existing NAMM (shipped name or path) to re-calibrate for this model: its scorer, "
                        "selection and feature settings are kept, its statistics replaced (then --n-up, --end-pad "
                        "and --scorer come from it, and --robust defaults to the kind of statistics it records)")
    p.add_argument("--n-up", type=int, default=None, help="tokens between memory updates (default 512)")
    p.add_argument("--end-pad", type=int, default=None,
                   help="zeros appended to each attention signal before the STFT, so the newest queries fall "
                        "under a full window (default 0, the paper; 16 weighs every query alike)")
    p.add_argument("--robust", action="store_true", default=None,
                   help="centre each bin at its median and scale it by its interquartile range / 1.349 instead of "
                        "the mean and std, so the few attention sinks do not set the scale of every other token "
                        "(namm's addition, docs/algorithm.md §4; default: mean and std, the paper)")
    p.add_argument("--scorer", default=None, choices=["bam", "mlp"],
                   help="scorer architecture of the checkpoint (default bam)")
    p.add_argument("--out", required=True, help="checkpoint path: FILE.json / FILE.safetensors, or a folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def task_prompts(args: argparse.Namespace, tokenizer) -> list[str]:
    from namm.tasks import get_task, task_names

    if args.task not in task_names():
        raise ValueError(f"unknown task {args.task!r}; choose one of: {', '.join(task_names())}")
    return [s.prompt for s in get_task(args.task).samples(tokenizer, args.length, args.samples, seed=args.seed)]


def load_source(args: argparse.Namespace) -> NAMMCheckpoint | None:
    """The checkpoint named by --checkpoint (None without it); a one-line error for settings it fixes."""
    from namm.policies.namm.checkpoint import load_namm_checkpoint

    if args.checkpoint is None:
        return None
    clashes = [flag for flag, value in (("--n-up", args.n_up), ("--end-pad", args.end_pad), ("--scorer", args.scorer))
               if value is not None]
    if clashes:
        raise ValueError(f"{', '.join(clashes)} cannot be set with --checkpoint: the checkpoint's own settings are kept")
    return load_namm_checkpoint(args.checkpoint)


def source_is_robust(source: NAMMCheckpoint) -> bool:
    """Whether a checkpoint's statistics are the robust kind, as its calibration record says."""
    from namm.policies.namm.calibration import statistics_name
    from namm.policies.namm.checkpoint import calibration_record

    return (calibration_record(source) or {}).get("statistics") == statistics_name(robust=True)


def run(args: argparse.Namespace) -> int:
    import namm
    from namm.memory.generation import model_context, tokenize_prompts
    from namm.policies.namm.calibration import calibrate_normalization, statistics_name
    from namm.policies.namm.checkpoint import namm_config, save_namm_checkpoint
    from namm.policies.namm.features import FeatureConfig

    set_threads(args)
    source = load_source(args)
    if source is not None:
        features = source.features
        robust = source_is_robust(source) if args.robust is None else args.robust
    else:
        features = FeatureConfig(n_up=512 if args.n_up is None else args.n_up,
                                 end_pad=0 if args.end_pad is None else args.end_pad)
        robust = bool(args.robust)
    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    texts = [read_text_file(f) for f in args.prompt_file] if args.prompt_file else None
    model, tokenizer = load_model_from_args(args)
    texts = texts if texts is not None else task_prompts(args, tokenizer)
    ids = tokenize_prompts(tokenizer, texts, model_context(model))
    if all(len(x) < features.n_up for x in ids):
        raise ValueError(f"every prompt is shorter than --n-up {features.n_up} tokens: nothing to calibrate on")
    mean, std = calibrate_normalization(model, ids, features=features, progress=show_progress(args), robust=robust)
    calibration = {
        "kind": "calibration", "model": args.model, "namm_version": namm.__version__,
        "task": args.task, "length": args.length if args.task else None, "seed": args.seed if args.task else None,
        "prompt_files": [str(Path(f)) for f in args.prompt_file] if args.prompt_file else None,
        "prompts": len(ids), "prompt_tokens": int(sum(len(x) for x in ids)),
        "statistics": statistics_name(robust),
    }
    if source is None:
        scorer = args.scorer or "bam"
        path = save_namm_checkpoint(args.out, params=namm.make_policy("namm", checkpoint="zeros", scorer=scorer).params,
                                    mean=mean, std=std, config=namm_config(features, scorer), provenance=calibration)
    else:
        path = save_recalibrated(args.out, source, args.checkpoint, mean, std, calibration)
    print(f"calibrated on {len(ids)} prompts ({calibration['prompt_tokens']} tokens) of {args.model}; saved {path}")
    print_statistics(mean, std, robust)
    return 0


def save_recalibrated(out: str, source: NAMMCheckpoint, source_name: str, mean: Tensor, std: Tensor,
                      calibration: dict) -> Path:
    """Save ``source`` with its statistics replaced by ``mean``/``std``; its provenance gains the
    calibration record and the name it was re-calibrated from."""
    from namm.policies.namm.checkpoint import save_namm_checkpoint

    provenance = {**source.provenance, "normalization": calibration, "recalibrated_from": source_name}
    return save_namm_checkpoint(out, params=source.params, mean=mean, std=std, config=source.config,
                                provenance=provenance)


def print_statistics(mean: Tensor, std: Tensor, robust: bool) -> None:
    print("bin   median      IQR/1.349" if robust else "bin   mean        std")
    for k, (m, s) in enumerate(zip(mean.tolist(), std.tolist())):
        print(f"{k:>3}  {m:.6g}  {s:.6g}")
