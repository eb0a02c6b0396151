"""benchmarks/transfer.py end to end: a NAMM from a tiny Llama on tiny models of two other
families, every baseline at the NAMM's measured memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from benchmark_modules import load_benchmark
from test_evolve_helpers import save_tiny_model

import namm
from namm.policies.namm.checkpoint import save_namm_checkpoint


def test_transfer_table_on_two_other_families(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NAMM_CACHE", str(tmp_path / "cache"))  # its full-cache references stay out of the user's cache
    module = load_benchmark("transfer")
    source = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=64)
    params = torch.randn(source.num_params, generator=torch.Generator().manual_seed(3)) * 0.5
    checkpoint = save_namm_checkpoint(tmp_path / "llama.json", params, source.normalization.mean,
                                      source.normalization.std, source.config(), {"model": "tiny-llama-gqa"})
    models = [str(save_tiny_model(tmp_path / kind, kind)) for kind in ("qwen2", "gemma3")]
    out = tmp_path / "transfer"
    assert module.main(["--checkpoint", str(checkpoint), "--models", ",".join(models), "--lengths", "1100",
                        "--tasks", "passkey", "--samples", "2", "--baselines", "streaming,h2o", "--out", str(out)]) == 0
    names = [Path(m).name for m in models]
    rows = json.loads((out / "summary.json").read_text())
    assert {(r["model"], r["policy"]) for r in rows} == {(m, p) for m in names for p in ("full", "namm", "streaming", "h2o")}
    for model in names:
        namm_row = next(r for r in rows if r["model"] == model and r["policy"] == "namm")
        assert namm_row["kv_fraction"] < 1.0, "the NAMM evicts on the target model"
        for baseline in ("streaming", "h2o"):
            row = next(r for r in rows if r["model"] == model and r["policy"] == baseline)
            assert row["matched_to"] == "namm" and abs(row["kv_fraction"] - namm_row["kv_fraction"]) < 0.1
    text = (out / "README.md").read_text()
    assert text.count("| passkey |") == 4 and "Reproduce: `python benchmarks/transfer.py" in text
    assert "NAMM minus each baseline" in text
    assert "NAMM above all" in capsys.readouterr().out
    # a later invocation for one model resumes its run and keeps the other model's rows in the table
    assert module.main(["--checkpoint", str(checkpoint), "--models", models[0], "--lengths", "1100",
                        "--tasks", "passkey", "--samples", "2", "--baselines", "streaming,h2o", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text()) == rows
    assert (out / "README.md").read_text().count("| passkey |") == 4
    # a later invocation over another task keeps the earlier task in that run's own tables
    assert module.main(["--checkpoint", str(checkpoint), "--models", models[0], "--lengths", "1100",
                        "--tasks", "niah_single", "--samples", "2", "--baselines", "streaming,h2o", "--out", str(out)]) == 0
    own = json.loads((out / names[0] / "L1100" / "results.json").read_text())["rows"]
    assert {r["task"] for r in own} == {"passkey", "niah_single"}
    assert {r["task"] for r in json.loads((out / "summary.json").read_text())} == {"passkey", "niah_single"}
