"""The contract between the memory runtime and every eviction policy.

At each memory update the runtime hands a policy one :class:`LayerView` per layer and the
policy answers with a boolean ``keep`` mask over that layer's cache slots. The runtime then
compacts keys, values, positions and every per-token state tensor with that mask, so policies
never move memory themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from namm.memory.masks import buffered_attention


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

    def attention(self) -> Tensor:
        """(B, H, N, K) float32 attention probabilities of the buffered queries over the current
        keys, averaged over the G query heads that share each KV head. Zero where a query could not
        see a key (older query, empty slot, outside a sliding window) and for padded queries.
        Computed once per view, lazily."""
        if self._attention is None:
            if self.queries is None or self.query_positions is None:
                raise RuntimeError("this policy did not ask for buffered queries (query_window)")
            self._attention = buffered_attention(
                self.queries, self.query_positions, self.keys, self.positions,
                self.scaling, self.sliding_window,
            )
        return self._attention


SCHEDULES = ("progressive", "prompt-end")


def check_schedule(schedule: str) -> str:
    """``schedule`` if it names a compression schedule (see :class:`MemoryPolicy`), else a ValueError."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    return schedule


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

    def state_nbytes(self) -> int:
        """Bytes one sequence's memory holds beside the KV cache (LESS's low-rank state); 0 here."""
        return 0

    def select(self, view: LayerView) -> Tensor:
        """Return a (B, H, K) bool mask of the slots to keep. May store per-token tensors of shape
        (B, H, K, ...) in ``view.state``; the runtime compacts them with the mask."""
        raise NotImplementedError

    # Optional hook: a policy may define ``attend(layer_idx, query, key, value, visible, scaling)``
    # returning the (B, Hq, Q, D) attention output of a forward step, or None for plain SDPA.
    # ``visible`` is the (B, 1 or Hq, Q, K) bool mask the runtime built. LESS uses it.
    attend = None
