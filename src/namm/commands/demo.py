"""``namm demo``: the main job on the embedded model, end to end, in a few minutes.

Builds a long pass-key prompt from the offline corpus and answers it with the full cache, with
the model's shipped (evolved) NAMM in both modes (threshold: emergent memory; budget: the same
memory as the baseline) and with a classic baseline, printing each answer, the cache kept per
layer and the memory saved."""

from __future__ import annotations

import argparse

from namm.commands.common import add_model_args, load_model_from_args, set_threads, show_progress
from namm.commands.generate import report


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="answer a long prompt with memory policies and show the memory saved",
        description="Answer a long pass-key prompt (built offline) with the full KV cache, with the model's shipped "
                    "NAMM (when one exists; in threshold mode, and in budget mode at the baseline's budget) and with a "
                    "baseline, then print each answer, the cache kept per layer and the memory saved.")
    add_model_args(p)
    p.add_argument("--baseline", default="h2o", help="baseline policy shown beside NAMM (default: h2o)")
    p.add_argument("--budget", default="0.25",
                   help="budget of the baseline and of NAMM's budget mode (default: 0.25)")
    p.add_argument("--checkpoint", default=None,
                   help="NAMM checkpoint (default: the one shipped for --model; NAMM is skipped if there is none)")
    p.add_argument("--task", default="passkey", help="synthetic task that builds the prompt (default: passkey)")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default: 2048)")
    p.add_argument("--seed", type=int, default=0, help="which prompt of the task (default: 0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import namm
    from namm.policies.namm.checkpoint import shipped_checkpoints
    from namm.tasks import get_task
    from namm.tasks.metrics import score_sample

    set_threads(args)
    policies = {"full": namm.make_policy("full")}
    checkpoint = args.checkpoint or (args.model if args.model in shipped_checkpoints() else None)
    if checkpoint is not None:
        policies[f"namm ({checkpoint}, threshold mode)"] = namm.make_policy("namm", checkpoint=checkpoint)
        policies[f"namm ({checkpoint}, budget {args.budget})"] = namm.make_policy("namm", checkpoint=checkpoint,
                                                                                  budget=args.budget)
    policies[f"{args.baseline} ({args.budget})"] = namm.make_policy(args.baseline, budget=args.budget)
    task = get_task(args.task)
    model, tokenizer = load_model_from_args(args)
    sample = task.samples(tokenizer, args.length, 1, seed=args.seed)[0]
    print(f"{args.model}: {args.task} prompt of {sample.length or args.length} tokens; expected answer: "
          f"{' | '.join(sample.answers)}\n")
    for name, policy in policies.items():
        out = namm.generate(model, tokenizer, sample.prompt, policy=policy, max_new_tokens=sample.max_new_tokens,
                            progress=show_progress(args))
        verdict = "correct" if score_sample(sample, out.text) >= 1.0 else "wrong"
        print(f"== {name}: {verdict} ==")
        print(report(out, name))
        print()
    return 0
