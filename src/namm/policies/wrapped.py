"""``WrappedPolicy``: the one base of policies that run another policy and add to it."""

from __future__ import annotations

from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy


class WrappedPolicy(MemoryPolicy):
    """Runs ``inner`` unchanged: its schedule, update interval, query window and whether it evicts
    are read from ``inner`` (never copied, so they follow ``inner.bind``). Subclasses extend
    :meth:`select` (call ``super().select``) or add an ``attend`` hook."""

    def __init__(self, inner: MemoryPolicy, name: str | None = None):
        self.inner = inner
        self.name = name or inner.name

    @property
    def n_up(self) -> int:
        return self.inner.n_up

    @property
    def query_window(self) -> int | None:
        return self.inner.query_window

    @property
    def evicts(self) -> bool:
        return self.inner.evicts

    @property
    def schedule(self) -> str:
        return self.inner.schedule

    @schedule.setter
    def schedule(self, value: str) -> None:
        self.inner.schedule = value

    def bind(self, model) -> None:
        self.inner.bind(model)

    def reset(self, batch_size: int) -> None:
        self.inner.reset(batch_size)

    def state_nbytes(self) -> int:
        return self.inner.state_nbytes()

    def select(self, view: LayerView) -> Tensor:
        return self.inner.select(view)
