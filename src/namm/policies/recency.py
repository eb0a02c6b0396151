"""``recency``: a sliding window over the newest tokens.

Keeps the ``budget`` most recent tokens of every head. The simplest baseline: what a model with
a local attention window would remember.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.budget import Budget, budget_policy_init
from namm.policies.selection import keep_top


@dataclass
class RecencyPolicy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    n_up: int = 512
    name = "recency"

    def __post_init__(self) -> None:
        budget_policy_init(self)

    def select(self, view: LayerView) -> Tensor:
        return keep_top(view.positions, self.budget.capacity(view.tokens_seen), view.valid)
