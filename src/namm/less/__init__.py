"""LESS ("Get More with LESS", arXiv 2402.09398): a constant-size low-rank memory of the tokens an
eviction policy drops, on top of any policy: ``make_policy("h2o", budget=0.1, less="smollm2-135m-h2o")``."""

from namm.less.checkpoint import load_less_kernels, save_less_kernels, shipped_names
from namm.less.kernels import KernelConfig, LessKernels
from namm.less.policy import LessPolicy

__all__ = ["KernelConfig", "LessKernels", "LessPolicy", "load_less_kernels", "save_less_kernels", "shipped_names"]
