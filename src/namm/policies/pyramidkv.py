"""``pyramidkv``: PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling", arXiv 2406.02069).

SnapKV's scores, but the budget is spread over layers as an arithmetic progression: lower layers,
whose attention is broad, get more tokens; upper layers, whose attention is focused, get fewer.
The layer sizes sum to at most the budget times the number of layers (the same memory as any
other policy at that budget); the top layer gets ``budget / beta`` (at least one token). Like
SnapKV it compresses once, at the end of the prompt, by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from namm.policies.base import LayerView
from namm.policies.selection import keep_top, recent_slots
from namm.policies.snapkv import SnapKVPolicy, snapkv_scores


def pyramid_capacity(mean_cap: Tensor, layer_idx: int, num_layers: int, beta: float) -> Tensor:
    """Per-row tokens for one layer: an arithmetic progression over layers, from
    ``2 * mean_cap - low`` at the bottom to ``low = max(mean_cap / beta, 1)`` at the top, rounded
    down, so the sum over layers never exceeds ``num_layers * mean_cap``."""
    mean = mean_cap.double()
    low = (mean / beta).clamp(min=1)
    high = 2 * mean - low
    frac = layer_idx / (num_layers - 1) if num_layers > 1 else 0.5  # one layer: the mean
    return torch.floor(high - (high - low) * frac).long()


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    """SnapKV with per-layer sizes from :func:`pyramid_capacity`."""

    beta: float = 20.0
    name = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError("beta must be >= 1")

    def select(self, view: LayerView) -> Tensor:
        cap = pyramid_capacity(self.budget.capacity(view.tokens_seen), view.layer_idx, view.num_layers, self.beta)
        window = recent_slots(view.valid, self.window)
        return keep_top(snapkv_scores(view, self.kernel), cap, view.valid, always=window)
