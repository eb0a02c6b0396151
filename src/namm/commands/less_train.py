"""``namm less-train``: fit LESS kernels for a model and an eviction policy, layer by layer."""

from __future__ import annotations

import argparse
import json

from namm.commands.common import (
    add_model_args, add_policy_args, int_list, load_model_from_args, policy_from_args, set_threads, show_progress,
    writable_dir,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "less-train", help="train LESS kernels (a low-rank memory of evicted tokens) for a policy",
        description="Train LESS kernels on a frozen model: the model reads offline training text (the corpus's "
                    "train split) with POLICY evicting, every layer's queries, keys, values and evictions are "
                    "recorded, and each layer's kernels are fitted so that kept keys + the low-rank memory of the "
                    "evicted ones reproduce the full-cache attention output (MSE after o_proj). Captured data and finished layers are saved in OUT, so running "
                    "the same command again resumes. Result: OUT/less.safetensors + OUT/less.json, usable as "
                    "--less OUT wherever --policy is accepted.")
    add_model_args(p)
    add_policy_args(p, default="h2o")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--sequences", type=int, default=16, help="training sequences (default 16)")
    p.add_argument("--seq-len", default="2048",
                   help="tokens per sequence (default 2048); several comma-separated lengths (e.g. 2048,4096) "
                        "alternate over the training and validation sequences, so the kernels learn the state "
                        "of every length they will serve")
    p.add_argument("--queries", type=int, default=256,
                   help="query positions sampled per sequence and layer, after the first update (default 256)")
    p.add_argument("--steps", type=int, default=300, help="Adam steps per layer (default 300)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden width of the φ/ψ MLPs (default 512, or that of --init-from)")
    p.add_argument("--rank", type=int, default=None, help="rank R of the state (default 8, or that of --init-from)")
    p.add_argument("--init-from", default=None, metavar="KERNELS",
                   help="continue training these kernels (a shipped name or a less-train OUT) instead of starting "
                        "from random weights: a new cosine schedule of --steps, no log-scale search; each layer ends "
                        "no worse on the validation sequences than it began. OUT must be a new directory")
    p.add_argument("--layers-per-pass", type=int, default=None,
                   help="layers fitted together in one batched pass (default: all; fewer to save memory)")
    p.add_argument("--validation", type=int, default=4,
                   help="further training-split sequences never fitted, for early stopping: each layer keeps its "
                        "weights of lowest loss on them (default 4; 0: no early stopping, keep the last weights)")
    p.add_argument("--eval-every", type=int, default=20, help="Adam steps between validation checks (default 20)")
    p.add_argument("--patience", type=int, default=5,
                   help="stop a pass after this many checks in which no layer improved (default 5)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the kernels' initial weights and of the training sequences (default 0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from namm.less.checkpoint import load_less_kernels
    from namm.less.training import TrainConfig, train_less

    set_threads(args)
    if getattr(args, "less", None):
        raise ValueError("less-train trains LESS kernels; do not pass --less")
    if args.schedule == "prompt-end":
        raise ValueError("less-train records the evictions of the progressive schedule; drop --schedule prompt-end")
    policy = policy_from_args(args)
    init = load_less_kernels(args.init_from) if args.init_from else None
    hidden = args.hidden or (init.config.hidden if init else 512)
    rank = args.rank or (init.config.rank if init else 8)
    lengths = int_list(args.seq_len, "--seq-len")
    config = TrainConfig(sequences=args.sequences, seq_len=lengths if len(lengths) > 1 else lengths[0],
                         queries_per_seq=args.queries, steps=args.steps, batch_sequences=args.batch, lr=args.lr,
                         hidden=hidden, rank=rank, seed=args.seed, layers_per_pass=args.layers_per_pass,
                         validation=args.validation, eval_every=args.eval_every, patience=args.patience)
    config.check(policy.n_up)
    out = writable_dir(args.out)
    model, tokenizer = load_model_from_args(args)
    provenance = {"model": args.model, "policy": args.policy, "budget": args.budget, "checkpoint": args.checkpoint,
                  "n_up": args.n_up, **({"init_from": args.init_from} if args.init_from else {})}
    path = train_less(model, tokenizer, policy, out, config, provenance, progress=show_progress(args), init=init)
    record = json.loads(path.with_suffix(".json").read_text())["provenance"]
    closed = [v["gap_closed"] for v in record["layers"].values() if "gap_closed" in v]
    mean = sum(closed) / len(closed) if closed else 0.0
    speed = record.get("sequences_per_minute")
    rate = f"; {speed:.2f} sequences per minute" if speed else ""
    split = "validation" if args.validation else "training"
    print(f"wrote {path} ({len(closed)} layers trained; mean share of the attention-output MSE removed on the "
          f"{split} sequences: {mean:.1%}"
          f"{rate})")
    return 0
