"""Rank statistics of member fitness: how far two scorings of the same members agree."""

from __future__ import annotations

import torch


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 along the last dimension (ties broken by order; float values rarely tie)."""
    return torch.argsort(torch.argsort(x, dim=-1), dim=-1).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two (n,) vectors."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
