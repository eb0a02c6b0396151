"""benchmarks/token_classes.py: the kept shares are taken after the policy's last compression, on
either schedule."""

from __future__ import annotations

import pytest
from benchmark_modules import load_benchmark
from tiny_models import random_prompt, tiny_model

import namm


@pytest.mark.parametrize("schedule", ["progressive", "prompt-end"])
def test_kept_shares_after_the_last_compression(schedule):
    module = load_benchmark("token_classes")
    model = tiny_model("llama-gqa")
    ids = random_prompt(200, seed=1)
    classes = ["whitespace", "other"] * 100
    policy = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=32, budget=0.5, schedule=schedule)
    result = module.kept_shares(model, policy, ids, classes)
    assert result["scored_tokens"] == (200 if schedule == "prompt-end" else 192)
    assert result["cache_fraction"] < 0.6
    for name in ("whitespace", "other"):
        assert result["classes"][name]["tokens"] == result["scored_tokens"] // 2
        assert all(0 <= share <= 1 for share in result["classes"][name]["kept_per_layer"])
