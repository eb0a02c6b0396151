"""How well LESS kernels trained on one policy's evictions serve another's, layer by layer.

    python benchmarks/less_kernel_transfer.py --kernels runs/less-smollm2-135m-namm-h512,runs/less-smollm2-135m-h2o-h512 \\
        [--model smollm2-135m] [--policies namm,h2o:0.1] [--length 2048] [--seed 0] [--queries 256]

For every policy it captures one held-out corpus sequence (the corpus's ``heldout`` split; the
policy alone evicts, no LESS) exactly as ``namm less-train`` captures training data, then reports
for every set of kernels the share of the attention-output MSE (after ``o_proj``) that LESS
removes, averaged over layers, and the worst layer. A negative share means LESS makes that layer's
output worse than the policy alone.
"""

from __future__ import annotations

import argparse
import sys

import torch

import namm
from namm.less.capture import attention_modules, capture_sequence
from namm.less.checkpoint import load_less_kernels
from namm.less.training import FIELDS, group_loss, stack_layers
from namm.tasks.corpus import corpus_tokens


def make(spec: str):
    """``name`` or ``name:budget`` → a policy."""
    name, _, budget = spec.partition(":")
    return namm.make_policy(name, **({"budget": float(budget)} if budget else {}))


def shares(model, data: dict, kernels_path: str) -> torch.Tensor:
    """(L,) share of each captured layer's MSE removed by the kernels at ``kernels_path``."""
    layers = sorted({int(key.split(".")[0]) for key in data})
    batch = {n: torch.stack([data[f"{i}.{n}"] for i in layers])[None] for n in FIELDS}
    modules = attention_modules(model)
    o_proj = torch.stack([modules[i].o_proj.weight.detach().float() for i in layers])
    kernels = load_less_kernels(kernels_path)
    params = stack_layers([kernels.layers[i] for i in layers], model.device)
    with torch.no_grad():
        alone = group_loss(params, batch, o_proj, use_less=False)
        less = group_loss(params, batch, o_proj)
    return 1 - less / alone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model: registry name or path (default: %(default)s)")
    p.add_argument("--kernels", required=True, help="comma-separated LESS kernels (names or paths)")
    p.add_argument("--policies", default="namm,h2o:0.1", help="comma-separated NAME or NAME:BUDGET")
    p.add_argument("--length", type=int, default=2048,
                   help="tokens of the held-out corpus sequence every policy reads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the held-out sequence and of the sampled query positions (default: %(default)s)")
    p.add_argument("--queries", type=int, default=256,
                   help="query positions sampled per layer (from its first memory update on) to measure the MSE "
                        "on (default: %(default)s)")
    args = p.parse_args(argv)
    model, tokenizer = namm.load_model(args.model)
    tokens = corpus_tokens(tokenizer, args.length, split="heldout", seed=args.seed).to(model.device)
    print("| evictions of | kernels | mean share of the MSE removed | worst layer (share) |\n|---|---|---|---|")
    for spec in args.policies.split(","):
        policy = make(spec)
        policy.bind(model)
        data = capture_sequence(model, tokens, policy, args.queries, torch.Generator().manual_seed(args.seed))
        for path in args.kernels.split(","):
            share = shares(model, data, path)
            worst = int(share.argmin())
            print(f"| {spec} | {path} | {float(share.mean()):.1%} | {worst} ({float(share[worst]):.1%}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
