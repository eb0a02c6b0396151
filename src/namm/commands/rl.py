"""``namm rl``: a Decision Transformer on CartPole-v1 with memory policies (the NAMM zero-shot).

``namm rl train`` rebuilds the shipped Decision Transformer from behaviour episodes it generates;
``namm rl calibrate`` gives a NAMM checkpoint the DT's feature statistics;
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
    cal = actions.add_parser(
        "calibrate", help="give a NAMM the Decision Transformer's feature statistics",
        description="Feed behaviour episodes (as in training) through the Decision Transformer with the keep-everything "
                    "NAMM feature pipeline and save the NAMM checkpoint --checkpoint with its normalisation statistics "
                    "replaced by the DT's: its scorer, score cut and feature settings are kept, so threshold mode "
                    "applies the language-evolved cut in the DT's feature scale (docs/algorithm.md §11). Use the "
                    "result as `namm rl eval --checkpoint OUT` (its .json).")
    cal.add_argument("--checkpoint", required=True, help="NAMM to re-calibrate (shipped name or path)")
    cal.add_argument("--dt", default="cartpole-dt", help="Decision Transformer: the shipped name or a path "
                                                         "(default: cartpole-dt)")
    cal.add_argument("--episodes", type=int, default=16, help="behaviour episodes (default: 16)")
    cal.add_argument("--max-epsilon", type=float, default=0.4,
                     help="largest action-flip probability of the behaviour episodes (default: 0.4, as in training)")
    cal.add_argument("--seed", type=int, default=7,
                     help="episode seed; keep it apart from the DT's training data (0) and the retention view's "
                          "episodes (999) (default: 7)")
    cal.add_argument("--robust", action="store_true", default=None,
                     help="median and IQR / 1.349 instead of mean and std (default: the kind the checkpoint records)")
    cal.add_argument("--out", required=True, help="checkpoint path: FILE.json / FILE.safetensors, or a folder")
    cal.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    cal.set_defaults(run=run_calibrate)
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
    check_max_epsilon(args.max_epsilon)
    observed = tuple(parse_list(args.observe, int, "observe"))
    if not observed or not all(0 <= i < 4 for i in observed):
        raise ValueError("--observe must list state components in 0..3")
    torch.set_num_threads(args.threads)
    model = train_dt(episodes=args.episodes, steps=args.steps, batch_size=args.batch_size,
                     max_epsilon=args.max_epsilon, seed=args.seed, observed=observed)
    for path in save_dt(model, args.out):
        print(f"wrote {path}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    import namm
    from namm.commands.calibrate import print_statistics, save_recalibrated, source_is_robust
    from namm.policies.namm.calibration import statistics_name
    from namm.policies.namm.checkpoint import load_namm_checkpoint
    from namm.rl.calibration import episode_statistics
    from namm.rl.data import generate_trajectories
    from namm.rl.model import TOKENS_PER_STEP, load_dt

    if args.episodes < 1:
        raise ValueError("--episodes must be >= 1")
    check_max_epsilon(args.max_epsilon)
    source = load_namm_checkpoint(args.checkpoint)
    robust = source_is_robust(source) if args.robust is None else args.robust
    torch.set_num_threads(args.threads)
    model = load_dt(args.dt)
    episodes = generate_trajectories(args.episodes, seed=args.seed, max_epsilon=args.max_epsilon)
    mean, std = episode_statistics(model, episodes, source.features, robust=robust)
    tokens = sum(TOKENS_PER_STEP * len(e.actions) - 1 for e in episodes)  # the last action is never fed
    calibration = {
        "kind": "calibration", "model": f"decision transformer {args.dt}", "namm_version": namm.__version__,
        "env": model.config.env, "episodes": args.episodes, "max_epsilon": args.max_epsilon, "seed": args.seed,
        "prompts": args.episodes, "prompt_tokens": tokens, "statistics": statistics_name(robust),
    }
    path = save_recalibrated(args.out, source, args.checkpoint, mean, std, calibration)
    print(f"calibrated on {args.episodes} behaviour episodes ({tokens} tokens) of {args.dt}; saved {path}")
    print_statistics(mean, std, robust)
    return 0


def check_max_epsilon(value: float) -> None:
    """The behaviour policy's largest action-flip probability must be a probability."""
    if not 0 <= value <= 1:
        raise ValueError("--max-epsilon must be in [0, 1]")


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
