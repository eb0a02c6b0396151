"""``namm finalize``: turn an evolution run's best NAMM into a checkpoint to ship, with a threshold
for threshold mode calibrated on the run's training prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

from namm.commands.common import add_device_args, load_model_from_args, set_threads, show_progress, writable_dir


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finalize", help="make a shippable checkpoint from an evolution run (threshold for threshold mode)",
        description="Take the best CMA-ES mean of an evolution run (RUN/best, or --checkpoint) and save it as a NAMM checkpoint "
                    "whose threshold makes threshold mode (the default mode of `--policy namm`) keep a target "
                    "share of the KV cache on average over the run's training prompts. Budget-mode runs learn "
                    "only to rank tokens; this gives them one score cut shared by every layer, so each layer's "
                    "size stays emergent. The cut is found by bisection on the proxy replay (docs/algorithm.md "
                    "§6); no evaluation data is used.")
    p.add_argument("--run", dest="run_dir", required=True, help="evolution run directory (with best/ and normalization/)")
    p.add_argument("--checkpoint", default=None,
                   help="the run's checkpoint to finalize, e.g. RUN/means/gen-0030 picked on validation prompts "
                        "(default: RUN/best, the best mean on the training prompts)")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--target", type=float, default=0.35,
                     help="mean KV fraction threshold mode should hold on the training prompts (default 0.35)")
    cut.add_argument("--threshold", type=float, default=None,
                     help="use this score cut instead (e.g. one picked on validation prompts with "
                          "benchmarks/needle_kept.py); the training prompts' KV fraction under it is reported")
    p.add_argument("--floor", type=float, default=None,
                   help="also make every layer keep at least this fraction of its tokens in threshold mode "
                        "(default: the checkpoint's floor, if any)")
    p.add_argument("--pool", type=int, default=None,
                   help="neighbour pool of the selection (odd; default: the checkpoint's); the threshold is set for it")
    p.add_argument("--prompts", type=int, default=16, help="training prompts used for the calibration (default 16)")
    add_device_args(p)
    p.add_argument("--out", required=True, help="checkpoint path: FILE.json / FILE.safetensors, or a folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from namm.evolve.proxy import ProxyScorer
    from namm.evolve.threshold import calibrate_threshold, mean_fraction
    from namm.evolve.trainer import Trainer, build_policy, load_run_config
    from namm.policies.namm.checkpoint import check_floor, check_pool, load_namm_checkpoint, save_namm_checkpoint

    set_threads(args)
    run_dir = Path(args.run_dir)
    config = load_run_config(run_dir)
    best = load_namm_checkpoint(args.checkpoint or str(run_dir / "best"))
    if args.prompts < 1:
        raise ValueError(f"--prompts must be >= 1, got {args.prompts}")
    given = args.threshold is not None
    floor = best.config.get("selection", {}).get("floor") if args.floor is None else args.floor
    if floor is not None:
        check_floor(floor, "--floor")
        if not given and floor > args.target:
            raise ValueError(f"--floor {floor} exceeds --target {args.target}: the floor alone keeps more")
    if args.pool is not None:
        check_pool(args.pool, "--pool")
    writable_dir(str(Path(args.out).parent if Path(args.out).suffix else Path(args.out)))
    model, tokenizer = load_model_from_args(args, config.model)
    training = Trainer(config, run_dir, model, tokenizer, progress=False).pool
    prompts = training[:: max(1, len(training) // args.prompts)][: args.prompts]
    policy = build_policy(run_dir / "normalization", config)
    policy.floor = floor
    policy.pool = best.config.get("selection", {}).get("pool", 1) if args.pool is None else args.pool
    records = ProxyScorer(model, policy, progress=show_progress(args)).record(prompts)
    if given:
        threshold, fraction = args.threshold, mean_fraction(records, policy, best.params, args.threshold)
    else:
        threshold, fraction = calibrate_threshold(records, policy, best.params, args.target)
    selection = {**best.config.get("selection", {}), "threshold": threshold, "pool": policy.pool,
                 "threshold_fraction_train": fraction, "threshold_prompts": len(prompts)}
    if given:
        selection.pop("threshold_target", None)
    else:
        selection["threshold_target"] = args.target
    if floor is not None:
        selection["floor"] = floor
    provenance = {**best.provenance, "finalized_from": str(args.checkpoint or run_dir / "best")}
    path = save_namm_checkpoint(args.out, best.params, best.mean, best.std, {**best.config, "selection": selection},
                                provenance)
    print(f"threshold {threshold:.6g}: mean KV fraction {fraction:.3f} on {len(prompts)} training prompts "
          f"({'given cut' if given else f'target {args.target}'}); checkpoint {path}")
    return 0
