"""``random``: keep a uniformly random subset of tokens (the floor any policy must beat).

Seeded per (seed, layer, tokens seen), so a row gets the same choice alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from namm.policies.base import Budget, LayerView, MemoryPolicy, budget_policy_init, keep_top, register_policy


@register_policy("random")
@dataclass
class RandomPolicy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    seed: int = 0
    n_up: int = 512
    name = "random"

    def __post_init__(self) -> None:
        budget_policy_init(self)

    def select(self, view: LayerView) -> Tensor:
        B, H, K = view.positions.shape
        scores = torch.empty(B, H, K)
        for b in range(B):  # a score per (head, position), independent of slot layout and batch
            seen = int(view.tokens_seen[b])
            gen = torch.Generator().manual_seed(hash((self.seed, view.layer_idx, seen)) % (1 << 62))
            table = torch.rand(H, seen, generator=gen)
            scores[b] = table.gather(1, view.positions[b].cpu().clamp(min=0, max=seen - 1))
        return keep_top(scores.to(view.positions.device), self.budget.capacity(view.tokens_seen), view.valid)
