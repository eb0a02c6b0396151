"""``namm less-tune``: fine-tune trained LESS kernels end to end on the model's output."""

from __future__ import annotations

import argparse
import json

from namm.commands.common import (
    add_model_args, add_policy_args, int_list, load_model_from_args, policy_from_args, set_threads, show_progress,
    writable_dir,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "less-tune", help="fine-tune LESS kernels end to end (the model's output against the full cache's)",
        description="Fine-tune LESS kernels trained by `namm less-train` on what the model predicts: every layer's "
                    "kernels are trained together so that the next-token distribution with POLICY evicting and "
                    "LESS folding matches the full cache's (KL divergence, on the corpus's train split). Each "
                    "sequence's evictions (with the starting kernels active) and the full cache's hidden states "
                    "are recorded once in OUT/data; each step replays one sequence in a single differentiable "
                    "forward. Held-out training-split sequences pick the kernels of lowest loss; the run's state "
                    "is saved at every check, so running the same command again resumes. Result: "
                    "OUT/less.safetensors + OUT/less.json (usable as --less OUT) and OUT/tune_log.jsonl. Models "
                    "whose layers all attend globally only.")
    add_model_args(p)
    add_policy_args(p, default="h2o")
    p.add_argument("--init-from", required=True, metavar="KERNELS",
                   help="the kernels to fine-tune: a shipped name or a `namm less-train` OUT")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--sequences", type=int, default=16, help="training sequences (default 16)")
    p.add_argument("--seq-len", default="2048",
                   help="tokens per sequence (default 2048); several comma-separated lengths (e.g. 2048,4096) "
                        "alternate over the training and validation sequences")
    p.add_argument("--steps", type=int, default=100, help="Adam steps (default 100)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate, cosine-annealed (default 3e-4)")
    p.add_argument("--validation", type=int, default=2,
                   help="held-out training-split sequences that pick the best kernels (default 2)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between validation checks (default 10)")
    p.add_argument("--patience", type=int, default=3,
                   help="stop after this many checks without a better validation loss (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sequences and their order (default 0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from namm.less.checkpoint import load_less_kernels
    from namm.less.tuning import TuneConfig, tune_less

    set_threads(args)
    if getattr(args, "less", None):
        raise ValueError("less-tune fine-tunes the kernels of --init-from; do not pass --less")
    if args.schedule == "prompt-end":
        raise ValueError("less-tune replays the progressive schedule; drop --schedule prompt-end")
    policy = policy_from_args(args)
    kernels = load_less_kernels(args.init_from)
    lengths = int_list(args.seq_len, "--seq-len")
    config = TuneConfig(sequences=args.sequences, seq_len=lengths if len(lengths) > 1 else lengths[0],
                        steps=args.steps, batch_sequences=args.batch, lr=args.lr, seed=args.seed,
                        validation=args.validation, eval_every=args.eval_every, patience=args.patience)
    config.check(policy.n_up)
    out = writable_dir(args.out)
    model, tokenizer = load_model_from_args(args)
    provenance = {"model": args.model, "policy": args.policy, "budget": args.budget, "checkpoint": args.checkpoint,
                  "n_up": args.n_up, "init_from": args.init_from}
    path = tune_less(model, tokenizer, policy, kernels, out, config, provenance, progress=show_progress(args))
    report = json.loads(path.with_suffix(".json").read_text())["provenance"]["end_to_end"]
    speed = report.get("sequences_per_minute")
    print(f"wrote {path} (validation KL to the full cache: policy alone {report['validation_kl_policy_alone']:.4f}, "
          f"starting kernels {report['validation_kl_start']:.4f}, best {report['validation_kl_best']:.4f} at step "
          f"{report['best_step']}" + (f"; {speed:.2f} sequences per minute" if speed else "") + ")")
    return 0
