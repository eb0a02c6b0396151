"""Eviction policies: importing this package registers every policy by name."""

from namm.policies import full, h2o, l2, namm, pyramidkv, random_policy, recency, snapkv, streaming, tova  # noqa: F401
from namm.policies.base import Budget, LayerView, MemoryPolicy, make_policy, policy_names

__all__ = ["Budget", "LayerView", "MemoryPolicy", "make_policy", "policy_names"]
