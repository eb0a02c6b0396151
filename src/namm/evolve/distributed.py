"""Splitting evolution work across processes started by ``torchrun`` (gloo on CPU, nccl on GPU).

Every process holds the same CMA-ES state and draws the same population; each scores its share
(a contiguous block of population members, or every ``world``-th prompt) and the shares are
gathered, so all processes tell CMA-ES the same fitness and stay in lock step. Without
``torchrun`` (no ``WORLD_SIZE`` in the environment) everything runs in this process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Workers:
    """This process's place among the evolution workers."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def block(self, n: int) -> slice:
        """This worker's contiguous share of ``n`` items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def strided(self, n: int) -> list[int]:
        """Indices ``rank, rank + world, ...`` below ``n`` (round-robin share)."""
        return list(range(self.rank, n, self.world))

    def gather(self, part: object) -> list[object]:
        """Every worker's ``part``, in rank order (a list of one without torchrun)."""
        if self.world == 1:
            return [part]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, part)
        return out

    def gather_blocks(self, part: torch.Tensor) -> torch.Tensor:
        """Concatenate the workers' :meth:`block` results along dim 0."""
        return torch.cat([p.cpu() for p in self.gather(part.cpu())])

    def gather_strided(self, values: list[object], n: int) -> list[object]:
        """Reassemble ``n`` items computed round-robin (:meth:`strided`) by all workers."""
        out: list[object] = [None] * n
        for rank, part in enumerate(self.gather(values)):
            for i, value in zip(range(rank, n, self.world), part):
                out[i] = value
        return out


def init_workers(device: torch.device | str = "cpu") -> Workers:
    """Join the process group when started by torchrun; a single worker otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers()
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Workers(rank=dist.get_rank(), world=dist.get_world_size())


def close_workers(workers: Workers) -> None:
    """Leave the process group (after a final barrier) if one was joined."""
    if workers.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
