"""Memory budgets: how many tokens a budgeted policy may keep after an update."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Budget:
    """A cache budget: a fraction of tokens seen (0 < f <= 1) or an absolute token count (>= 1)."""

    def __init__(self, value: float | int | str):
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text) if text.isdigit() and int(text) > 1 else float(text)
            except ValueError:
                raise ValueError(f"budget must be a fraction in (0, 1] or a token count >= 2, got {text!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"budget must be a number, got {value!r}")
        if isinstance(value, int) and value > 1:
            self.fraction, self.tokens = None, int(value)
        elif 0 < value <= 1:
            self.fraction, self.tokens = float(value), None
        else:
            raise ValueError(f"budget must be a fraction in (0, 1] or a token count >= 2, got {value!r}")

    def capacity(self, tokens_seen: Tensor) -> Tensor:
        """(B,) int64 number of tokens each row may keep per head after an update: at most
        ``fraction * tokens_seen`` (so the memory never exceeds the budget), at least 1."""
        if self.tokens is not None:
            cap = torch.full_like(tokens_seen, self.tokens)
        else:
            cap = torch.floor(tokens_seen.double() * self.fraction).long()
        return cap.clamp(min=1)

    def __repr__(self) -> str:
        return f"Budget({self.tokens if self.tokens is not None else self.fraction})"


def budget_policy_init(policy) -> None:
    """Shared checks for policies with a ``budget`` and ``n_up`` field."""
    policy.budget = policy.budget if isinstance(policy.budget, Budget) else Budget(policy.budget)
    if int(policy.n_up) < 1:
        raise ValueError(f"n_up must be >= 1, got {policy.n_up}")
