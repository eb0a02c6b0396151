"""``full``: keep every token (the reference every other policy is measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy


@dataclass
class FullPolicy(MemoryPolicy):
    """Keeps the whole KV cache; the runtime never runs an update for it."""

    name = "full"
    evicts = False

    def select(self, view: LayerView) -> Tensor:
        return view.valid
