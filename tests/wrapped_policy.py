"""Test helper: a policy that runs another one and records each update through ``record``."""

from __future__ import annotations

import torch

from namm.policies.base import LayerView
from namm.policies.wrapped import WrappedPolicy


class RecordingPolicy(WrappedPolicy):
    """Runs ``inner`` on its own schedule; subclasses keep what they need of each update."""

    def select(self, view: LayerView) -> torch.Tensor:
        keep = super().select(view)
        self.record(view, keep)
        return keep

    def record(self, view: LayerView, keep: torch.Tensor) -> None:
        raise NotImplementedError
