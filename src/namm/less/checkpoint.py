"""LESS kernel checkpoints: ``NAME.safetensors`` (tensors) beside ``NAME.json`` (shapes, provenance).

A directory stands for ``DIR/less.safetensors``. Shipped kernels live in ``namm/checkpoints/less``
and are found by name (e.g. ``smollm2-135m-h2o``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from namm.less.kernels import KernelConfig, LessKernels
from namm.tensor_files import save_tensors

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "less"
FORMAT = "namm-less-kernels"


def shipped_names() -> list[str]:
    """Names of the LESS kernels shipped with the package."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors"))


def resolve(path_or_name: str | Path) -> Path:
    """The ``.safetensors`` file a name or path stands for (clear error when there is none)."""
    path = Path(path_or_name)
    if path.is_dir():
        path = path / "less.safetensors"
    elif not path.suffix and not path.exists():
        path = SHIPPED_DIR / f"{path_or_name}.safetensors"
    if not path.is_file():
        shipped = ", ".join(shipped_names()) or "none"
        raise FileNotFoundError(f"no LESS kernels at {str(path_or_name)!r} (shipped names: {shipped})")
    return path


def save_less_kernels(path: str | Path, kernels: LessKernels, provenance: dict | None = None,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write ``kernels`` to ``path`` (a ``.safetensors`` file or a directory) plus its JSON sidecar,
    the tensors stored in ``dtype`` (float16 halves a shipped file; loading casts back to float32)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "less.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to(dtype).contiguous() for name, p in kernels.state_dict().items()}
    meta = {"format": FORMAT, "config": kernels.config.to_dict(), "provenance": provenance or {}}
    save_tensors(path, tensors)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def read_metadata(path_or_name: str | Path) -> dict:
    """The JSON sidecar (format, config, provenance) of a LESS checkpoint."""
    side = resolve(path_or_name).with_suffix(".json")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"LESS checkpoint has no metadata file {side}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed LESS checkpoint metadata {side}: {err}") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{side} is not a LESS checkpoint (format {meta.get('format')!r})")
    return meta


def check_tensors(expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    """A one-line ValueError naming the first missing, unexpected, misshapen or non-finite tensor."""
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"tensors {'missing: ' + missing[0] if missing else 'not expected: ' + extra[0]}"
                         f" ({len(missing)} missing, {len(extra)} not expected)")
    for name, tensor in expected.items():
        if found[name].shape != tensor.shape:
            raise ValueError(f"tensor {name} has shape {tuple(found[name].shape)}, the config asks for "
                             f"{tuple(tensor.shape)}")
        if not bool(torch.isfinite(found[name]).all()):
            raise ValueError(f"tensor {name} holds NaN or infinite values")


def load_less_kernels(path_or_name: str | Path) -> LessKernels:
    """Load LESS kernels by shipped name or path (a one-line ValueError when the files are bad)."""
    path = resolve(path_or_name)
    meta = read_metadata(path)
    try:
        kernels = LessKernels(KernelConfig(**meta["config"]))
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"malformed LESS checkpoint metadata {path.with_suffix('.json')}: {err}") from None
    try:
        tensors = load_file(str(path))
        check_tensors(kernels.state_dict(), tensors)
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"malformed LESS checkpoint {path}: {err}") from None
    kernels.load_state_dict(tensors)
    return kernels.eval()
