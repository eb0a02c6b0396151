"""NAMM checkpoints: tensors in safetensors, config and provenance in JSON (never pickle).

A checkpoint is a pair of files ``NAME.safetensors`` (``params`` (n,), ``norm_mean`` and
``norm_std`` (bins,)) and ``NAME.json`` (format, version, config, provenance). A path may name
either file of the pair, or a directory holding ``namm.safetensors`` + ``namm.json``. Shipped
checkpoints live in the package's ``checkpoints/`` folder and are found by name; ``"zeros"`` is
the all-zero NAMM (keeps everything) with identity normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from namm.policies.base import SCHEDULES
from namm.policies.namm.features import FeatureConfig, Normalization
from namm.policies.namm.scorers import Scorer, make_scorer

FORMAT = "namm-checkpoint"
VERSION = 1
ZEROS = "zeros"
DIR_STEM = "namm"


@dataclass
class NAMMCheckpoint:
    """Flat scorer parameters, frozen normalisation statistics, config and provenance."""

    params: Tensor  # (num_params,) float32
    mean: Tensor  # (bins,) float32
    std: Tensor  # (bins,) float32
    config: dict  # {"features": {...}, "scorer": {...}, "selection": {"threshold": ...}}
    provenance: dict = field(default_factory=dict)

    @property
    def features(self) -> FeatureConfig:
        return FeatureConfig(**self.config["features"])

    @property
    def scorer(self) -> Scorer:
        return make_scorer(self.config["scorer"], self.features.dim)

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.mean, self.std)


def namm_config(features: FeatureConfig | None = None, scorer: str | dict = "bam", threshold: float = 0.0,
                pool: int = 1, floor: float | None = None) -> dict:
    """The config dict of a checkpoint (features, scorer, selection; ``floor`` only when set)."""
    features = features or FeatureConfig()
    selection = {"threshold": float(threshold), "pool": int(pool)}
    if floor:
        selection["floor"] = float(floor)
    return {"features": features.to_dict(), "scorer": make_scorer(scorer, features.dim).config(),
            "selection": selection}


def calibration_record(ckpt: NAMMCheckpoint) -> dict | None:
    """How a checkpoint's normalisation statistics were measured: its own provenance for a
    ``namm calibrate`` checkpoint, else the record it carries as ``normalization`` (None if unknown)."""
    if ckpt.provenance.get("kind") == "calibration":
        return ckpt.provenance
    return ckpt.provenance.get("normalization")


def check_floor(floor: object, where: str) -> None:
    """Raise ValueError unless ``floor`` (threshold mode's per-layer floor) is a fraction in (0, 1]."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor <= 1:
        raise ValueError(f"{where} must be a fraction in (0, 1], got {floor!r}")


def check_pool(pool: object, where: str) -> None:
    """Raise ValueError unless ``pool`` (the neighbour pool of the selection) is an odd int >= 1."""
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1 or pool % 2 == 0:
        raise ValueError(f"{where} must be an odd integer >= 1, got {pool!r}")


def zeros_checkpoint(scorer: str | dict = "bam", features: FeatureConfig | None = None,
                     normalization: Normalization | None = None) -> NAMMCheckpoint:
    """The all-zero NAMM: every score is 0, so every token is kept (the full-cache model)."""
    config = namm_config(features, scorer)
    features = FeatureConfig(**config["features"])
    norm = normalization or Normalization(torch.zeros(features.bins), torch.ones(features.bins))
    ckpt = NAMMCheckpoint(torch.zeros(make_scorer(config["scorer"], features.dim).num_params),
                          norm.mean.float(), norm.std.float(), config, {"source": ZEROS})
    validate(ckpt, ZEROS)
    return ckpt


def validate(ckpt: NAMMCheckpoint, where: str) -> None:
    """Raise ValueError with a clear message if the parts of a checkpoint do not fit together."""
    config = ckpt.config
    if not isinstance(config, dict) or not {"features", "scorer"} <= set(config):
        raise ValueError(f"malformed NAMM checkpoint {where}: config needs 'features' and 'scorer'")
    try:
        features = FeatureConfig(**config["features"])
        scorer = make_scorer(config["scorer"], features.dim)
    except TypeError as err:
        raise ValueError(f"malformed NAMM checkpoint {where}: bad feature config ({err})") from None
    except ValueError as err:
        raise ValueError(f"malformed NAMM checkpoint {where}: {err}") from None
    if ckpt.params.dim() != 1 or ckpt.params.numel() != scorer.num_params:
        raise ValueError(f"NAMM checkpoint {where} holds {tuple(ckpt.params.shape)} parameters but its "
                         f"{scorer.kind} scorer needs ({scorer.num_params},)")
    for name, t in (("norm_mean", ckpt.mean), ("norm_std", ckpt.std)):
        if tuple(t.shape) != (features.bins,):
            raise ValueError(f"NAMM checkpoint {where}: {name} has shape {tuple(t.shape)}, expected ({features.bins},)")
    for name, t in (("params", ckpt.params), ("norm_mean", ckpt.mean), ("norm_std", ckpt.std)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"NAMM checkpoint {where}: {name} holds NaN or infinite values")
    if bool((ckpt.std < 0).any()):
        raise ValueError(f"NAMM checkpoint {where}: norm_std has negative values")
    threshold = config.get("selection", {}).get("threshold", 0.0)
    if not isinstance(threshold, (int, float)):
        raise ValueError(f"NAMM checkpoint {where}: selection threshold must be a number")
    check_pool(config.get("selection", {}).get("pool", 1), f"NAMM checkpoint {where}: selection pool")
    if config.get("selection", {}).get("floor") is not None:
        check_floor(config["selection"]["floor"], f"NAMM checkpoint {where}: selection floor")
    schedule = config.get("selection", {}).get("schedule", "progressive")
    if schedule not in SCHEDULES:
        raise ValueError(f"NAMM checkpoint {where}: unknown schedule {schedule!r} (one of {', '.join(SCHEDULES)})")


def shipped_dir() -> Path:
    return Path(str(resources.files("namm") / "checkpoints"))


def shipped_checkpoints() -> list[str]:
    """Names of the checkpoints shipped with the package (plus ``"zeros"``)."""
    folder = shipped_dir()
    names = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    return [ZEROS, *names]


def shipped_namm_for(model_name: str | None) -> str:
    """The name of the NAMM shipped for a registry model; a one-line error when there is none."""
    if model_name is not None and (shipped_dir() / f"{model_name}.json").is_file():
        return model_name
    which = f"model {model_name!r}" if model_name else "this model (not a namm registry model)"
    raise ValueError(f"no NAMM is shipped for {which}: evolve one with `namm evolve` (or start from "
                     f"`namm calibrate`) and pass it with --checkpoint, or use --checkpoint zeros to keep everything")


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """(tensors file, JSON file) of a checkpoint path: either file of a pair, or a directory."""
    path = Path(path).expanduser()
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix(".safetensors"), path.with_suffix(".json")
    return path / f"{DIR_STEM}.safetensors", path / f"{DIR_STEM}.json"


def save_namm_checkpoint(path: str | Path, params: Tensor, mean: Tensor, std: Tensor, config: dict,
                         provenance: dict | None = None) -> Path:
    """Write a checkpoint (a ``.json``/``.safetensors`` path or a directory); returns the JSON path."""
    ckpt = NAMMCheckpoint(params.detach().float().cpu().flatten().contiguous(), mean.detach().float().cpu().contiguous(),
                          std.detach().float().cpu().contiguous(), json.loads(json.dumps(config)),
                          json.loads(json.dumps(provenance or {})))
    validate(ckpt, str(path))
    tensors, meta = checkpoint_files(path)
    meta.parent.mkdir(parents=True, exist_ok=True)
    save_file({"params": ckpt.params, "norm_mean": ckpt.mean, "norm_std": ckpt.std}, str(tensors),
              metadata={"format": FORMAT})
    document = {"format": FORMAT, "version": VERSION, "tensors": tensors.name, "num_params": ckpt.params.numel(),
                "config": ckpt.config, "provenance": ckpt.provenance}
    meta.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return meta


def _resolve(path_or_name: str | Path) -> tuple[Path, Path]:
    text = str(path_or_name)
    tensors, meta = checkpoint_files(text)
    if meta.exists() or tensors.exists():
        return tensors, meta
    shipped = shipped_dir() / f"{text}.json"
    if "/" not in text and shipped.exists():
        return shipped.with_suffix(".safetensors"), shipped
    raise FileNotFoundError(f"NAMM checkpoint not found: {text!r} is neither a file or directory nor a shipped "
                            f"checkpoint ({', '.join(shipped_checkpoints())})")


def load_namm_checkpoint(path_or_name: str | Path) -> NAMMCheckpoint:
    """Load a checkpoint by shipped name, file path or directory; ``"zeros"`` gives the all-zero NAMM."""
    if str(path_or_name) == ZEROS:
        return zeros_checkpoint()
    tensors, meta = _resolve(path_or_name)
    for f in (meta, tensors):
        if not f.is_file():
            raise FileNotFoundError(f"NAMM checkpoint is incomplete: missing {f}")
    try:
        document = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed NAMM checkpoint {meta}: not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"malformed NAMM checkpoint {meta}: not a {FORMAT} file")
    if document.get("version") != VERSION:
        raise ValueError(f"NAMM checkpoint {meta} has version {document.get('version')!r}; this namm reads {VERSION}")
    try:
        data = load_file(str(tensors))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"malformed NAMM checkpoint {tensors}: cannot read tensors ({err})") from None
    missing = {"params", "norm_mean", "norm_std"} - set(data)
    if missing:
        raise ValueError(f"malformed NAMM checkpoint {tensors}: missing tensor(s) {', '.join(sorted(missing))}")
    ckpt = NAMMCheckpoint(data["params"].float(), data["norm_mean"].float(), data["norm_std"].float(),
                          document.get("config"), document.get("provenance") or {})
    validate(ckpt, str(meta))
    return ckpt
