"""When memory updates happen: the plan of one forward step, and the record of each update.

Every row of a batch counts its own tokens seen. On the progressive schedule a row is updated
when its count reaches a multiple of the policy's ``n_up``, which may fall anywhere inside a
forward step (a prefill chunk, a left-padded batch): the step is then attended in segments and
each layer runs the update between them, so the result does not depend on how the input was
chunked. The plan is made once per step, on the host, and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class UpdateRecord:
    """Cache size of every layer, and the KV bytes held, right after one memory update of one row
    (``kv_bytes_full``: what the full cache would hold then)."""

    row: int
    tokens_seen: int
    tokens_per_layer: list[int]
    kv_bytes: int
    kv_bytes_full: int


@dataclass
class UpdatePoint:
    """A memory update of some rows, after the first ``column`` inputs of a step (0: before any).

    ``tokens_seen`` and ``previous`` are the rows' counts at this update and at their previous one
    (host), ``*_dev`` their copies on the model's device. The layers add what the update held
    (bytes of the rows before and after, tokens per layer after) as they run it."""

    column: int
    rows: Tensor
    tokens_seen: Tensor
    previous: Tensor
    device: torch.device
    bytes_before: Tensor | None = None
    bytes_after: Tensor | None = None
    counts_after: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rows_dev = self.rows.to(self.device)
        self.tokens_seen_dev = self.tokens_seen.to(self.device)
        self.previous_dev = self.previous.to(self.device)

    def add_layer(self, before: Tensor, after: Tensor, counts: Tensor) -> None:
        """Account one layer's update: (n,) KV bytes of the rows before and after, (n,) tokens held after."""
        self.bytes_before = before if self.bytes_before is None else self.bytes_before + before
        self.bytes_after = after if self.bytes_after is None else self.bytes_after + after
        self.counts_after.append(counts)


@dataclass
class StepPlan:
    """What every layer's attention needs about one forward step.

    ``positions`` (B, Q) holds the absolute position of each input on the model's device (-1 for
    padding); ``padded`` says whether any input is padding; ``fed`` (B,) counts each row's real
    inputs (host); ``points`` are the updates inside or at the end of the step, by column."""

    positions: Tensor
    padded: bool
    fed: Tensor
    points: list[UpdatePoint]
    done: set[int] = field(default_factory=set)


def progressive_points(seen: Tensor, previous: Tensor, real: Tensor | None, width: int, n_up: int,
                       device: torch.device) -> list[UpdatePoint]:
    """The updates of a step of ``width`` inputs on the progressive schedule: after every input at
    which a row's count of tokens seen reaches a multiple of ``n_up``. ``seen`` and ``previous``
    (B,) are the rows' counts before the step and at their last update, ``real`` (B, width) marks
    real inputs (None: all are real); all on the host."""
    B = seen.shape[0]
    counts = torch.arange(1, width + 1).expand(B, width) if real is None else real.long().cumsum(-1)
    due = (seen[:, None] + counts) % n_up == 0
    if real is not None:
        due &= real
    if not bool(due.any()):
        return []
    points, previous = [], previous.clone()
    for column in due.any(0).nonzero().flatten().tolist():
        rows = due[:, column].nonzero().flatten()
        reached = seen[rows] + counts[rows, column]
        points.append(UpdatePoint(column + 1, rows, reached, previous[rows], device))
        previous[rows] = reached
    return points
