"""The threshold of a budget-mode NAMM: the one score cut that makes threshold mode hold a target
share of the memory on the run's training prompts (docs/algorithm.md §6 and §9).

A NAMM evolved in budget mode only learned to rank tokens within a layer. Threshold mode needs one
cut shared by every layer and head; found here by bisection on the proxy replay (no model forward),
so each layer's size stays emergent while the mean KV fraction lands on the target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from namm.evolve.proxy import ProxyPrompt, held_fraction, replay
from namm.policies.namm.policy import NAMMPolicy


def mean_fraction(records: list[ProxyPrompt], policy: NAMMPolicy, params: Tensor, threshold: float) -> float:
    """Mean KV fraction after the last update over ``records`` in threshold mode at ``threshold``."""
    policy.set_budget(None)
    saved = policy.threshold
    policy.threshold = threshold
    try:
        return float(torch.stack([held_fraction(replay(r, policy, params.reshape(1, -1)))[0] for r in records]).mean())
    finally:
        policy.threshold = saved


def calibrate_threshold(records: list[ProxyPrompt], policy: NAMMPolicy, params: Tensor, target: float,
                        steps: int = 24) -> tuple[float, float]:
    """(threshold, mean KV fraction it gives): the bisection point closest to ``target``."""
    if not 0 < target < 1:
        raise ValueError(f"the target KV fraction must be in (0, 1), got {target}")
    lo, hi = -1.0, 1.0
    while mean_fraction(records, policy, params, lo) < target and lo > -1e6:
        lo *= 4
    while mean_fraction(records, policy, params, hi) > target and hi < 1e6:
        hi *= 4
    best = (lo, mean_fraction(records, policy, params, lo))
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = mean_fraction(records, policy, params, mid)
        if abs(got - target) < abs(best[1] - target):
            best = (mid, got)
        lo, hi = (mid, hi) if got > target else (lo, mid)
    return best
