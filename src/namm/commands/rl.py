"""``namm rl``: a Decision Transformer on CartPole-v1 with memory policies (the NAMM zero-shot).

``namm rl train`` rebuilds the shipped Decision Transformer from behaviour episodes it generates;
``namm rl eval`` rolls it out through the memory runtime with the full cache, a NAMM checkpoint
and recency / H2O at the NAMM's measured memory, and writes the results table and retention plot.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from importlib import resources
from pathlib import Path

from namm.commands.common import writable_dir


def add_parser(sub) -> None:
    p = sub.add_parser(
        "rl", help="Decision Transformer on CartPole: train it, or evaluate memory policies on its rollouts",
        description="Reinforcement learning with a Decision Transformer (needs gymnasium: pip install 'namm[rl]').")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train", help="generate behaviour episodes and train the Decision Transformer",
        description="Generate CartPole-v1 episodes of mixed quality (expert controller, each episode flipping its "
                    "actions with its own probability in [0, --max-epsilon]) and train a small Decision Transformer "
                    "on whole episodes. The defaults rebuild the shipped model (deterministic; minutes on a CPU).")
    default_out = str(resources.files("namm.rl") / "checkpoints" / "cartpole-dt")
    train.add_argument("--out", default=default_out, help="output stem: writes OUT.safetensors and OUT.json "
                                                          "(default: the shipped model's files)")
    train.add_argument("--episodes", type=int, default=300, help="behaviour episodes (default: 300)")
    train.add_argument("--steps", type=int, default=250, help="optimiser steps (default: 250)")
    train.add_argument("--batch-size", type=int, default=8, help="episodes per step (default: 8)")
    train.add_argument("--max-epsilon", type=float, default=0.4, help="largest action-flip probability (default: 0.4)")
    train.add_argument("--observe", default="0,2",
                       help="state components the DT sees (CartPole: 0 x, 1 x_dot, 2 theta, 3 theta_dot; default: "
                            "0,2, positions only, so velocities must be inferred from the context)")
    train.add_argument("--seed", type=int, default=0, help="data and training seed (default: 0)")
    train.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    train.set_defaults(run=run_train)
    ev = actions.add_parser(
        "eval", help="mean return of DT rollouts per memory policy, and the NAMM's retention view",
        description="Roll the Decision Transformer out greedily (asking for the maximum return) through namm's "
                    "memory runtime with the full cache, the NAMM checkpoint (zero-shot) and recency and H2O at "
                    "the NAMM's measured memory; writes OUT/rl.md, OUT/rl.json and OUT/rl_retention.png.")
    ev.add_argument("--dt", default="cartpole-dt", help="Decision Transformer: the shipped name or a path "
                                                        "(default: cartpole-dt)")
    ev.add_argument("--checkpoint", default="smollm2-135m", help="NAMM checkpoint (default: smollm2-135m)")
    ev.add_argument("--seeds", default="0,1,2", help="comma-separated evaluation seeds (default: 0,1,2)")
    ev.add_argument("--episodes", type=int, default=20, help="episodes per seed (default: 20)")
    ev.add_argument("--n-up", type=int, default=None, help="tokens between memory updates (default: the checkpoint's)")
    ev.add_argument("--extra-budgets", default="0.1,0.025",
                    help="comma-separated extra budgets at which recency, H2O and the NAMM in budget mode also run "
                         "('' for none; default: 0.1,0.025)")
    ev.add_argument("--retention-episodes", type=int, default=16,
                    help="behaviour episodes fed for the retention view (default: 16)")
    ev.add_argument("--out", default="docs/results", help="output folder (default: docs/results)")
    ev.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    ev.set_defaults(run=run_eval)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from namm.rl.model import save_dt
    from namm.rl.train import train_dt

    if min(args.episodes, args.steps, args.batch_size) < 1:
        raise ValueError("--episodes, --steps and --batch-size must be >= 1")
    if not 0 <= args.max_epsilon <= 1:
        raise ValueError("--max-epsilon must be in [0, 1]")
    observed = tuple(parse_list(args.observe, int, "observe"))
    if not observed or not all(0 <= i < 4 for i in observed):
        raise ValueError("--observe must list state components in 0..3")
    torch.set_num_threads(args.threads)
    model = train_dt(episodes=args.episodes, steps=args.steps, batch_size=args.batch_size,
                     max_epsilon=args.max_epsilon, seed=args.seed, observed=observed)
    for path in save_dt(model, args.out):
        print(f"wrote {path}")
    return 0


def parse_list(text: str, kind, what: str) -> list:
    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be a comma-separated list of numbers, got {text!r}") from None


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from namm.policies.registry import make_policy
    from namm.rl.benchmark import run_benchmark, write_report
    from namm.rl.model import load_dt

    seeds = parse_list(args.seeds, int, "seeds")
    extra = tuple(parse_list(args.extra_budgets, float, "extra-budgets"))
    if not seeds or min(args.episodes, args.retention_episodes) < 1:
        raise ValueError("give at least one seed, --episodes >= 1 and --retention-episodes >= 1")
    make_policy("namm", checkpoint=args.checkpoint, n_up=args.n_up)  # a bad checkpoint fails before any rollout
    out = writable_dir(args.out)
    torch.set_num_threads(args.threads)
    model = load_dt(args.dt)
    record = run_benchmark(model, seeds, args.episodes, args.checkpoint, n_up=args.n_up, extra_budgets=extra,
                           retention_episodes=args.retention_episodes)
    command = "namm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["rl"] else "namm rl eval"
    for path in write_report(record, Path(out), command):
        print(f"wrote {path}")
    return 0
