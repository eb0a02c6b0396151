"""Calibration of the NAMM normalisation statistics (docs/algorithm.md §4).

Runs the keep-everything NAMM feature pipeline over prompts and pools, per frequency bin, the
mean and variance of the un-normalised spectrogram EMA over layers, heads, tokens, updates and
prompts (or, ``robust``, the median and a quartile-based spread of a sample of them). The
statistics are then frozen and saved with a checkpoint.
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


ROWS_PER_UPDATE = 512  # robust statistics: feature rows sampled per (layer, update)
# The interquartile range of a normal distribution is 1.349 standard deviations.
IQR_PER_STD = 1.3489795


def statistics_name(robust: bool) -> str:
    """How a calibration record names the kind of statistics (``provenance["statistics"]``)."""
    return "median, IQR / 1.349" if robust else "mean, std"


@dataclass
class FeatureStatistics(MemoryPolicy):
    """A keep-everything policy that runs the NAMM features and accumulates per-bin moments
    (``robust``: a seeded sample of feature rows for quantiles)."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    robust: bool = False
    name = "namm-calibration"

    def __post_init__(self) -> None:
        self.n_up = self.features.n_up
        self.query_window = self.features.n_up
        self.count = 0
        self.total = torch.zeros(self.features.bins, dtype=torch.float64)
        self.squares = torch.zeros(self.features.bins, dtype=torch.float64)
        self.sample: list[Tensor] = []
        self.generator = torch.Generator().manual_seed(0)

    def select(self, view: LayerView) -> Tensor:
        ema = layer_features(view, self.features).ema[view.valid].double().cpu()  # (tokens, bins)
        self.count += ema.shape[0]
        self.total += ema.sum(0)
        self.squares += ema.square().sum(0)
        if self.robust:
            rows = torch.randperm(ema.shape[0], generator=self.generator)[:ROWS_PER_UPDATE]
            self.sample.append(ema[rows])
        return view.valid

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(centre, spread) per bin, float32: mean and standard deviation, or (``robust``) median and
        interquartile range / 1.349 (the standard deviation of a normal distribution with that range)."""
        if self.count == 0:
            raise ValueError(f"calibration saw no memory update: prompts must hold at least n_up = "
                             f"{self.features.n_up} tokens")
        if self.robust:
            quartiles = torch.quantile(torch.cat(self.sample), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=0)
            return quartiles[1].float(), ((quartiles[2] - quartiles[0]) / IQR_PER_STD).float()
        mean = self.total / self.count
        var = (self.squares / self.count - mean.square()).clamp(min=0)
        return mean.float(), var.sqrt().float()


def calibrate_normalization(
    model: PreTrainedModel,
    prompts_token_ids: list[Tensor],
    n_up: int = 512,
    features: FeatureConfig | None = None,
    progress: bool = False,
    robust: bool = False,
) -> tuple[Tensor, Tensor]:
    """(mean (bins,), std (bins,)) of the spectrogram EMA pooled over every layer, head, token,
    update and prompt, with the keep-everything policy (prefill only, one prompt at a time);
    ``robust``: median and interquartile range / 1.349 instead (see :class:`FeatureStatistics`)."""
    if not prompts_token_ids:
        raise ValueError("calibration needs at least one prompt")
    features = features or FeatureConfig(n_up=n_up)
    stats = FeatureStatistics(features, robust=robust)
    for ids in tqdm(prompts_token_ids, desc="calibrate", unit="prompt", disable=not progress):
        generate(model, None, ids, policy=stats, max_new_tokens=0)
    return stats.statistics()
