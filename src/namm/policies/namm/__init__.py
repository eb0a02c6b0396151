"""The NAMM policy: features, scorers, selection, checkpoints and calibration."""

from namm.policies.namm.checkpoint import (
    NAMMCheckpoint, load_namm_checkpoint, save_namm_checkpoint, shipped_checkpoints, zeros_checkpoint,
)
from namm.policies.namm.features import FeatureConfig, Normalization
from namm.policies.namm.policy import NAMMPolicy
from namm.policies.namm.scorers import BAMScorer, MLPScorer, make_scorer

__all__ = [
    "BAMScorer", "FeatureConfig", "MLPScorer", "NAMMCheckpoint", "NAMMPolicy", "Normalization", "load_namm_checkpoint",
    "make_scorer", "save_namm_checkpoint", "shipped_checkpoints", "zeros_checkpoint",
]
