"""``namm demo``: the main job on the embedded model, end to end, in about a minute.

Builds a long pass-key prompt from the offline corpus, answers it with the full cache and with a
memory policy, and prints both answers, the cache kept per layer and the memory saved."""

from __future__ import annotations

import argparse

from namm.commands.common import add_model_args, add_policy_args, policy_from_args, set_threads
from namm.commands.generate import report


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="answer a long prompt with a memory policy and show the memory saved",
        description="Answer a long pass-key prompt (built offline) with the full KV cache and with a memory "
                    "policy, then print both answers, the cache kept per layer and the memory saved.")
    add_model_args(p)
    add_policy_args(p, default="h2o")
    p.add_argument("--task", default="passkey", help="synthetic task that builds the prompt (default: passkey)")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default: 2048)")
    p.add_argument("--seed", type=int, default=0, help="which prompt of the task (default: 0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import namm
    from namm.tasks import get_task
    from namm.tasks.metrics import score_sample

    set_threads(args)
    if args.policy == "h2o" and args.budget is None:
        args.budget = "0.25"
    policy = policy_from_args(args)
    task = get_task(args.task)
    model, tokenizer = namm.load_model(args.model)
    sample = task.samples(tokenizer, args.length, 1, seed=args.seed)[0]
    print(f"{args.model}: {args.task} prompt of {sample.length or args.length} tokens; expected answer: "
          f"{' | '.join(sample.answers)}\n")
    for name, chosen in (("full", namm.make_policy("full")), (args.policy, policy)):
        out = namm.generate(model, tokenizer, sample.prompt, policy=chosen, max_new_tokens=sample.max_new_tokens,
                            progress=True)
        verdict = "correct" if score_sample(sample, out.text) >= 1.0 else "wrong"
        print(f"== {name} ({verdict}) ==")
        print(report(out, name))
        print()
    return 0
