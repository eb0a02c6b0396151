"""The policies ``make_policy`` can build, by name: an explicit table, imported on first use."""

from __future__ import annotations

from importlib import import_module

from namm.policies.base import MemoryPolicy, check_schedule

# name -> (module, class). Adding a policy means adding its line here.
POLICIES: dict[str, tuple[str, str]] = {
    "full": ("namm.policies.full", "FullPolicy"),
    "h2o": ("namm.policies.h2o", "H2OPolicy"),
    "l2": ("namm.policies.l2", "L2Policy"),
    "namm": ("namm.policies.namm.policy", "NAMMPolicy"),
    "pyramidkv": ("namm.policies.pyramidkv", "PyramidKVPolicy"),
    "random": ("namm.policies.random_policy", "RandomPolicy"),
    "recency": ("namm.policies.recency", "RecencyPolicy"),
    "snapkv": ("namm.policies.snapkv", "SnapKVPolicy"),
    "streaming": ("namm.policies.streaming", "StreamingPolicy"),
    "tova": ("namm.policies.tova", "TOVAPolicy"),
}


def policy_names() -> list[str]:
    """Every policy name ``make_policy`` accepts, sorted."""
    return sorted(POLICIES)


def policy_class(name: str) -> type[MemoryPolicy]:
    """The class of the policy called ``name``; ValueError naming the choices otherwise."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(policy_names())}")
    module, attr = POLICIES[name]
    return getattr(import_module(module), attr)


def make_policy(name: str, less=None, schedule: str | None = None, **options) -> MemoryPolicy:
    """Build a policy by name, e.g. ``make_policy("h2o", budget=0.25)``. ``schedule``
    ("progressive" or "prompt-end") overrides the policy's own default. ``less`` (a shipped LESS
    kernel name, a checkpoint path or kernels) wraps it with a LESS low-rank memory."""
    factory = policy_class(name)
    if schedule is not None:
        check_schedule(schedule)
    policy = factory(**options)
    if schedule is not None:
        policy.schedule = schedule
    if less is None:
        return policy
    from namm.less.policy import LessPolicy

    return LessPolicy(policy, less)
