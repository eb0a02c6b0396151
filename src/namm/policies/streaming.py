"""``streaming``: StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with
Attention Sinks", arXiv 2309.17453).

Keeps the first ``sinks`` tokens of the sequence (the attention sinks that absorb surplus
attention) plus the most recent tokens, up to the budget. Unlike the original we never re-rotate
keys: every token keeps its true position, as for every namm policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.budget import Budget, budget_policy_init
from namm.policies.selection import keep_top


@dataclass
class StreamingPolicy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    sinks: int = 4
    n_up: int = 512
    name = "streaming"

    def __post_init__(self) -> None:
        budget_policy_init(self)
        if self.sinks < 0:
            raise ValueError("sinks must be >= 0")

    def select(self, view: LayerView) -> Tensor:
        sink = view.valid & (view.positions < self.sinks)
        return keep_top(view.positions, self.budget.capacity(view.tokens_seen), view.valid, always=sink)
