"""Test helper: a policy that runs another one and records each update through ``record``."""

from __future__ import annotations

import torch

from namm.policies.base import LayerView, MemoryPolicy


class WrappedPolicy(MemoryPolicy):
    """Runs ``inner`` on its own schedule; subclasses keep what they need of each update."""

    def __init__(self, inner: MemoryPolicy):
        self.inner, self.name = inner, inner.name
        self.n_up, self.query_window, self.evicts = inner.n_up, inner.query_window, inner.evicts
        self.schedule = inner.schedule

    def bind(self, model) -> None:
        self.inner.bind(model)
        self.n_up, self.query_window = self.inner.n_up, self.inner.query_window

    def reset(self, batch_size: int) -> None:
        self.inner.reset(batch_size)

    def select(self, view: LayerView) -> torch.Tensor:
        keep = self.inner.select(view)
        self.record(view, keep)
        return keep

    def record(self, view: LayerView, keep: torch.Tensor) -> None:
        raise NotImplementedError
