"""Calibration of the NAMM normalisation statistics (docs/algorithm.md §4).

Runs the keep-everything NAMM feature pipeline over prompts and pools, per frequency bin, the
mean and variance of the un-normalised spectrogram EMA over layers, heads, tokens, updates and
prompts. The statistics are then frozen and saved with a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from namm.memory.generation import generate
from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.namm.features import FeatureConfig, layer_features


@dataclass
class FeatureStatistics(MemoryPolicy):
    """A keep-everything policy that runs the NAMM features and accumulates per-bin moments."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    name = "namm-calibration"

    def __post_init__(self) -> None:
        self.n_up = self.features.n_up
        self.query_window = self.features.n_up
        self.count = 0
        self.total = torch.zeros(self.features.bins, dtype=torch.float64)
        self.squares = torch.zeros(self.features.bins, dtype=torch.float64)

    def select(self, view: LayerView) -> Tensor:
        ema = layer_features(view, self.features).ema[view.valid].double().cpu()  # (tokens, bins)
        self.count += ema.shape[0]
        self.total += ema.sum(0)
        self.squares += ema.square().sum(0)
        return view.valid

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(mean, std) per bin, float32."""
        if self.count == 0:
            raise ValueError(f"calibration saw no memory update: prompts must hold at least n_up = "
                             f"{self.features.n_up} tokens")
        mean = self.total / self.count
        var = (self.squares / self.count - mean.square()).clamp(min=0)
        return mean.float(), var.sqrt().float()


def calibrate_normalization(
    model: PreTrainedModel,
    prompts_token_ids: list[Tensor],
    n_up: int = 512,
    features: FeatureConfig | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """(mean (bins,), std (bins,)) of the spectrogram EMA pooled over every layer, head, token,
    update and prompt, with the keep-everything policy (prefill only, one prompt at a time)."""
    if not prompts_token_ids:
        raise ValueError("calibration needs at least one prompt")
    features = features or FeatureConfig(n_up=n_up)
    stats = FeatureStatistics(features)
    for ids in tqdm(prompts_token_ids, desc="calibrate", unit="prompt", disable=not progress):
        generate(model, None, ids, policy=stats, max_new_tokens=0)
    return stats.statistics()
