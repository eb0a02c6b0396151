"""Runtime performance figures, measured in one run as ratios against the full cache.

* prefill: our runtime with the ``full`` policy (chunked, memory attention) against a plain
  Hugging Face forward (one shot, SDPA) over the same prompt;
* decode: tokens/s at a long context with eviction policies against ``full``;
* memory: peak KV bytes of each policy against the full cache's peak.

Timings take the best of ``repeats`` runs, alternating the contenders so background load hits
them alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from namm.memory.generation import generate
from namm.policies.registry import make_policy
from namm.tasks.corpus import corpus_tokens


@dataclass
class BenchmarkConfig:
    prefill_tokens: int = 4096
    decode_context: int = 8000
    decode_tokens: int = 64
    budget: float = 0.25
    policies: tuple[str, ...] = ("recency", "h2o")
    repeats: int = 2


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def prefill_figures(model: PreTrainedModel, prompt: torch.Tensor, repeats: int) -> dict:
    """Seconds to prefill ``prompt`` with a plain HF forward and with the runtime's ``full`` policy."""
    full = make_policy("full")

    def plain() -> None:
        model(input_ids=prompt[None].to(model.device), use_cache=True, logits_to_keep=1)

    def ours() -> None:
        generate(model, None, prompt, policy=full, max_new_tokens=0)

    hf_s, ours_s = float("inf"), float("inf")
    for _ in range(repeats):  # alternate the contenders so background load hits them alike
        hf_s = min(hf_s, _seconds(plain))
        ours_s = min(ours_s, _seconds(ours))
    return {"tokens": len(prompt), "hf_forward_s": hf_s, "namm_full_s": ours_s, "ratio": ours_s / hf_s}


def decode_figures(model: PreTrainedModel, prompt: torch.Tensor, cfg: BenchmarkConfig) -> dict:
    """Decode tokens/s and peak KV bytes at a long context, per policy, with ratios against full."""
    rows = {}
    for name in ("full", *cfg.policies):
        policy = make_policy(name) if name == "full" else make_policy(name, budget=cfg.budget)
        best = None
        for _ in range(cfg.repeats):
            out = generate(model, None, prompt, policy=policy, max_new_tokens=cfg.decode_tokens + 1, eos_token_id=None)
            if best is None or out.decode_seconds < best.decode_seconds:
                best = out
        rows[name] = {
            "decode_tokens_per_s": cfg.decode_tokens / best.decode_seconds,
            "prefill_s": best.prefill_seconds,
            "policy_s": best.policy_seconds,
            "kv_bytes_peak": best.kv_bytes_peak,
            "kv_bytes_full_peak": best.kv_bytes_full_peak,
            "cache_fraction": best.cache_fraction,
        }
    full = rows["full"]
    for row in rows.values():
        row["decode_speedup"] = row["decode_tokens_per_s"] / full["decode_tokens_per_s"]
        row["kv_peak_ratio"] = row["kv_bytes_peak"] / full["kv_bytes_full_peak"]
    return rows


def runtime_benchmark(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: BenchmarkConfig) -> dict:
    """All runtime figures in one run (prompts are held-out corpus text)."""
    context = int(getattr(model.config, "max_position_embeddings", cfg.decode_context + cfg.decode_tokens + 1))
    if cfg.decode_context + cfg.decode_tokens + 1 > context:
        raise ValueError(f"decode context {cfg.decode_context} + {cfg.decode_tokens} new tokens exceeds the "
                         f"model's context of {context} tokens")
    prefill_prompt = corpus_tokens(tokenizer, cfg.prefill_tokens, split="heldout", seed=1)
    decode_prompt = corpus_tokens(tokenizer, cfg.decode_context, split="heldout", seed=2)
    return {
        "config": cfg.__dict__ | {"policies": list(cfg.policies)},
        "threads": torch.get_num_threads(),
        "prefill": prefill_figures(model, prefill_prompt, cfg.repeats),
        "decode": decode_figures(model, decode_prompt, cfg),
    }


def format_report(figures: dict) -> str:
    """A short human-readable table of :func:`runtime_benchmark`'s figures."""
    pre = figures["prefill"]
    lines = [
        f"prefill {pre['tokens']} tokens: plain HF forward {pre['hf_forward_s']:.2f} s, namm full "
        f"{pre['namm_full_s']:.2f} s -> ratio {pre['ratio']:.3f} (target <= 1.05)",
        f"decode at {figures['config']['decode_context']} tokens of context, budget {figures['config']['budget']}:",
        f"{'policy':<10} {'tok/s':>8} {'speedup':>8} {'KV peak/full':>13} {'cache frac':>11} {'policy s':>9}",
    ]
    for name, row in figures["decode"].items():
        lines.append(f"{name:<10} {row['decode_tokens_per_s']:>8.1f} {row['decode_speedup']:>7.2f}x "
                     f"{row['kv_peak_ratio']:>13.3f} {row['cache_fraction']:>11.3f} {row['policy_s']:>9.2f}")
    return "\n".join(lines)
