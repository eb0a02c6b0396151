"""Arguments shared by several commands: model, policy and its options."""

from __future__ import annotations

import argparse
import fcntl
import inspect
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from namm.models import DEFAULT_MODEL, DTYPES, MODELS
from namm.policies.base import SCHEDULES, MemoryPolicy
from namm.policies.registry import make_policy, policy_class, policy_names

LOCK_FILE = ".namm-lock"  # held while a command writes to an output folder


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"registry name ({', '.join(MODELS)}), local directory, .gguf file or hub id "
                             f"(default: {DEFAULT_MODEL})")
    add_device_args(parser)


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--threads``: where and how the model runs."""
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")


def load_model_from_args(args: argparse.Namespace, name: str | None = None):
    """(model, tokenizer) of ``name`` (default ``--model``) on ``--device`` with ``--dtype``."""
    from namm.models import load_model

    return load_model(name or args.model, dtype=args.dtype, device=args.device)


def add_policy_args(parser: argparse.ArgumentParser, default: str = "full") -> None:
    parser.add_argument("--policy", default=default,
                        help=f"memory policy: {', '.join(policy_names())} (default: {default})")
    parser.add_argument("--budget", default=None,
                        help="cache budget for baselines: a fraction of tokens seen in (0, 1] or a token count >= 2")
    parser.add_argument("--checkpoint", default=None,
                        help="NAMM checkpoint: a shipped name, a path, or 'zeros' (policy namm only)")
    parser.add_argument("--n-up", type=int, default=None, help="tokens between memory updates (default 512)")
    parser.add_argument("--extra-tokens", type=int, default=None,
                        help="NAMM threshold mode: every layer keeps this many more top-scored tokens than the "
                             "threshold admits (e.g. the bytes of a LESS state, for an equal-memory comparison)")
    add_schedule_arg(parser)
    parser.add_argument("--less", default=None,
                        help="add a LESS low-rank memory of evicted tokens: shipped kernels name "
                             "(e.g. smollm2-135m-h2o) or a path from `namm less-train`")


def add_schedule_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", choices=SCHEDULES, default=None,
                        help="when the policy compresses: progressive (every --n-up tokens seen) or prompt-end "
                             "(once, after the whole prompt; decoding only appends). Default: the policy's own "
                             "(prompt-end for snapkv and pyramidkv, progressive for the others)")


def policy_from_args(args: argparse.Namespace) -> MemoryPolicy:
    """Build the policy the arguments name (on ``args.schedule`` when given), refusing options the
    policy does not take."""
    options = {"budget": args.budget, "checkpoint": args.checkpoint, "n_up": args.n_up,
               "extra_tokens": getattr(args, "extra_tokens", None)}
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(policy_class(args.policy)).parameters  # unknown names: a ValueError
    for key in options:
        if key not in accepted:
            raise ValueError(f"policy {args.policy!r} takes no --{key.replace('_', '-')}")
    return make_policy(args.policy, less=getattr(args, "less", None), schedule=getattr(args, "schedule", None),
                       **options)


def show_progress(args: argparse.Namespace) -> bool:
    """Whether a command draws progress bars: only on a terminal (stderr), and never with --quiet."""
    return sys.stderr.isatty() and not getattr(args, "quiet", False)


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def int_list(text: str, flag: str) -> list[int]:
    """Comma-separated integers, or a clear error naming the flag."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def read_text_file(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return file.read_text(encoding="utf-8")


@contextmanager
def locked_output_dir(path: str) -> Iterator[Path]:
    """``writable_dir(path)``, held by this process alone: a second command writing to the same
    folder stops with a one-line error instead of overwriting the first one's tables."""
    out = writable_dir(path)
    with open(out / LOCK_FILE, "a", encoding="utf-8") as handle:  # closing the file releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another namm command is writing to {path}; wait for it or pick another --out") from None
        yield out


def writable_dir(path: str) -> Path:
    """Create ``path`` if needed and check it is a writable directory."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path is not a directory: {path}")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output directory is not writable: {path}")
    return out


def record_cache_dir(path: str, evaluator: str) -> Path:
    """The folder where the proxy keeps its recordings of training prompts (``--record-cache``),
    checked before any model loads: only the proxy evaluator records."""
    if evaluator != "proxy":
        raise ValueError("--record-cache keeps the proxy's recordings: it needs --evaluator proxy")
    return writable_dir(path)
