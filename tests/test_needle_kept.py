"""benchmarks/needle_kept.py: finding the needle and measuring whether a selection holds it."""

from __future__ import annotations

import pytest
import torch
from benchmark_modules import load_benchmark


def test_first_occurrence():
    module = load_benchmark("needle_kept")
    assert module.first_occurrence([5, 1, 2, 3, 1, 2], [1, 2]) == 1
    assert module.first_occurrence([5, 1, 2], [2, 1]) is None
    assert module.first_occurrence([1, 2], [1, 2]) == 0


def test_dc_ranking_keeps_the_attended_run_and_its_neighbours():
    module = load_benchmark("needle_kept")
    L, H, K, recency = 2, 3, 40, 8
    features = torch.randn(L, H, K, recency + 17) * 0.01
    features[..., recency] = -1.0
    features[:, :, 20, recency] = 5.0  # one strongly attended token in the middle of a 3-token needle
    held = module.dc_held(features, recency, pool=3, budget=0.1)  # 4 tokens per head
    assert module.whole_needle_share(held, 19, 3) == 1.0
    assert module.whole_needle_share(module.dc_held(features, recency, pool=1, budget=0.1), 19, 3) == 0.0
    held[0, 0, 21] = False
    assert module.whole_needle_share(held, 19, 3) == pytest.approx(1 - 1 / (L * H))


def test_modes_and_the_share_of_needle_tokens_held():
    module = load_benchmark("needle_kept")
    assert [module.parse_mode(entry) for entry in ("threshold", "0.25")] == [(None, {}), (0.25, {})]
    held = torch.ones(2, 2, 10, dtype=torch.bool)
    held[0, 0, 4] = False  # one pair drops one of the needle's 4 tokens (3..6)
    assert module.whole_needle_share(held, 3, 4) == pytest.approx(0.75)
    assert module.needle_token_share(held, 3, 4) == pytest.approx(1 - 1 / 16)
    assert module.needle_token_share(held, 7, 3) == 1.0
    assert module.cut_needle_share(held, 3, 4) == pytest.approx(0.25)
    held[1, 1, 3:7] = False  # a pair without any needle token is not a cut
    assert module.cut_needle_share(held, 3, 4) == pytest.approx(0.25)


def test_modes_with_selection_changes():
    module = load_benchmark("needle_kept")
    assert module.parse_mode("threshold+floor=0.35+max_fraction=0.5") == (None, {"floor": 0.35, "max_fraction": 0.5})
    assert module.parse_mode(" 0.25+pool=13") == (0.25, {"pool": 13})
    with pytest.raises(ValueError, match="expected"):
        module.parse_mode("threshold+width=3")
