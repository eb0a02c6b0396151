"""Capture the training data of LESS kernels: one pass of the frozen model over a sequence with the
eviction policy active, recording every layer's queries, keys and values (after RoPE) and when
each token was evicted, then the full-cache targets of a sample of query positions.

Everything stays on the model's device; :func:`capture_sequence` returns, per full-attention
layer, the tensors :mod:`namm.less.training` fits on (moved to the CPU only to be saved).
"""

from __future__ import annotations

import torch
from torch import Tensor

from namm.less.kernels import sparse_attention
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.wrapped import WrappedPolicy

NEVER = torch.iinfo(torch.int32).max  # eviction index of a token still kept


def last_update(updates: Tensor, positions: Tensor) -> Tensor:
    """Index of the last update at or before each position (−1 before the first): a query at
    ``t`` sees the keys whose ``evict_at`` exceeds it, and the LESS state of those that do not."""
    return torch.searchsorted(updates, positions, right=True) - 1


class EvictionRecorder(WrappedPolicy):
    """Run ``inner`` (its ``attend`` hook too) and record, per layer, the tokens seen at each update
    and, per (KV head, position), the index of the update that evicted the token (:data:`NEVER`
    while kept). One row, ``length`` tokens at most."""

    def __init__(self, inner: MemoryPolicy, num_layers: int, length: int):
        super().__init__(inner)
        self.length = length
        self.updates: list[list[int]] = [[] for _ in range(num_layers)]
        self.evicted_at: list[Tensor | None] = [None] * num_layers

    def attend(self, layer_idx, query, key, value, visible, scaling):
        hook = self.inner.attend
        return None if hook is None else hook(layer_idx, query, key, value, visible, scaling)

    def select(self, view: LayerView) -> Tensor:
        keep = super().select(view)
        layer = view.layer_idx
        if self.evicted_at[layer] is None:
            self.evicted_at[layer] = torch.full((view.keys.shape[1], self.length), NEVER, dtype=torch.int32,
                                                device=view.keys.device)
        heads, slots = (view.valid & ~keep)[0].nonzero(as_tuple=True)
        self.evicted_at[layer][heads, view.positions[0, heads, slots]] = len(self.updates[layer])
        self.updates[layer].append(int(view.tokens_seen[0]))
        return keep

    def intervals(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(updates, evict_at)`` of ``layer``: the tokens seen at each update before the last token
        (long, CPU) and the update index that evicted each token, ``len(updates)`` for a token still
        kept (updates at the end evict nothing any query sees)."""
        updates = torch.tensor([u for u in self.updates[layer] if u < self.length], dtype=torch.long)
        return updates, self.evicted_at[layer].clamp_max(len(updates))


class _Recorder(EvictionRecorder):
    """:class:`EvictionRecorder` that also records every query, key and value of every layer
    through the attention hook (the inner policy's hook is not called)."""

    def __init__(self, inner: MemoryPolicy, num_layers: int, length: int):
        super().__init__(inner, num_layers, length)
        self.qkv: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(num_layers)]

    def attend(self, layer_idx, query, key, value, visible, scaling):
        Q = query.shape[2]  # one row, no padding: the step's keys are the last Q slots
        self.qkv[layer_idx].append((query[0], key[0, :, -Q:], value[0, :, -Q:]))
        return None


@torch.inference_mode()
def capture_sequence(model, tokens: Tensor, policy: MemoryPolicy, queries_per_seq: int,
                     gen: torch.Generator) -> dict[str, Tensor]:
    """Training tensors of one sequence for every full-attention layer that evicted, keyed
    ``"{layer}.{name}"``: ``q`` (Hq, Nq, D) sampled queries, ``k``/``v`` (H, T', D) the tokens
    before the last update, ``evict_at`` (H, T') the update index that evicted each (U = kept),
    ``interval`` (Nq,) the last update before each query, ``sparse``/``lse`` exact attention over
    the kept keys and ``target`` over all keys (H, G, Nq, ...). ``gen`` (CPU) draws the queries."""
    num_layers = model.config.get_text_config().num_hidden_layers
    T = len(tokens)
    record = _Recorder(policy, num_layers, T)
    with memory_attention_enabled(model):
        runner = MemoryRunner(model, record, 1)
        runner.feed([tokens])
    out: dict[str, Tensor] = {}
    for layer_idx, cache_layer in enumerate(runner.cache.layers):
        if cache_layer.sliding_window is not None or record.evicted_at[layer_idx] is None:
            continue
        updates, evict_at = record.intervals(layer_idx)
        if len(updates) == 0:
            continue
        q, k, v = (torch.cat(parts, dim=1).float() for parts in zip(*record.qkv[layer_idx]))  # (H or Hq, T, D)
        device = k.device
        pool = torch.arange(int(updates[0]), T)
        t = pool[torch.randperm(len(pool), generator=gen)[:queries_per_seq]].sort().values
        interval = last_update(updates, t).to(device)
        t = t.to(device)
        Hq, H = q.shape[0], k.shape[0]
        positions = torch.arange(T, device=device)
        causal = positions[None, :] <= t[:, None]  # (Nq, T)
        qs = q[:, t][None]
        target, _ = sparse_attention(qs, k[None], v[None], causal[None, None], cache_layer.scaling)
        kept = causal[:, None, :] & (evict_at[None] > interval[:, None, None])  # (Nq, H, T)
        visible = kept.permute(1, 0, 2).repeat_interleave(Hq // H, dim=0)[None]
        sparse, lse = sparse_attention(qs, k[None], v[None], visible, cache_layer.scaling)
        cut = int(updates[-1])
        tensors = {"q": qs[0], "k": k[:, :cut], "v": v[:, :cut], "evict_at": evict_at[:, :cut], "interval": interval,
                   "sparse": sparse[0], "lse": lse[0], "target": target[0]}
        out.update({f"{layer_idx}.{name}": x.contiguous() for name, x in tensors.items()})
    return out


def attention_modules(model) -> list[torch.nn.Module]:
    """The attention module of every layer (the ones holding ``o_proj``), in layer order."""
    found = sorted((m for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "layer_idx")),
                   key=lambda m: m.layer_idx)
    if len(found) != model.config.get_text_config().num_hidden_layers:
        raise ValueError("LESS training needs attention modules with an `o_proj` and a `layer_idx` in every layer")
    return found
