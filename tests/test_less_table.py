"""benchmarks/less_table.py: the share of a gap closed, and the whole table on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_modules import load_benchmark
from test_evolve_helpers import save_tiny_model
from tiny_models import tiny_model

import namm
from namm.less.checkpoint import save_less_kernels
from namm.less.kernels import KernelConfig, LessKernels
from namm.policies.namm.checkpoint import save_namm_checkpoint


def test_gap_closed_hand_made():
    module = load_benchmark("less_table")
    closed = module.gap_closed(full=[1.0, 2.0], base=[2.0, 4.0], less=[1.5, 3.0])
    assert closed["share"] == pytest.approx(0.5) and closed["ci"] == pytest.approx([0.5, 0.5])
    uneven = module.gap_closed(full=[1.0, 1.0, 1.0], base=[2.0, 2.0, 2.0], less=[1.0, 2.0, 2.0])
    assert uneven["share"] == pytest.approx(1 / 3) and uneven["ci"][0] < 1 / 3 < uneven["ci"][1]


def test_table_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("NAMM_CACHE", str(tmp_path / "cache"))
    module = load_benchmark("less_table")
    model_dir = save_tiny_model(tmp_path / "model", "llama-gqa")
    kernels = LessKernels(KernelConfig.for_model(tiny_model("llama-gqa"), hidden=8), seed=1)
    with torch.no_grad():
        for layer in kernels.layers:
            layer.log_scale.fill_(2.0)  # visibly active
    less = str(save_less_kernels(tmp_path / "kernels", kernels))
    source = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=64)
    params = torch.randn(source.num_params, generator=torch.Generator().manual_seed(3)) * 0.5
    checkpoint = save_namm_checkpoint(tmp_path / "namm.json", params, source.normalization.mean,
                                      source.normalization.std, source.config(), {"model": "tiny"})
    out = tmp_path / "less"
    argv = ["--model", str(model_dir), "--checkpoint", str(checkpoint), "--h2o-less", less, "--namm-less", less,
            "--n-up", "64", "--lengths", "300", "--samples", "2", "--retrieval", "passkey", "--retrieval-length", "300",
            "--retrieval-samples", "2", "--out", str(out)]
    assert module.main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    perplexity, retrieval = summary["tables"]
    assert set(perplexity["rows"]) == set(retrieval["rows"]) == {"full", "h2o", "h2o-less", "h2o-0.11", "namm",
                                                                  "namm-less", "namm+extra"}
    rows = perplexity["rows"]
    assert rows["h2o-less"]["less_state_bytes"] > 0 == rows["h2o"]["less_state_bytes"]
    assert rows["h2o-less"]["kv_bytes_peak"] == rows["h2o"]["kv_bytes_peak"] < rows["h2o-0.11"]["kv_bytes_peak"]
    assert rows["namm+extra"]["kv_bytes_peak"] > rows["namm"]["kv_bytes_peak"]
    assert "share" in rows["h2o-less"]["gap_closed_vs_h2o"] and "share" in rows["namm-less"]["gap_closed_vs_namm"]
    assert "| h2o-less |" in (out / "results.md").read_text()
    first = (out / "perplexity-L300" / "full" / "metrics.json").stat().st_mtime_ns
    assert module.main(argv) == 0  # a rerun reads the finished rows
    assert (out / "perplexity-L300" / "full" / "metrics.json").stat().st_mtime_ns == first
