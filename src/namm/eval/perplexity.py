"""Perplexity of a model reading a text with a memory policy managing its KV cache.

The text is fed in chunks through the memory runtime (memory updates on schedule, exactly as in
generation), and every token is scored by the logits of the previous one: the cheapest signal of
what an eviction policy (and LESS) loses.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.base import MemoryPolicy

PIECE = 512  # tokens scored per feed call (bounds the memory held by logits)


def check_perplexity_policy(policy: MemoryPolicy) -> None:
    """A ValueError for a policy on the prompt-end schedule: a text read for perplexity has no
    prompt end, so it would never compress."""
    if policy.evicts and policy.schedule == "prompt-end":
        raise ValueError(f"perplexity reads a text with no prompt end, so policy {policy.name!r} on the prompt-end "
                         "schedule would never compress; use the progressive schedule (--schedule progressive)")


def piece_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed negative log-likelihood of ``targets`` under (n, vocab) ``logits``, on the logits' device."""
    return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")


@torch.inference_mode()
def evaluate_perplexity(model, tokens: Tensor, policy: MemoryPolicy, chunk_size: int = 128,
                        progress: bool = False) -> dict:
    """Score ``tokens`` (1-D) with ``policy`` active. Returns ``perplexity``, ``nll`` (mean, nats),
    ``tokens`` (scored), ``cache_fraction`` (mean over layers of retained / seen at the end),
    ``kv_bytes_peak``, ``kv_bytes_full_peak``, ``less_state_bytes`` (the policy's memory beside
    the KV cache, 0 without LESS), ``memory_fraction_peak`` ((KV peak + LESS state) / full-cache KV
    bytes) and ``wall_s``."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    check_perplexity_policy(policy)
    start = time.perf_counter()
    runner = MemoryRunner(model, policy, 1, chunk_size=chunk_size)
    total, previous = torch.zeros((), device=model.device), None
    with memory_attention_enabled(model), tqdm(total=len(tokens), desc="perplexity", unit="tok",
                                              disable=not progress, leave=False) as bar:
        for begin in range(0, len(tokens), PIECE):
            piece = tokens[begin:begin + PIECE]
            logits = runner.feed([piece], progress=bar, all_logits=True)[0]
            if previous is not None:
                logits = torch.cat([previous, logits])
                targets = piece
            else:
                targets = piece[1:]
            total += piece_nll(logits[:len(targets)], targets)
            previous = logits[-1:]
    scored = len(tokens) - 1
    nll = float(total) / scored
    counts = runner.cache.token_counts()[:, 0].float()
    kv_full = int(runner.kv_bytes_full()[0])
    kv_peak = int(torch.maximum(runner.kv_bytes_peak, runner.kv_bytes())[0])
    state = policy.state_nbytes()
    return {
        "perplexity": math.exp(nll), "nll": nll, "tokens": scored,
        "cache_fraction": float(counts.mean()) / len(tokens),
        "kv_bytes_peak": kv_peak, "kv_bytes_full_peak": kv_full, "less_state_bytes": state,
        "memory_fraction_peak": (kv_peak + state) / kv_full, "wall_s": time.perf_counter() - start,
    }


def evaluate_perplexity_over(model, sequences: list[Tensor], policy: MemoryPolicy, chunk_size: int = 128,
                             progress: bool = False) -> dict:
    """Score each sequence with :func:`evaluate_perplexity` (the policy starts afresh on each).
    ``nll`` is the mean over every scored token of all sequences and ``perplexity`` its exp;
    ``cache_fraction`` is the mean, KV peaks the largest, ``wall_s`` the total; ``sequences``
    holds each sequence's own result."""
    if not sequences:
        raise ValueError("perplexity needs at least one sequence")
    each = [evaluate_perplexity(model, tokens, policy, chunk_size, progress) for tokens in sequences]
    tokens = sum(r["tokens"] for r in each)
    nll = sum(r["nll"] * r["tokens"] for r in each) / tokens
    return {
        "n": len(each), "perplexity": math.exp(nll), "nll": nll, "tokens": tokens,
        "cache_fraction": sum(r["cache_fraction"] for r in each) / len(each),
        "kv_bytes_peak": max(r["kv_bytes_peak"] for r in each),
        "kv_bytes_full_peak": max(r["kv_bytes_full_peak"] for r in each),
        "less_state_bytes": max(r["less_state_bytes"] for r in each),
        "memory_fraction_peak": max(r["memory_fraction_peak"] for r in each),
        "wall_s": sum(r["wall_s"] for r in each),
        "sequences": [{"perplexity": r["perplexity"], "nll": r["nll"], "tokens": r["tokens"]} for r in each],
    }
