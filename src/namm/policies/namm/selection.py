"""NAMM token selection: threshold the scores, one count per layer (docs/algorithm.md §6)."""

from __future__ import annotations

import torch
from torch import Tensor

from namm.policies.selection import keep_top, neighbour_max


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


def select_tokens(scores: Tensor, valid: Tensor, threshold: float = 0.0, cap: Tensor | None = None,
                  floor: Tensor | None = None, extra: int = 0) -> Tensor:
    """(B, H, K) keep mask: every head of a row keeps the same count K = max over heads of the
    tokens at or above ``threshold``, plus ``extra`` (at least ``floor`` (B,) and at most ``cap``
    (B,) when given), its top-K by score, the newest token first. NaN scores rank last."""
    scores = scores.float().nan_to_num(nan=float("-inf"))
    count = threshold_counts(scores, valid, threshold) + extra
    if floor is not None:
        count = torch.maximum(count, floor.to(count.device))
    if cap is not None:
        count = torch.minimum(count, cap.to(count.device))
    return keep_top(scores, count, valid)


def pooled_scores(scores: Tensor, valid: Tensor, pool: int) -> Tensor:
    """(B, H, K) scores max-pooled over ``pool`` (odd) neighbouring slots of a head, so a token
    survives with its neighbours (docs/algorithm.md §6); empty slots and NaN count as -inf."""
    if pool == 1:
        return scores
    scores = scores.float().nan_to_num(nan=float("-inf")).masked_fill(~valid, float("-inf"))
    return neighbour_max(scores, pool)


def out_of_window(scores: Tensor, valid: Tensor, positions: Tensor, tokens_seen: Tensor, window: Tensor,
                  cap: Tensor | None) -> tuple[Tensor, Tensor]:
    """Scores and cap for a sliding-window layer (docs/algorithm.md §6): a token at or before
    ``tokens_seen - window`` can never be attended again, so it ranks last (-inf) and the count is
    capped at the most tokens still inside the window of any head. ``window`` is (B,) per row (a
    huge value for a global layer); ``positions`` (B, H, K) absolute positions."""
    dead = valid & (positions <= (tokens_seen - window).view(-1, 1, 1))
    alive = (valid & ~dead).sum(-1).amax(-1)
    limit = alive if cap is None else torch.minimum(cap.to(alive.device), alive)
    return scores.masked_fill(dead, float("-inf")), limit
