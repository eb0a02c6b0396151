"""NAMM token selection: threshold the scores, one count per layer (docs/algorithm.md §6)."""

from __future__ import annotations

import torch
from torch import Tensor

from namm.policies.base import keep_top


def newest_mask(valid: Tensor) -> Tensor:
    """(B, H, K) bool: the newest valid slot of each head (slots are packed, in temporal order)."""
    newest = torch.zeros_like(valid)
    newest.scatter_(-1, (valid.sum(-1, keepdim=True) - 1).clamp(min=0), True)
    return newest & valid


def threshold_counts(scores: Tensor, valid: Tensor, threshold: float) -> Tensor:
    """(B,) tokens each row keeps per head: the max over heads of #(score >= threshold), counting
    the newest token, which is always kept."""
    above = valid & ((scores >= threshold) | newest_mask(valid))
    return above.sum(-1).amax(-1)


def select_tokens(scores: Tensor, valid: Tensor, threshold: float = 0.0, cap: Tensor | None = None) -> Tensor:
    """(B, H, K) keep mask: every head of a row keeps the same count K = max over heads of the
    tokens at or above ``threshold`` (at most ``cap`` (B,) when given), its top-K by score, the
    newest token first. NaN scores rank last."""
    scores = scores.float().nan_to_num(nan=float("-inf"))
    count = threshold_counts(scores, valid, threshold)
    if cap is not None:
        count = torch.minimum(count, cap.to(count.device))
    return keep_top(scores, count, valid)
