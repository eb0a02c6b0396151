"""The constant-size LESS memory of evicted tokens: per layer, row and KV head, H (R×d) and z (R)."""

from __future__ import annotations

import torch
from torch import Tensor


class LessState:
    """Float32 low-rank state of every layer; a layer's tensors exist once it has evicted a token."""

    def __init__(self, num_layers: int, batch_size: int):
        self.batch_size = batch_size
        self.h: list[Tensor | None] = [None] * num_layers  # (B, H, R, D)
        self.z: list[Tensor | None] = [None] * num_layers  # (B, H, R)
        self.folded: list[Tensor | None] = [None] * num_layers  # (B, H) tokens folded in so far

    def fold(self, layer: int, rows: Tensor, psi: Tensor, values: Tensor, evicted: Tensor) -> None:
        """Add every evicted token of ``rows`` once: ``H += ψ(k)ᵀv``, ``z += ψ(k)``.

        ``psi`` (b, H, K, R) are the key features, ``values`` (b, H, K, D), ``evicted`` (b, H, K) bool."""
        psi = psi * evicted.unsqueeze(-1).to(psi.dtype)
        if self.h[layer] is None:
            B, H, _, R = psi.shape
            D = values.shape[-1]
            self.h[layer] = psi.new_zeros(self.batch_size, H, R, D)
            self.z[layer] = psi.new_zeros(self.batch_size, H, R)
            self.folded[layer] = torch.zeros(self.batch_size, H, dtype=torch.long, device=psi.device)
        self.h[layer][rows] += torch.matmul(psi.transpose(-1, -2), values.float())
        self.z[layer][rows] += psi.sum(-2)
        self.folded[layer][rows] += evicted.sum(-1)

    def nbytes(self) -> int:
        """Bytes held by the state of one row, summed over layers (0 before any eviction)."""
        per_row = 0
        for h, z in zip(self.h, self.z):
            if h is not None:
                per_row += (h[0].numel() + z[0].numel()) * h.element_size()
        return per_row
