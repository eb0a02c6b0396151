"""The contract between the memory runtime and every eviction policy.

At each memory update the runtime hands a policy one :class:`LayerView` per layer and the
policy answers with a boolean ``keep`` mask over that layer's cache slots. The runtime then
compacts keys, values, positions and every per-token state tensor with that mask, so policies
never move memory themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor


@dataclass
class LayerView:
    """What a policy sees of one layer at a memory update.

    Shapes use ``B`` rows (the rows updating now), ``H`` KV heads, ``G`` query heads per KV head,
    ``K`` cache slots, ``N`` buffered queries and ``D`` head dim. Slots are in temporal order per
    head; empty slots (right padding where rows or heads hold fewer tokens) have position -1.
    """

    layer_idx: int
    num_layers: int
    keys: Tensor  # (B, H, K, D), after RoPE
    values: Tensor  # (B, H, K, D)
    positions: Tensor  # (B, H, K) int64 absolute positions, -1 = empty slot
    queries: Tensor | None  # (B, H*G, N, D) buffered queries (after RoPE), oldest first
    query_positions: Tensor | None  # (B, N) int64, -1 = padding
    tokens_seen: Tensor  # (B,) tokens fed to the model so far
    previous_tokens_seen: Tensor  # (B,) tokens seen at this row's previous update (0 if none)
    scaling: float
    sliding_window: int | None
    state: dict[str, Tensor]  # per-token policy state, (B, H, K, ...), zero for new slots
    rows: Tensor  # (B,) indices of these rows in the whole batch
    _attention: Tensor | None = field(default=None, repr=False)

    @property
    def valid(self) -> Tensor:
        """(B, H, K) bool: slot holds a token."""
        return self.positions >= 0

    @property
    def is_new(self) -> Tensor:
        """(B, H, K) bool: token arrived after this row's previous update."""
        return self.positions >= self.previous_tokens_seen[:, None, None]

    def newest_slot(self) -> Tensor:
        """(B, H) index of the newest valid slot of each head."""
        return self.valid.sum(-1).clamp(min=1) - 1

    def attention(self) -> Tensor:
        """(B, H, N, K) float32 attention probabilities of the buffered queries over the current
        keys, averaged over the G query heads that share each KV head. Zero where a query could not
        see a key (older query, empty slot, outside a sliding window) and for padded queries.
        Computed once per view, lazily."""
        if self._attention is None:
            if self.queries is None or self.query_positions is None:
                raise RuntimeError("this policy did not ask for buffered queries (query_window)")
            from namm.memory.attention import buffered_attention

            self._attention = buffered_attention(
                self.queries, self.query_positions, self.keys, self.positions,
                self.scaling, self.sliding_window,
            )
        return self._attention


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


SCHEDULES = ("progressive", "prompt-end")


def check_schedule(schedule: str) -> str:
    """``schedule`` if it names a compression schedule (see :class:`MemoryPolicy`), else a ValueError."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    return schedule


def budget_policy_init(policy) -> None:
    """Shared checks for policies with a ``budget`` and ``n_up`` field."""
    policy.budget = policy.budget if isinstance(policy.budget, Budget) else Budget(policy.budget)
    if int(policy.n_up) < 1:
        raise ValueError(f"n_up must be >= 1, got {policy.n_up}")


def recent_slots(valid: Tensor, count: Tensor | int) -> Tensor:
    """(B, H, K) bool: the ``count`` newest valid slots of each head (slots are packed)."""
    held = valid.sum(-1, keepdim=True)
    count = count if isinstance(count, int) else count.view(-1, 1, 1)
    idx = torch.arange(valid.shape[-1], device=valid.device)
    return valid & (idx >= held - count)


class MemoryPolicy:
    """Base class of eviction policies.

    Subclasses set ``name``, declare how many of the latest queries they need buffered through
    ``query_window`` (0: none; ``None``: every query since the previous update) and implement
    :meth:`select`.

    ``schedule`` says when the runtime compresses: ``"progressive"`` every ``n_up`` tokens seen,
    prompt and generation alike; ``"prompt-end"`` once, after the whole prompt is prefilled and
    before the first generated token (decoding then only appends). ``default_schedule`` is the
    schedule of the policy's paper; assigning ``schedule`` validates it.

    The runtime calls :meth:`select` layer by layer from inside the forward pass; a forward step
    that crosses several updates (a long prefill chunk under ``model.generate``) runs all of a
    layer's updates before the next layer's, so a policy must not rely on the order of layers
    across updates.
    """

    name: ClassVar[str] = "base"
    default_schedule: ClassVar[str] = "progressive"
    query_window: int | None = 0
    n_up: int = 512
    evicts: bool = True  # False: the runtime never calls select (keep-everything policies)

    @property
    def schedule(self) -> str:
        """When the runtime compresses: "progressive" or "prompt-end"."""
        return self.__dict__.get("_schedule", self.default_schedule)

    @schedule.setter
    def schedule(self, value: str) -> None:
        self.__dict__["_schedule"] = check_schedule(value)

    def bind(self, model) -> None:
        """Called with the model before a run, before ``n_up`` / ``query_window`` are read (a policy
        whose defaults depend on the model resolves them here)."""

    def reset(self, batch_size: int) -> None:
        """Called before each generation with the number of rows."""

    def select(self, view: LayerView) -> Tensor:
        """Return a (B, H, K) bool mask of the slots to keep. May store per-token tensors of shape
        (B, H, K, ...) in ``view.state``; the runtime compacts them with the mask."""
        raise NotImplementedError

    # Optional hook: a policy may define ``attend(layer_idx, query, key, value, visible, scaling)``
    # returning the (B, Hq, Q, D) attention output of a forward step, or None for plain SDPA.
    # ``visible`` is the (B, 1 or Hq, Q, K) bool mask the runtime built. LESS uses it.
    attend = None


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


PolicyFactory = Callable[..., MemoryPolicy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy available to :func:`namm.make_policy` under ``name``."""

    def wrap(factory: PolicyFactory) -> PolicyFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def policy_names() -> list[str]:
    from namm import policies  # noqa: F401  (imports register every policy)

    return sorted(_REGISTRY)


def make_policy(name: str, less=None, schedule: str | None = None, **options) -> MemoryPolicy:
    """Build a registered policy by name, e.g. ``make_policy("h2o", budget=0.25)``. ``schedule``
    ("progressive" or "prompt-end") overrides the policy's own default. ``less`` (a shipped LESS
    kernel name, a checkpoint path or kernels) wraps it with a LESS low-rank memory."""
    names = policy_names()
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(names)}")
    if schedule is not None:
        check_schedule(schedule)
    policy = _REGISTRY[name](**options)
    if schedule is not None:
        policy.schedule = schedule
    if less is None:
        return policy
    from namm.less.policy import LessPolicy

    return LessPolicy(policy, less)
