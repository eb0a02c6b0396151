"""benchmarks/proxy_heuristics.py on a tiny campaign: rules read exact positions from the recorded
features, and every contender is scored at every budget with the run's own fitness."""

from __future__ import annotations

import math

import pytest
import torch
from benchmark_modules import load_benchmark
from test_evolve_helpers import save_tiny_model

import namm
from namm.evolve.trainer import EvolveConfig, Trainer

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("heuristics")
    model_dir = save_tiny_model(root / "model")
    model, tokenizer = namm.load_model(str(model_dir))
    config = EvolveConfig(model=str(model_dir), tasks=["passkey", "kv_retrieval"], length=330, generations=1,
                          prompts_per_task=1, train_prompts=2, population=4, separable=True, eval_every=1, n_up=128,
                          scorer="mlp", hidden=[4], fitness="margin", evaluator="proxy", budgets=[0.2, 0.6],
                          question_after_compression=True)
    trainer = Trainer(config, root / "run", model, tokenizer, progress=False)
    trainer.start()
    trainer.run()
    return root / "run", model_dir, trainer


def test_rules_read_exact_positions_from_the_recorded_features(tiny_run):
    run, _, trainer = tiny_run
    module = load_benchmark("proxy_heuristics")
    prompt = trainer.pool[0]
    record = trainer.scorer.record([prompt])[0]
    rules = module.RuleScorer(trainer.policy.features, trainer.policy.normalization)
    for features in record.features:
        tokens = features.shape[2]
        q = rules.quantities(features)  # (L, H, K, quantities)
        position = -q[..., module.QUANTITIES.index("oldest")] * tokens
        assert torch.allclose(position, torch.arange(tokens, dtype=torch.float32).expand_as(position), atol=1e-3)
        assert torch.equal(q[..., 0] == 1, position < module.SINKS)
        assert bool(torch.isfinite(q).all())


def test_every_contender_is_scored_at_every_budget(tiny_run, tmp_path, capsys):
    run, model_dir, _ = tiny_run
    module = load_benchmark("proxy_heuristics")
    out = tmp_path / "h.json"
    result = module.main(["--run", str(run), "--model", str(model_dir), "--checkpoint", str(run / "best"),
                          "--max-length", "400", "--per-task", "1", "--budgets", "0.25,0.5", "--out", str(out)])
    assert out.exists() and result["statistic"] == "margin" and result["protocol"] == "query-agnostic"
    assert len(result["prompts"]) == 2
    names = list(result["rows"])
    assert names[0] == "namm:zeros" and names[1].startswith("namm:cmaes-mean@") and "namm:best" in names
    assert set(module.RULES) <= set(names)
    for row in result["rows"].values():
        for b in (0.25, 0.5):
            assert math.isfinite(row["fitness"][b])
            assert abs(row["cache_fraction"][b] - b) < 0.05, "budget mode holds the budget"
    streaming = result["rows"]["rule:streaming"]["fitness"]
    assert streaming[0.25] != result["rows"]["rule:oldest"]["fitness"][0.25], "different rules keep different tokens"
    assert "rule:streaming" in capsys.readouterr().out
