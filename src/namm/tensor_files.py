"""Writing named tensors to a ``.safetensors`` file atomically."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (moved to the CPU, made contiguous) to ``path`` through a ``.partial``
    sibling, so a stopped process never leaves half a file under the real name."""
    path = Path(path)
    tmp = path.with_suffix(".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
