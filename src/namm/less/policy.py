"""``LessPolicy``: wrap any eviction policy with LESS, a low-rank memory of what it evicts.

The wrapped policy decides what to keep, as usual. At each memory update the wrapper folds the
tokens it evicts into a per-(row, layer, KV head) state (:class:`~namm.less.state.LessState`); the
runtime's attention then calls :meth:`LessPolicy.attend`, which mixes exact softmax attention
over the kept keys with the low-rank part (:func:`~namm.less.kernels.mix_low_rank`). Layers with a
sliding window keep plain attention (their far tokens must stay invisible).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from namm.less.kernels import LessKernels, mix_low_rank, sparse_attention
from namm.less.state import LessState
from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.wrapped import WrappedPolicy


class LessPolicy(WrappedPolicy):
    """``inner`` policy + LESS. ``kernels``: :class:`LessKernels`, a shipped name or a checkpoint path."""

    def __init__(self, inner: MemoryPolicy, kernels: LessKernels | str | Path):
        if isinstance(inner, LessPolicy):
            raise ValueError("this policy already has LESS")
        if not isinstance(kernels, LessKernels):
            from namm.less.checkpoint import load_less_kernels

            kernels = load_less_kernels(kernels)
        super().__init__(inner, name=f"{inner.name}+less")
        self.kernels = kernels.eval().requires_grad_(False)
        self.state = LessState(kernels.config.num_layers, 1)

    def __getattr__(self, item: str):  # budget, set_population, ... of the wrapped policy
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)

    def bind(self, model) -> None:
        """Bind the wrapped policy and move the kernels to the model's device and dtype."""
        super().bind(model)
        self.kernels.to(device=model.device, dtype=model.dtype)

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self.state = LessState(self.kernels.config.num_layers, batch_size)

    def _check(self, layer_idx: int, q_heads: int, kv_heads: int, head_dim: int) -> None:
        c = self.kernels.config
        if layer_idx >= c.num_layers or (q_heads, kv_heads, head_dim) != (c.q_heads, c.kv_heads, c.head_dim):
            raise ValueError(f"LESS kernels were made for {c.num_layers} layers, {c.q_heads} query heads, "
                             f"{c.kv_heads} KV heads, head dim {c.head_dim}; this model does not match "
                             f"(layer {layer_idx}: {q_heads} query heads, {kv_heads} KV heads, head dim {head_dim})")

    @torch.no_grad()
    def select(self, view: LayerView) -> Tensor:
        keep = super().select(view)
        if view.sliding_window is not None:
            return keep
        B, H, K, D = view.keys.shape
        self._check(view.layer_idx, self.kernels.config.q_heads, H, D)
        evicted = view.valid & ~keep
        if bool(evicted.any()):
            psi = self.kernels.layers[view.layer_idx].psi(self._in_kernel_dtype(view.keys)).float()
            self.state.fold(view.layer_idx, view.rows, psi, view.values, evicted)
        return keep

    @torch.no_grad()
    def attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, visible: Tensor,
               scaling: float) -> Tensor | None:
        """The attention output (B, Hq, Q, D) with the low-rank memory, or None (plain SDPA) while
        this layer has evicted nothing."""
        state_h, state_z = self.state.h[layer_idx], self.state.z[layer_idx]
        if state_h is None:
            return None
        B, Hq, Q, D = query.shape
        H = key.shape[1]
        self._check(layer_idx, Hq, H, D)
        kernels = self.kernels.layers[layer_idx]
        out, lse = sparse_attention(query, key, value, visible, scaling)
        phi = kernels.phi(self._in_kernel_dtype(query)).float().view(B, H, Hq // H, Q, -1)
        mixed = mix_low_rank(out, lse, phi, kernels.log_scale.float().view(H, Hq // H), state_h, state_z)
        return mixed.reshape(B, Hq, Q, -1).to(query.dtype)

    def _in_kernel_dtype(self, x: Tensor) -> Tensor:
        return x.to(self.kernels.layers[0].log_scale.dtype)

    def state_nbytes(self) -> int:
        """Bytes of the LESS state of one sequence across all layers that use it."""
        return self.state.nbytes()
