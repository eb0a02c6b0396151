"""benchmarks/real_loglik.py end to end on a tiny model: every policy at every budget, scored
with the campaign's loglik fitness under real eviction."""

from __future__ import annotations

import json
import math

import pytest
import torch
from benchmark_modules import load_benchmark
from test_evolve_helpers import save_tiny_model

from namm.policies.namm.checkpoint import save_namm_checkpoint, zeros_checkpoint

def test_real_loglik_scores_namm_and_baselines_at_each_budget(tmp_path, capsys):
    module = load_benchmark("real_loglik")
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "out.json"
    module.main(["--checkpoint", "zeros", "--model", str(model), "--tasks", "passkey,kv_retrieval", "--length", "1100",
                 "--samples", "1", "--budgets", "0.25,0.5", "--baselines", "streaming,h2o", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["budget"], r["policy"]) for r in result["rows"]] == [
        (b, p) for b in (0.25, 0.5) for p in ("namm", "streaming", "h2o")]
    for r in result["rows"]:
        assert math.isfinite(r["fitness"]) and r["fitness"] < 0, "eviction costs likelihood on a random model"
        assert abs(r["cache_fraction"] - r["budget"]) < 0.1
        gaps = [v - f for v, f in zip(r["values"], result["full_values"])]
        assert math.isclose(r["fitness"], sum(gaps) / len(gaps), rel_tol=1e-6), "one prompt per task: the mean gap"
        assert 0 <= r["exact"] <= 2 and 0.0 <= r["accuracy"] <= 1.0
    assert result["full"]["exact"] <= 2 and math.isclose(result["full"]["mean_loglik"],
                                                         sum(result["full_values"]) / 2, rel_tol=1e-6)
    assert "streaming" in capsys.readouterr().out
    rows = {(r["budget"], r["policy"]): r for r in result["rows"]}
    assert [(d["budget"], d["baseline"]) for d in result["paired"]] == [
        (b, p) for b in (0.25, 0.5) for p in ("streaming", "h2o")]
    for d in result["paired"]:
        namm_row, base = rows[(d["budget"], "namm")], rows[(d["budget"], d["baseline"])]
        expected = sum(a - b for a, b in zip(namm_row["values"], base["values"])) / 2
        assert math.isclose(d["loglik_difference"], expected, rel_tol=1e-6, abs_tol=1e-9)
        assert d["loglik_difference_ci"][0] <= d["loglik_difference"] + 1e-9 <= d["loglik_difference_ci"][1] + 2e-9
        assert d["exact_difference"] == (namm_row["exact"] - base["exact"]) / 2


def test_real_loglik_compares_several_candidates(tmp_path):
    module = load_benchmark("real_loglik")
    model = save_tiny_model(tmp_path / "model")
    zeros = zeros_checkpoint("mlp")
    random = torch.randn(zeros.params.shape, generator=torch.Generator().manual_seed(0))
    save_namm_checkpoint(tmp_path / "gen-0010", random, zeros.mean, zeros.std, zeros.config)
    out = tmp_path / "out.json"
    module.main(["--checkpoint", "zeros", "--checkpoint", str(tmp_path / "gen-0010"), "--model", str(model),
                 "--tasks", "passkey", "--length", "1100", "--samples", "1", "--budgets", "0.5", "--baselines", "",
                 "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows] == ["namm@zeros", "namm@gen-0010"]
    assert rows[0]["values"] != rows[1]["values"], "a different NAMM keeps different tokens"


def test_baselines_run_on_each_schedule_asked_for():
    module = load_benchmark("real_loglik")
    own = module.baselines("streaming,snapkv", None, 0.25)
    assert {k: p.schedule for k, p in own.items()} == {"streaming": "progressive", "snapkv": "prompt-end"}
    both = module.baselines("streaming,", "progressive,prompt-end", 0.25)
    assert {k: p.schedule for k, p in both.items()} == {"streaming:progressive": "progressive",
                                                        "streaming:prompt-end": "prompt-end"}


@pytest.mark.parametrize("protocol", [["--question-after-compression"], []], ids=["query-agnostic", "query-aware"])
def test_recorded_evaluator_gives_real_evictions_values(tmp_path, protocol):
    """Prompt-end NAMM (budget and threshold mode, with a floor) and query-free baselines:
    compressing one full-cache recording per prompt is real eviction exactly, with the question
    after the compression or before it."""
    module = load_benchmark("real_loglik")
    model = save_tiny_model(tmp_path / "model")
    zeros = zeros_checkpoint("mlp")
    random = torch.randn(zeros.params.shape, generator=torch.Generator().manual_seed(1))
    config = {**zeros.config, "selection": {"threshold": 0.0, "schedule": "prompt-end", "floor": 0.2}}
    save_namm_checkpoint(tmp_path / "pe", random, zeros.mean, zeros.std, config)
    common = ["--checkpoint", str(tmp_path / "pe"), "--model", str(model), "--tasks", "passkey,kv_retrieval",
              "--length", "1100", "--samples", "1", "--budgets", "0.3,threshold", *protocol]
    baselines = ["--baselines", "streaming,recency"]
    module.main(common + baselines + ["--baseline-schedules", "prompt-end", "--out", str(tmp_path / "real.json")])
    module.main(common + baselines + ["--evaluator", "recorded", "--out", str(tmp_path / "recorded.json")])
    real, recorded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("real", "recorded"))
    assert [r["policy"] for r in recorded["rows"]] == ["namm", "streaming:prompt-end", "recency:prompt-end", "namm"]
    assert recorded["rows"][-1]["budget"] == "threshold" and recorded["rows"][-1]["cache_fraction"] >= 0.2
    torch.testing.assert_close(torch.tensor(recorded["full_values"]), torch.tensor(real["full_values"]),
                               rtol=0, atol=1e-4)
    for a, b in zip(real["rows"], recorded["rows"]):
        assert a["policy"] == b["policy"]
        torch.testing.assert_close(torch.tensor(b["values"]), torch.tensor(a["values"]), rtol=0, atol=1e-4)
        assert abs(a["cache_fraction"] - b["cache_fraction"]) < 1e-6
    assert recorded["rows"][1]["values"] != recorded["rows"][2]["values"], "streaming keeps its sinks"
    with pytest.raises(ValueError, match="reads buffered queries"):
        module.main(common + ["--baselines", "h2o", "--evaluator", "recorded"])
