"""``l2``: key-norm eviction (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy
for KV Cache Compression", arXiv 2406.11430).

Keys with a low L2 norm tend to receive high attention, so each head keeps the lowest-norm keys
up to the budget. The first ``skip_layers`` layers (two by default, as in the paper) are never
compressed. Needs no attention at all, so it is the cheapest policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from namm.policies.base import Budget, LayerView, MemoryPolicy, budget_policy_init, keep_top, register_policy


@register_policy("l2")
@dataclass
class L2Policy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    skip_layers: int = 2
    n_up: int = 512
    name = "l2"

    def __post_init__(self) -> None:
        budget_policy_init(self)

    def select(self, view: LayerView) -> Tensor:
        if view.layer_idx < self.skip_layers:
            return view.valid
        norms = view.keys.float().norm(dim=-1)
        return keep_top(-norms, self.budget.capacity(view.tokens_seen), view.valid)
