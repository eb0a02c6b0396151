"""``pyramidkv``: PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling", arXiv 2406.02069).

SnapKV's scores, but the budget is spread over layers as an arithmetic progression: lower layers,
whose attention is broad, get more tokens; upper layers, whose attention is focused, get fewer.
The mean over layers equals the budget; the top layer gets ``budget / beta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from namm.policies.base import (
    Budget, LayerView, MemoryPolicy, budget_policy_init, keep_top, recent_slots, register_policy,
)
from namm.policies.snapkv import snapkv_scores


def pyramid_capacity(mean_cap: Tensor, layer_idx: int, num_layers: int, beta: float) -> Tensor:
    """Per-row tokens for one layer so that the mean over layers is ``mean_cap``."""
    low = mean_cap.double() / beta
    high = 2 * mean_cap.double() - low
    frac = layer_idx / max(num_layers - 1, 1)
    return torch.round(high - (high - low) * frac).long().clamp(min=1)


@register_policy("pyramidkv")
@dataclass
class PyramidKVPolicy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    window: int = 32
    kernel: int = 7
    beta: float = 20.0
    n_up: int = 512
    name = "pyramidkv"

    def __post_init__(self) -> None:
        budget_policy_init(self)
        if self.beta < 1:
            raise ValueError("beta must be >= 1")
        self.query_window = self.window

    def select(self, view: LayerView) -> Tensor:
        cap = pyramid_capacity(self.budget.capacity(view.tokens_seen), view.layer_idx, view.num_layers, self.beta)
        window = recent_slots(view.valid, self.window)
        return keep_top(snapkv_scores(view, self.kernel), cap, view.valid, always=window)
