"""``random``: keep a uniformly random subset of tokens (the floor any policy must beat).

The score of a token is a hash of (seed, layer, tokens seen, head, position), computed on the
cache's device for all rows at once, so a row gets the same choice alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.budget import Budget, budget_policy_init
from namm.policies.selection import keep_top

_MASK = (1 << 32) - 1


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of int64 values in [0, 2**32), elementwise.
    Multipliers stay below 2**31, so no product overflows int64."""
    for shift, mult in ((16, 0x2C1B3C6D), (15, 0x297A2D39), (16, 0x3B9AC9FF)):
        x = ((x ^ (x >> shift)) * mult) & _MASK
    return x ^ (x >> 16)


def random_scores(seed: int, layer: int, tokens_seen: Tensor, positions: Tensor) -> Tensor:
    """(B, H, K) float32 scores in [0, 1) for (B, H, K) ``positions`` at (B,) ``tokens_seen``: a
    function of (seed, layer, tokens seen, head, position) only."""
    B, H, K = positions.shape
    heads = torch.arange(H, device=positions.device).view(1, H, 1)
    x = mix32(torch.full((1, 1, 1), (seed * 1_000_003 + layer) & _MASK, dtype=torch.long, device=positions.device))
    x = mix32(x ^ (tokens_seen.view(B, 1, 1).long() & _MASK))
    x = mix32(x ^ heads)
    x = mix32(x ^ (positions.clamp(min=0) & _MASK))
    return (x >> 8).float() / (1 << 24)  # 24 bits: exact in float32


@dataclass
class RandomPolicy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    seed: int = 0
    n_up: int = 512
    name = "random"

    def __post_init__(self) -> None:
        budget_policy_init(self)

    def select(self, view: LayerView) -> Tensor:
        scores = random_scores(self.seed, view.layer_idx, view.tokens_seen, view.positions)
        return keep_top(scores, self.budget.capacity(view.tokens_seen), view.valid)
