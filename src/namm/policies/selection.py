"""Selection helpers shared by the policies: turn scores or recency into a keep mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def recent_slots(valid: Tensor, count: Tensor | int) -> Tensor:
    """(B, H, K) bool: the ``count`` newest valid slots of each head (slots are packed)."""
    held = valid.sum(-1, keepdim=True)
    count = count if isinstance(count, int) else count.view(-1, 1, 1)
    idx = torch.arange(valid.shape[-1], device=valid.device)
    return valid & (idx >= held - count)


def keep_top(scores: Tensor, count: Tensor, valid: Tensor, always: Tensor | None = None) -> Tensor:
    """Keep, per (row, head), the ``count[row]`` valid slots with the highest scores.

    ``always`` (B, H, K) marks slots that go before any scored slot; the newest valid slot of every
    head goes first of all, so it is kept whenever ``count >= 1``. Never keeps more than ``count``.
    Returns a (B, H, K) bool mask.
    """
    B, H, K = scores.shape
    newest = torch.zeros_like(valid)
    last = (valid.sum(-1).clamp(min=1) - 1).unsqueeze(-1)
    newest.scatter_(-1, last, True)
    newest &= valid
    ranked = torch.where(valid, scores.float(), float("-inf"))
    if always is not None:
        ranked = torch.where(always & valid, torch.finfo(torch.float32).max, ranked)
    ranked = torch.where(newest, float("inf"), ranked)
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(K, device=scores.device).expand(B, H, K))
    limit = count.to(scores.device).view(B, 1, 1).clamp(min=1)
    return valid & (rank < limit)


def neighbour_max(scores: Tensor, width: int) -> Tensor:
    """(B, H, K) each slot's score replaced by the largest within ``width`` (odd) slots centred on
    it, so a token survives with its neighbours; ``width`` 1 returns ``scores`` unchanged."""
    if width == 1:
        return scores
    B, H, K = scores.shape
    pooled = F.max_pool1d(scores.reshape(B * H, 1, K), kernel_size=width, stride=1, padding=width // 2)
    return pooled.reshape(B, H, K)
