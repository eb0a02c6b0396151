"""``tova``: Token Omission Via Attention (Oren et al., 2024, "Transformers are Multi-State RNNs",
arXiv 2401.06104).

Scores every token by the attention the newest query pays it, averaged over all heads of the
layer, and keeps the same best tokens for every head up to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.budget import Budget, budget_policy_init
from namm.policies.selection import keep_top


@dataclass
class TOVAPolicy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    n_up: int = 512
    name = "tova"
    query_window = 1

    def __post_init__(self) -> None:
        budget_policy_init(self)

    def select(self, view: LayerView) -> Tensor:
        last = view.attention()[:, :, -1]  # (B, H, K)
        scores = last.mean(1, keepdim=True).expand_as(last)
        return keep_top(scores, self.budget.capacity(view.tokens_seen), view.valid)
