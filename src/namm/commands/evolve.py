"""``namm evolve``: train a NAMM with CMA-ES on training tasks (resumable, staged, distributed)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from namm.commands.common import (add_model_args, int_list, record_cache_dir, set_threads, show_progress,
                                  writable_dir)
from namm.policies.base import SCHEDULES

EXAMPLES = """examples:
  namm evolve --model smollm2-135m --tasks passage_retrieval --length 1024 --prompts-per-task 4 \\
      --population 16 --generations 100 --separable --out runs/stage1
  namm evolve --model smollm2-135m --tasks niah_multikey,kv_retrieval --length 1072,1584,2096 \
      --scorer mlp --hidden 8 --budgets 0.2,0.6 --population 16 --separable --generations 200 --out runs/b
  namm evolve --resume runs/stage1                       # continue a stopped run exactly
  namm evolve --init-from runs/stage1 --tasks passage_retrieval,kv_retrieval ... --out runs/stage2
  namm evolve --init-checkpoint runs/streaming-namm --scorer mlp --hidden 8 ... --out runs/stage3
  torchrun --nproc_per_node 2 -m namm evolve ... --out runs/x   # population split over 2 processes
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evolve", help="evolve NAMM parameters with CMA-ES", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evolve the parameters of a Neural Attention Memory Model with CMA-ES. A member's fitness "
                    "is, by default, the mean log-probability of each prompt's reference answer under its memory "
                    "minus the full cache's on the same prompt, averaged per task then over tasks (--fitness "
                    "task: the task score divided by the full cache's). Feature statistics are calibrated at the start and frozen; every "
                    "--eval-every generations the CMA-ES mean is scored on all training prompts and the best "
                    "one is saved as a NAMM checkpoint in OUT/best (use it with --policy namm --checkpoint "
                    "OUT/best). The run saves its full state after every generation: --resume continues it "
                    "with the same trajectory. Under torchrun the population is split across processes.")
    add_model_args(p)
    p.add_argument("--tasks", help="comma-separated training tasks (see `namm eval --help` for names)")
    p.add_argument("--length", help="prompt length(s) of the training tasks in tokens, comma-separated for a "
                                     "curriculum over lengths (each task's pool is spread evenly over them)")
    p.add_argument("--fitness", choices=["loglik", "margin", "task"], default="loglik",
                   help="loglik (default): mean log-probability of the reference answer, teacher-forced, minus "
                        "the full cache's on the same prompt (dense); margin: the answer's weakest token, "
                        "log p(reference) minus the best other token's, clipped to +-3 nats, minus the full "
                        "cache's (positive when greedy decoding emits the answer: follows exact match); task: the "
                        "task metric / full cache's (the paper's, 0/1 on short answers)")
    p.add_argument("--evaluator", choices=["proxy", "real"], default="proxy",
                   help="proxy (default): replay the update schedule on features and keys recorded once per "
                        "prompt, then one forward of the prompt's last tokens and the answer per member (loglik "
                        "and margin only); real: real progressive eviction for every member")
    p.add_argument("--budgets", metavar="LO,HI",
                   help="budget mode: each generation draws a memory budget in [LO, HI] and members keep their "
                        "top-scored tokens within it (one checkpoint for a range of budgets); default: threshold mode")
    p.add_argument("--question-after-compression", action="store_true",
                   help="query-agnostic training, as `namm eval --question-after-compression` evaluates: each "
                        "prompt's context is compressed before its question is read (tasks must separate the question)")
    p.add_argument("--schedule", choices=SCHEDULES, default="progressive",
                   help="when members compress: progressive (default; every --n-up tokens, the paper's) or "
                        "prompt-end (once, at the end of each prompt, after its question, or of its context with "
                        "--question-after-compression; makes the proxy exact). The checkpoint records it and runs on "
                        "it by default")
    p.add_argument("--pool", type=int,
                   help="max-pool every score over this many neighbouring slots before selecting (odd; "
                        "docs/algorithm.md §6), so a kept token keeps its neighbours; default: the "
                        "--init-checkpoint's, else 1. The checkpoints record it")
    p.add_argument("--hidden", metavar="N[,N...]", help="hidden layer sizes of the mlp scorer (default: linear)")
    p.add_argument("--prompts-per-task", type=int, default=8, help="prompts per task per generation (default 8)")
    p.add_argument("--train-prompts", type=int, default=None,
                   help="fixed pool of prompts per task that generations draw from and the mean is evaluated on "
                        "(default: 4 x --prompts-per-task)")
    p.add_argument("--population", type=int, default=32, help="CMA-ES population size (default 32)")
    p.add_argument("--elite", type=int, default=None, help="CMA-ES parents (default: half the population)")
    p.add_argument("--sigma0", type=float, default=0.065, help="initial CMA-ES step size (default 0.065)")
    p.add_argument("--separable", action="store_true", help="diagonal covariance (linear cost; much faster)")
    p.add_argument("--mean-lr", type=float, default=1.0,
                   help="learning rate of the CMA-ES mean, in (0, 1] (default 1, standard CMA-ES); below 1 the mean "
                        "averages the steps of several generations, which damps the drift a noisy fitness causes")
    p.add_argument("--generations", type=int, help="generations of this stage (with --resume: a new total)")
    p.add_argument("--eval-every", type=int, default=10,
                   help="score the CMA-ES mean on all training prompts every N generations (default 10)")
    p.add_argument("--eval-batch-size", type=int, default=4, help="prompts per batch when scoring the mean")
    p.add_argument("--memory-target", type=float, default=None,
                   help="penalise members whose mean cache fraction exceeds this (0-1); default: no penalty")
    p.add_argument("--memory-weight", type=float, default=1.0, help="penalty per unit of cache fraction above target")
    p.add_argument("--scorer", default="bam", choices=["bam", "mlp"], help="NAMM scoring network (default bam)")
    p.add_argument("--n-up", type=int, default=512, help="tokens between memory updates (default 512)")
    p.add_argument("--one-by-one", action="store_true",
                   help="score members one at a time instead of as one batch (slower; for comparison)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of CMA-ES and of the training prompts' draws; a resumed run keeps its own (default 0)")
    p.add_argument("--out", help="run directory (created)")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR")
    p.add_argument("--record-cache", metavar="DIR",
                   help="keep the proxy's recordings of the training prompts as files in DIR (about 60 MB per "
                        "2k-token prompt on qwen2.5-coder-0.5b), so a resumed run or a later stage on the same "
                        "prompts on this machine reads them instead of recording again; not part of the run, give "
                        "it again with --resume (default: record in memory only)")
    p.add_argument("--init-from", metavar="DIR",
                   help="start a new stage from the run in DIR: keeps its CMA-ES state and feature statistics")
    p.add_argument("--init-checkpoint", metavar="CKPT",
                   help="start a new run with the CMA-ES mean at a NAMM checkpoint's parameters and its feature "
                        "statistics (fresh step size --sigma0 and covariance; the scorer must match --scorer/--hidden, "
                        "except that a linear mlp start lifts exactly into one hidden layer)")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    """The :class:`EvolveConfig` of a new stage, or of the run to resume."""
    from namm.evolve.trainer import EvolveConfig, load_run_config

    if args.resume:
        config = load_run_config(args.resume)
        if args.generations is not None:
            config.generations = args.generations
        return config
    missing = [name for name in ("tasks", "length", "generations", "out") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"missing {', '.join('--' + m for m in missing)} (or give --resume DIR)")
    if args.init_from and not Path(args.init_from, "state").is_dir():
        raise FileNotFoundError(f"no evolution state in --init-from {args.init_from}")
    lengths = int_list(args.length, "--length")
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else None
    return EvolveConfig(
        model=args.model, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        length=lengths[0] if len(lengths) == 1 else lengths, fitness=args.fitness, evaluator=args.evaluator,
        budgets=budgets, hidden=int_list(args.hidden, "--hidden") if args.hidden else None,
        generations=args.generations, prompts_per_task=args.prompts_per_task,
        train_prompts=args.train_prompts or 4 * args.prompts_per_task, population=args.population,
        elite=args.elite, sigma0=args.sigma0, separable=args.separable, mean_lr=args.mean_lr,
        eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size, seed=args.seed, memory_target=args.memory_target,
        memory_weight=args.memory_weight, n_up=args.n_up, scorer=args.scorer, batched=not args.one_by_one,
        init_from=args.init_from, init_checkpoint=args.init_checkpoint,
        question_after_compression=args.question_after_compression, schedule=args.schedule, pool=args.pool,
    )


def run(args: argparse.Namespace) -> int:
    import namm
    from namm.evolve.distributed import close_workers, init_workers
    from namm.evolve.trainer import Trainer
    from namm.tasks.registry import get_task

    set_threads(args)
    config = config_from_args(args)
    for name in config.tasks:
        get_task(name)  # unknown task: clear error before loading anything
    if args.record_cache:
        record_cache_dir(args.record_cache, config.evaluator)
    out = Path(args.resume or args.out)
    if not args.resume:
        writable_dir(str(out))
        if (out / "state").exists():
            raise ValueError(f"{out} already holds a run; use --resume {out} or another --out")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    import torch

    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank if device.index is None else device.index)
    workers = init_workers(str(device))
    try:
        model, tokenizer = namm.load_model(config.model, dtype=args.dtype, device=device)
        trainer = Trainer(config, out, model, tokenizer, workers, progress=show_progress(args),
                          model_name=config.model, record_cache=args.record_cache)
        if args.resume:
            trainer.resume()
        else:
            trainer.start()
        trainer.run()
        if workers.is_main:
            best = trainer.state
            print(f"done: {trainer.cmaes.generation} generations; best mean fitness "
                  f"{best.best_fitness if best.best_fitness is not None else float('nan'):.4f} "
                  f"(generation {best.best_generation}); checkpoint {out / 'best'}; log {out / 'log.csv'}")
    finally:
        close_workers(workers)
    return 0
