"""A folder that keeps the proxy's recordings between runs (docs/algorithm.md §8).

Recording a prompt (a full-cache pass over it) is the proxy's one expensive step: on Qwen2.5-
Coder-0.5B at 2k tokens it takes tens of seconds per prompt, so a resumed 80-prompt stage spent
most of an hour recording again what the stopped process had already recorded. With a store, each
recording is written once to ``DIR/<digest>.safetensors`` and read back by any later run on the
same machine. The digest covers everything a recording depends on: the model (name, dtype, device
type, parameter count), the NAMM's feature settings, normalisation and schedule, and the prompt's
token ids, answer ids and context length. A file that cannot be read is recorded again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel

from namm.evolve.fitness import TrainingPrompt
from namm.policies.namm.policy import NAMMPolicy
from namm.tensor_files import save_tensors

FORMAT = "namm-proxy-record-1"


class RecordStore:
    """Proxy recordings kept as files of named tensors in ``folder`` (created on first save);
    :class:`namm.evolve.proxy.ProxyPrompt` converts itself to and from them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def digest(self, model: PreTrainedModel, namm: NAMMPolicy, prompt: TrainingPrompt) -> str:
        """The file name (hex) of ``prompt``'s recording by ``model`` under ``namm``'s features."""
        h = hashlib.sha256()
        setting = {"format": FORMAT, "model": str(getattr(model, "name_or_path", "")), "dtype": str(model.dtype),
                   "device": model.device.type, "params": sum(p.numel() for p in model.parameters()),
                   "features": asdict(namm.features), "schedule": namm.schedule,
                   "context_tokens": prompt.context_tokens}
        h.update(json.dumps(setting, sort_keys=True).encode())
        for tensor in (namm.normalization.mean, namm.normalization.std, prompt.token_ids, prompt.answer_ids):
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def load(self, digest: str, device: torch.device) -> dict[str, Tensor] | None:
        """The tensors stored under ``digest``, on ``device`` (None when there are none or they
        cannot be read)."""
        path = self.folder / f"{digest}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError):
            return None

    def save(self, digest: str, tensors: dict[str, Tensor]) -> None:
        """Write ``tensors`` under ``digest`` atomically (a stopped process never leaves half a file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors(self.folder / f"{digest}.safetensors", tensors, metadata={"format": FORMAT})
