"""``snapkv``: SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before
Generation", arXiv 2404.14469).

The last ``window`` queries (the observation window) vote for the keys they attend to; votes are
smoothed with a max-pool of width ``kernel`` so neighbouring tokens survive together; each head
keeps the observation window itself plus the best-voted keys up to the budget. As in the paper,
it compresses once, at the end of the prompt (schedule "prompt-end"), so the window holds the
prompt's last tokens: the question.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.budget import Budget, budget_policy_init
from namm.policies.selection import keep_top, neighbour_max, recent_slots


def snapkv_scores(view: LayerView, kernel: int) -> Tensor:
    """(B, H, K) pooled attention votes of the buffered observation window."""
    return neighbour_max(view.attention().sum(2), kernel)


@dataclass
class SnapKVPolicy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    window: int = 32
    kernel: int = 7
    n_up: int = 512
    name = "snapkv"
    default_schedule = "prompt-end"

    def __post_init__(self) -> None:
        budget_policy_init(self)
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError("window must be >= 1 and kernel an odd number >= 1")
        self.query_window = self.window

    def select(self, view: LayerView) -> Tensor:
        cap = self.budget.capacity(view.tokens_seen)
        return keep_top(snapkv_scores(view, self.kernel), cap, view.valid, always=recent_slots(view.valid, self.window))
