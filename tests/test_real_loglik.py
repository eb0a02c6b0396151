"""benchmarks/real_loglik.py end to end on a tiny model: every policy at every budget, scored
with the campaign's loglik fitness under real eviction."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from test_evolve_helpers import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_real_loglik_scores_namm_and_baselines_at_each_budget(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("real_loglik", ROOT / "benchmarks" / "real_loglik.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
        gaps = [v - f for v, f in zip(r["loglik"], result["full_loglik"])]
        assert math.isclose(r["fitness"], sum(gaps) / len(gaps), rel_tol=1e-6), "one prompt per task: the mean gap"
    assert "streaming" in capsys.readouterr().out
