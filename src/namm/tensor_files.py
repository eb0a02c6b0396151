"""Writing named tensors to a ``.safetensors`` file atomically."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (moved to the CPU, made contiguous) to ``path`` through a ``.partial``
    sibling named after this process, so a stopped process never leaves half a file under the real
    name and two processes writing the same file (campaigns sharing a record store) never write
    into one temporary file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
