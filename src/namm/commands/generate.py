"""``namm generate``: answer one prompt with a memory policy and report the memory it kept."""

from __future__ import annotations

import argparse
import json
import sys

from namm.commands.common import (
    add_model_args, add_policy_args, load_model_from_args, policy_from_args, read_text_file, set_threads,
    show_progress,
)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate from a prompt with a memory policy",
                       description="Generate a continuation of a prompt with a KV-cache memory policy and report "
                                   "the cache kept per layer and the memory saved against the full cache.")
    add_model_args(p)
    add_policy_args(p)
    p.add_argument("--prompt-file", required=True, help="text file holding the prompt ('-' for stdin)")
    p.add_argument("--chat", action="store_true",
                   help="render the prompt with the tokenizer's chat template: the file is the user's message, or a "
                        'JSON list of {"role": ..., "content": ...} messages')
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature with --sample (default 1.0)")
    p.add_argument("--top-k", type=int, default=0,
                   help="with --sample, draw from the k likeliest tokens only (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="with --sample, draw from the smallest set of tokens holding this probability (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed of --sample, for a repeatable draw")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import namm

    set_threads(args)
    prompt = sys.stdin.read() if args.prompt_file == "-" else read_text_file(args.prompt_file)
    if not prompt.strip():
        raise ValueError(f"the prompt file {args.prompt_file} is empty")
    policy = policy_from_args(args)
    model, tokenizer = load_model_from_args(args)
    if args.chat:
        prompt = chat_messages(prompt)
    out = namm.generate(model, tokenizer, prompt, policy=policy, max_new_tokens=args.max_new_tokens,
                        do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, stop=args.stop, progress=not args.json and show_progress(args))
    if args.json:
        schedule = policy.schedule if policy.evicts else None
        print(json.dumps({"model": args.model, "policy": args.policy, "less": args.less, "schedule": schedule,
                          **out.to_dict()}))
        return 0
    print(report(out, args.policy))
    return 0


def chat_messages(text: str) -> list[dict[str, str]]:
    """The messages of a ``--chat`` prompt: a JSON list of messages, or the text as one user message."""
    try:
        messages = json.loads(text)
    except json.JSONDecodeError:
        return [{"role": "user", "content": text}]
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        return [{"role": "user", "content": text}]
    return messages


def report(out, policy: str) -> str:
    """A human-readable summary of one generation."""
    layers = out.cache_tokens_per_layer
    saved = 1 - out.kv_bytes / out.kv_bytes_full if out.kv_bytes_full else 0.0
    lines = [
        out.text.strip(),
        "",
        f"policy {policy}: {out.prompt_tokens} prompt tokens, {out.tokens_seen} tokens seen",
        f"cache kept per layer (tokens): {' '.join(str(n) for n in layers)}",
        f"mean cache fraction: {out.cache_fraction:.3f}",
        f"KV memory: {out.kv_bytes / 2**20:.1f} MiB held vs {out.kv_bytes_full / 2**20:.1f} MiB full cache "
        f"({saved:.0%} saved; peak {out.kv_bytes_peak / 2**20:.1f} MiB)",
        f"LESS state: {out.less_state_bytes / 2**10:.1f} KiB; KV + LESS = {out.memory_fraction:.1%} of the full cache",
        f"time: prefill {out.prefill_seconds:.1f} s, decode {out.decode_seconds:.1f} s",
    ]
    return "\n".join(lines)
