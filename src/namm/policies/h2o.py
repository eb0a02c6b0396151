"""``h2o``: Heavy-Hitter Oracle (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv 2306.14048).

Every token accumulates the attention it receives from all later queries (averaged over the
query heads of its KV head). At an update each head keeps its most recent ``recent_ratio`` of
the budget plus the tokens with the largest accumulated attention for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.budget import Budget, budget_policy_init
from namm.policies.selection import keep_top, recent_slots


@dataclass
class H2OPolicy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    recent_ratio: float = 0.5
    n_up: int = 512
    name = "h2o"
    query_window = None

    def __post_init__(self) -> None:
        budget_policy_init(self)
        if not 0 <= self.recent_ratio <= 1:
            raise ValueError("recent_ratio must be in [0, 1]")

    def select(self, view: LayerView) -> Tensor:
        acc = view.state.get("h2o_acc")
        received = view.attention().sum(2)  # (B, H, K)
        acc = received if acc is None else acc + received
        view.state["h2o_acc"] = acc
        cap = self.budget.capacity(view.tokens_seen)
        recent = recent_slots(view.valid, torch.floor(cap.double() * self.recent_ratio).long())
        return keep_top(acc, cap, view.valid, always=recent)
