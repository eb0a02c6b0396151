"""NAMM normalisation statistics of a Decision Transformer (docs/algorithm.md §11).

A NAMM evolved on a language model applies its score cut in that model's feature scale. The same
statistics measured on the DT's own behaviour episodes (fed as in training) let threshold mode
apply the cut in the DT's scale instead; the scorer itself is unchanged.
"""

from __future__ import annotations

from torch import Tensor

from namm.policies.namm.calibration import FeatureStatistics
from namm.policies.namm.features import FeatureConfig
from namm.rl.data import Trajectory
from namm.rl.model import DecisionTransformer
from namm.rl.retention import teacher_forced


def episode_statistics(model: DecisionTransformer, trajectories: list[Trajectory], features: FeatureConfig,
                       robust: bool = False) -> tuple[Tensor, Tensor]:
    """(centre, spread) per frequency bin of the NAMM features over ``trajectories`` fed through
    ``model`` with the keep-everything pipeline (see :class:`FeatureStatistics`)."""
    if not trajectories:
        raise ValueError("calibration needs at least one episode")
    stats = FeatureStatistics(features, robust=robust)
    teacher_forced(model, stats, trajectories)
    return stats.statistics()
