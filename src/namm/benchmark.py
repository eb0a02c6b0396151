"""Runtime performance figures, measured in one run as ratios (the acceptance figures of the runtime).

* prefill at ``prefill_tokens``: the runtime's ``full`` policy against a plain transformers forward
  (one shot, SDPA), and the all-zero NAMM (every update runs, nothing is evicted) against ``full``,
  with the paper's BAM scorer and with the MLP scorer of the evolution campaigns (``MLP_SCORER``);
  and the floor under the zero NAMM: ``full`` plus the kernels no implementation of the algorithm
  can skip (BAM's causal self-attention over each head's tokens and the STFT's matrix product, at
  every update's cache size), as a ratio to ``full``;
* long context at ``decode_context``: prefill and decode of eviction policies at ``budget`` and of
  a NAMM keeping ``namm_fraction`` of the tokens seen (budget mode), against ``full``: prefill time,
  decode tokens/s and peak KV bytes;
* one NAMM memory update of one layer holding ``decode_context`` tokens (random queries and keys of
  the model's shapes): seconds and the peak memory it takes beyond what was held before.

Timings take the best of ``repeats`` runs, alternating the contenders so background load hits
them alike.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from namm.memory.generation import GenerationOutput, generate
from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.namm.features import FeatureConfig, stft_basis
from namm.policies.namm.scorers import BAMScorer
from namm.policies.registry import make_policy
from namm.tasks.corpus import corpus_tokens

FULL, ZERO_NAMM, ZERO_NAMM_MLP = "full", "namm-zeros", "namm-zeros-mlp"
MLP_SCORER = {"kind": "mlp", "hidden": [8]}  # the campaign's scorer (runs/README.md, docs/algorithm.md §5)


@dataclass
class BenchmarkConfig:
    prefill_tokens: int = 4096
    decode_context: int = 8000
    decode_tokens: int = 64
    budget: float = 0.25
    policies: tuple[str, ...] = ("recency", "h2o")
    repeats: int = 2
    namm_fraction: float = 0.3


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best(contenders: dict[str, Callable[[], GenerationOutput]], repeats: int,
          key: Callable[[GenerationOutput], float]) -> dict[str, GenerationOutput]:
    """The best run (smallest ``key``) of each contender, alternating them within each repeat."""
    best: dict[str, GenerationOutput] = {}
    for _ in range(repeats):
        for name, run in contenders.items():
            out = run()
            if name not in best or key(out) < key(best[name]):
                best[name] = out
    return best


def zero_namm(scorer: str | dict = "bam") -> MemoryPolicy:
    """The all-zero NAMM: every update runs its features and scorer, and every token is kept."""
    return make_policy("namm", checkpoint="zeros", scorer=scorer)


def _best_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best of ``repeats`` timed calls of ``fn`` after one warm-up (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _device: None)
    fn()
    sync(device)
    return min(_seconds(lambda: (fn(), sync(device))) for _ in range(repeats))


@torch.inference_mode()
def mandatory_kernel_seconds(model: PreTrainedModel, tokens: int, repeats: int) -> dict:
    """Seconds, summed over the updates of a ``tokens``-long prefill (one every ``n_up`` tokens,
    cache sizes n_up, 2 n_up, ... in every layer), of the two kernels a zero NAMM must run beyond
    the full cache's work whatever the implementation: BAM's causal self-attention over each KV
    head's cached tokens (head size = BAM's hidden width) and the STFT's product of the basis with
    every token's signal frames (docs/algorithm.md §4-5). Random inputs of the model's shapes."""
    config = model.config.get_text_config()
    H, layers = config.num_key_value_heads, config.num_hidden_layers
    features, hidden = FeatureConfig(), BAMScorer().hidden
    device, gen = model.device, torch.Generator(device=model.device).manual_seed(0)
    basis = stft_basis(features, device)
    bam_s = stft_s = 0.0
    for cached in range(features.n_up, tokens + 1, features.n_up):
        q, k, v = torch.randn(3, 1, H, cached, hidden, generator=gen, device=device).unbind(0)
        bam_s += _best_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats, device)
        signals = torch.rand(1, H, features.frames, features.window, cached, generator=gen, device=device)
        stft_s += _best_seconds(lambda: torch.matmul(basis, signals), repeats, device)
    return {"bam_attention_s": bam_s * layers, "stft_matmul_s": stft_s * layers}


@torch.inference_mode()
def prefill_figures(model: PreTrainedModel, prompt: torch.Tensor, repeats: int) -> dict:
    """Seconds to prefill ``prompt`` with a plain transformers forward, the runtime's ``full``
    policy and the all-zero NAMM (BAM and MLP scorers); ratios of full to the plain forward and of each
    zero NAMM to full."""
    ids = prompt[None].to(model.device)
    policies = {FULL: make_policy("full"), ZERO_NAMM: zero_namm(), ZERO_NAMM_MLP: zero_namm(MLP_SCORER)}
    plain_s = float("inf")
    best: dict[str, float] = {}
    for _ in range(repeats):  # alternate the contenders so background load hits them alike
        plain_s = min(plain_s, _seconds(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)))
        for name, policy in policies.items():
            out = generate(model, None, prompt, policy=policy, max_new_tokens=0)
            best[name] = min(best.get(name, float("inf")), out.prefill_seconds)
    floor = mandatory_kernel_seconds(model, len(prompt), repeats)
    return {"tokens": len(prompt), "hf_forward_s": plain_s, "namm_full_s": best[FULL],
            "namm_zeros_s": best[ZERO_NAMM], "ratio": best[FULL] / plain_s,
            "namm_zeros_ratio": best[ZERO_NAMM] / best[FULL], "namm_zeros_mlp_s": best[ZERO_NAMM_MLP],
            "namm_zeros_mlp_ratio": best[ZERO_NAMM_MLP] / best[FULL], **floor,
            "floor_bam_ratio": (best[FULL] + floor["bam_attention_s"] + floor["stft_matmul_s"]) / best[FULL],
            "floor_mlp_ratio": (best[FULL] + floor["stft_matmul_s"]) / best[FULL]}


def long_context_figures(model: PreTrainedModel, prompt: torch.Tensor, cfg: BenchmarkConfig) -> dict:
    """Per policy at a long context: prefill seconds, decode tokens/s, policy seconds and peak KV
    bytes, with ratios against ``full`` (the NAMM row keeps ``namm_fraction`` of the tokens)."""
    policies = {FULL: make_policy("full"), **{name: make_policy(name, budget=cfg.budget) for name in cfg.policies},
                f"namm-{cfg.namm_fraction:g}": make_policy("namm", checkpoint="zeros", budget=cfg.namm_fraction)}
    runs = {name: (lambda p=policy: generate(model, None, prompt, policy=p, max_new_tokens=cfg.decode_tokens + 1,
                                             eos_token_id=None))
            for name, policy in policies.items()}
    best = _best(runs, cfg.repeats, key=lambda out: out.prefill_seconds + out.decode_seconds)
    full = best[FULL]
    return {name: {
        "prefill_s": out.prefill_seconds, "prefill_ratio": out.prefill_seconds / full.prefill_seconds,
        "decode_tokens_per_s": cfg.decode_tokens / out.decode_seconds,
        "decode_speedup": full.decode_seconds / out.decode_seconds,
        "policy_s": out.policy_seconds, "kv_bytes_peak": out.kv_bytes_peak,
        "kv_peak_ratio": out.kv_bytes_peak / full.kv_bytes_full_peak, "cache_fraction": out.cache_fraction,
    } for name, out in best.items()}


def update_view(model: PreTrainedModel, cached: int, n_queries: int, seed: int = 0) -> LayerView:
    """A layer view at a memory update of one row: ``cached`` random keys of the model's shapes at
    positions 0.., and the ``n_queries`` newest tokens' random queries buffered, on its device."""
    config = model.config.get_text_config()
    H, Hq = config.num_key_value_heads, config.num_attention_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // Hq
    device, dtype = model.device, model.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    keys = torch.randn(1, H, cached, D, generator=gen, device=device).to(dtype)
    return LayerView(
        layer_idx=0, num_layers=config.num_hidden_layers, keys=keys, values=keys,
        positions=torch.arange(cached, device=device).expand(1, H, cached).clone(),
        queries=torch.randn(1, Hq, n_queries, D, generator=gen, device=device).to(dtype),
        query_positions=torch.arange(cached - n_queries, cached, device=device)[None],
        tokens_seen=torch.tensor([cached], device=device), previous_tokens_seen=torch.tensor([cached - n_queries], device=device),
        scaling=D ** -0.5, sliding_window=None, state={}, rows=torch.tensor([0], device=device))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _release_free_heap() -> None:
    """Return the C heap's freed pages to the system (glibc keeps them resident, so a later call
    reusing them would not raise the resident set); nothing where the C library has no such call."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """Seconds of ``fn()`` and the most memory it held at once beyond what was held before: the
    allocator's peak on CUDA, the growth of the process's peak resident set on the CPU (Linux;
    -1 where it cannot be read)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        seconds = _seconds(lambda: (fn(), torch.cuda.synchronize(device)))
        return seconds, torch.cuda.max_memory_allocated(device) - before
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set to the current one
        before = _status_bytes("VmRSS")
    except OSError:
        return _seconds(fn), -1
    seconds = _seconds(fn)
    return seconds, _status_bytes("VmHWM") - before


@torch.inference_mode()
def namm_update_figures(model: PreTrainedModel, cached: int, repeats: int) -> dict:
    """Seconds (best of ``repeats``, after a warm-up) and peak memory of one NAMM update of one
    layer holding ``cached`` tokens: buffered attention, features, BAM scores and selection."""
    policy = zero_namm()
    policy.bind(model)
    n = min(policy.n_up, cached)
    policy.select(update_view(model, cached, n))  # warm-up
    runs = []
    for i in range(repeats):
        view = update_view(model, cached, n, seed=i + 1)
        runs.append(peak_memory(lambda: policy.select(view), model.device))
    return {"cached_tokens": cached, "queries": n, "seconds": min(s for s, _ in runs),
            "peak_bytes": max(b for _, b in runs)}


def runtime_benchmark(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: BenchmarkConfig) -> dict:
    """All runtime figures in one run (prompts are held-out corpus text)."""
    context = int(getattr(model.config, "max_position_embeddings", cfg.decode_context + cfg.decode_tokens + 1))
    if cfg.decode_context + cfg.decode_tokens + 1 > context:
        raise ValueError(f"decode context {cfg.decode_context} + {cfg.decode_tokens} new tokens exceeds the "
                         f"model's context of {context} tokens")
    prefill_prompt = corpus_tokens(tokenizer, cfg.prefill_tokens, split="heldout", seed=1)
    long_prompt = corpus_tokens(tokenizer, cfg.decode_context, split="heldout", seed=2)
    return {
        "config": cfg.__dict__ | {"policies": list(cfg.policies)},
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prefill": prefill_figures(model, prefill_prompt, cfg.repeats),
        "decode": long_context_figures(model, long_prompt, cfg),
        "namm_update": namm_update_figures(model, cfg.decode_context, cfg.repeats),
    }


def format_report(figures: dict) -> str:
    """A short human-readable table of :func:`runtime_benchmark`'s figures, with the targets."""
    cfg, pre, upd = figures["config"], figures["prefill"], figures["namm_update"]
    peak = "unknown" if upd["peak_bytes"] < 0 else f"{upd['peak_bytes'] / 2 ** 20:.1f} MiB"
    lines = [
        f"device {figures['device']}, {figures['dtype']}, {figures['threads']} threads",
        f"prefill {pre['tokens']} tokens: plain HF forward {pre['hf_forward_s']:.2f} s, namm full "
        f"{pre['namm_full_s']:.2f} s -> ratio {pre['ratio']:.3f} (target <= 1.05)",
        f"prefill {pre['tokens']} tokens: zero NAMM (BAM) {pre['namm_zeros_s']:.2f} s -> {pre['namm_zeros_ratio']:.3f}x "
        f"full (target <= 1.3)",
        f"prefill {pre['tokens']} tokens: zero NAMM (MLP 8) {pre['namm_zeros_mlp_s']:.2f} s -> "
        f"{pre['namm_zeros_mlp_ratio']:.3f}x full (target <= 1.3)",
        f"floor under the zero NAMM: full + BAM's K x K attention {pre['bam_attention_s']:.2f} s + STFT product "
        f"{pre['stft_matmul_s']:.2f} s -> {pre['floor_bam_ratio']:.3f}x full (BAM), {pre['floor_mlp_ratio']:.3f}x (MLP)",
        f"{cfg['decode_context']} tokens of context, then {cfg['decode_tokens']} decoded; eviction budget "
        f"{cfg['budget']} (decode target >= 1.5x), NAMM at {cfg['namm_fraction']} (prefill target <= 1.0x):",
        f"{'policy':<10} {'prefill s':>9} {'vs full':>8} {'tok/s':>7} {'speedup':>8} {'KV peak/full':>13} "
        f"{'cache frac':>11} {'policy s':>9}",
    ]
    for name, row in figures["decode"].items():
        lines.append(f"{name:<10} {row['prefill_s']:>9.2f} {row['prefill_ratio']:>7.3f}x {row['decode_tokens_per_s']:>7.1f} "
                     f"{row['decode_speedup']:>7.2f}x {row['kv_peak_ratio']:>13.3f} {row['cache_fraction']:>11.3f} "
                     f"{row['policy_s']:>9.2f}")
    lines.append(f"one NAMM update of one layer at {upd['cached_tokens']} cached tokens ({upd['queries']} queries): "
                 f"{upd['seconds']:.3f} s, peak memory {peak}")
    return "\n".join(lines)
