"""``l2``: key-norm eviction (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy
for KV Cache Compression", arXiv 2406.11430).

Keys with a low L2 norm tend to receive high attention, so each head keeps the lowest-norm keys.
The first ``skip_layers`` layers (two by default, as in the paper) are kept whole, out of the same
memory: at budget b the whole layers and the compressed ones together hold at most b times the
full cache. Whole layers take at most half of that total (fewer are kept whole when the budget is
small); the other layers share the rest equally. Needs no attention at all, so it is the cheapest
policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.budget import Budget, budget_policy_init
from namm.policies.selection import keep_top


def l2_layer_capacity(cap: Tensor, tokens_seen: Tensor, layer_idx: int, num_layers: int,
                      skip_layers: int) -> tuple[Tensor, Tensor]:
    """For a per-layer budget ``cap`` (B,): which rows keep this layer whole (B,) bool, and the
    tokens (B,) each head of a compressed layer keeps, so that the layers sum to at most
    ``num_layers * cap``. ``s`` layers are whole when ``s * tokens_seen <= (cap - 1) * num_layers / 2``,
    which leaves every compressed layer at least one token."""
    total = cap * num_layers
    whole = torch.div((cap - 1) * num_layers, 2 * tokens_seen, rounding_mode="floor").clamp(max=skip_layers)
    rest = torch.div(total - whole * tokens_seen, num_layers - whole, rounding_mode="floor")
    return layer_idx < whole, rest


@dataclass
class L2Policy(MemoryPolicy):
    budget: Budget | float | int | str = 0.25
    skip_layers: int = 2
    n_up: int = 512
    name = "l2"

    def __post_init__(self) -> None:
        budget_policy_init(self)
        if self.skip_layers < 0:
            raise ValueError("skip_layers must be >= 0")

    def select(self, view: LayerView) -> Tensor:
        whole, cap = l2_layer_capacity(self.budget.capacity(view.tokens_seen), view.tokens_seen, view.layer_idx,
                                       view.num_layers, self.skip_layers)
        if bool(whole.all()):
            return view.valid
        # compared at half precision: norms equal up to float noise (a token repeated in the first
        # layer, models that normalise keys such as Gemma 3) tie, and the older token goes first
        norms = view.keys.float().norm(dim=-1).half()
        return torch.where(whole.view(-1, 1, 1), view.valid, keep_top(-norms, cap, view.valid))
