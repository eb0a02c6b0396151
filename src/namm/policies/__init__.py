"""Eviction policies: the contract (``base``), budgets, selection helpers, the name table
(``registry``) and one module per policy."""

from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.budget import Budget
from namm.policies.registry import make_policy, policy_names

__all__ = ["Budget", "LayerView", "MemoryPolicy", "make_policy", "policy_names"]
