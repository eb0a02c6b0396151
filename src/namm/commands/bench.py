"""``namm bench``: runtime performance figures as ratios against the full cache, in one run."""

from __future__ import annotations

import argparse
import json

from namm.commands.common import add_model_args, load_model_from_args, set_threads, writable_dir


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure prefill/decode speed and KV memory against the full cache",
        description="Measure, in one run: prefill time of the runtime's full policy against a plain Hugging Face "
                    "forward and of the all-zero NAMM against full; at a long context, prefill time, decode "
                    "tokens/s and peak KV bytes of eviction policies and of a NAMM at a fixed cache fraction "
                    "against full; and the time and peak memory of one NAMM update of one layer holding the "
                    "long context. Prints a table; --out also writes bench.json.")
    add_model_args(p)
    p.add_argument("--prefill-tokens", type=int, default=4096, help="prompt length for the prefill figure")
    p.add_argument("--decode-context", type=int, default=8000,
                   help="long prompt length (before decoding; also the cache size of the NAMM update figure)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded for the decode figure")
    p.add_argument("--budget", type=float, default=0.25, help="budget of the eviction policies (fraction)")
    p.add_argument("--policies", default="recency,h2o", help="comma-separated eviction policies to time")
    p.add_argument("--namm-fraction", type=float, default=0.3,
                   help="share of the tokens seen the long-context NAMM keeps (budget mode)")
    p.add_argument("--repeats", type=int, default=2, help="runs per contender; the best is kept")
    p.add_argument("--out", default=None, help="directory for bench.json")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import namm
    from namm.benchmark import BenchmarkConfig, format_report, runtime_benchmark

    set_threads(args)
    out = writable_dir(args.out) if args.out else None
    for value, name in ((args.prefill_tokens, "prefill-tokens"), (args.decode_context, "decode-context"),
                        (args.decode_tokens, "decode-tokens"), (args.repeats, "repeats")):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1")
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    for name in policies:
        namm.make_policy(name, budget=args.budget)  # fail fast on a bad name or budget
    namm.make_policy("namm", checkpoint="zeros", budget=args.namm_fraction)  # fail fast on a bad fraction
    model, tokenizer = load_model_from_args(args)
    cfg = BenchmarkConfig(args.prefill_tokens, args.decode_context, args.decode_tokens, args.budget, policies,
                          args.repeats, args.namm_fraction)
    figures = runtime_benchmark(model, tokenizer, cfg) | {"model": args.model}
    print(format_report(figures))
    if out is not None:
        (out / "bench.json").write_text(json.dumps(figures, indent=2))
    return 0
