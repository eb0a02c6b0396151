"""benchmarks/less_kernel_transfer.py: per-layer share of the error that kernels remove."""

from __future__ import annotations

import torch
from benchmark_modules import load_benchmark
from test_evolve_helpers import save_tiny_model
from tiny_models import tiny_model

from namm.less.checkpoint import save_less_kernels
from namm.less.kernels import KernelConfig, LessKernels


def test_untrained_kernels_remove_nothing_and_the_table_prints(tmp_path, capsys):
    module = load_benchmark("less_kernel_transfer")
    model_dir = save_tiny_model(tmp_path / "model", "llama-gqa")
    untrained = save_less_kernels(tmp_path / "untrained", LessKernels(KernelConfig.for_model(tiny_model("llama-gqa"),
                                                                                             hidden=8), seed=1))
    active = LessKernels(KernelConfig.for_model(tiny_model("llama-gqa"), hidden=8), seed=1)
    with torch.no_grad():
        for layer in active.layers:
            layer.log_scale.fill_(2.0)
    active = save_less_kernels(tmp_path / "active", active)
    assert module.main(["--model", str(model_dir), "--kernels", f"{untrained},{active}", "--policies", "h2o:0.2",
                        "--length", "700", "--queries", "16"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| h2o:0.2 |")]
    assert len(lines) == 2
    assert "| 0.0% |" in lines[0], "untrained kernels behave like the policy alone"
    assert "| 0.0% |" not in lines[1]
