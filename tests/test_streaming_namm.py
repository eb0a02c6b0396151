"""benchmarks/streaming_namm.py: the hand-set streaming-like NAMM ranks a sink first, then the
newest tokens, through the real feature pipeline; its checkpoint loads as a budget-mode policy."""

from __future__ import annotations


import torch
from benchmark_modules import load_benchmark

import namm
from namm.policies.namm.checkpoint import load_namm_checkpoint, save_namm_checkpoint, zeros_checkpoint
from namm.policies.namm.features import FeatureConfig, Normalization, raw_features, token_features
from namm.policies.namm.scorers import MLPScorer

def causal_attention_with_sink(keys: int, queries: int, sink_share: float) -> torch.Tensor:
    """(1, 1, queries, keys) attention of the last ``queries`` positions: ``sink_share`` on key 0,
    the rest spread evenly over the other visible keys."""
    q = torch.arange(keys - queries, keys)[:, None]
    k = torch.arange(keys)[None, :]
    visible = (k <= q) & (k > 0)
    attention = visible.float() * (1 - sink_share) / visible.sum(-1, keepdim=True)
    attention[:, 0] = sink_share
    return attention[None, None]


def test_streaming_namm_keeps_the_sink_then_the_newest():
    module = load_benchmark("streaming_namm")
    config = FeatureConfig(n_up=128)
    keys = 1024
    positions = torch.arange(keys)[None, None]
    valid = torch.ones(1, 1, keys, dtype=torch.bool)
    raw = raw_features(causal_attention_with_sink(keys, config.n_up, 0.3), positions[0, :, -config.n_up:],
                       positions, valid, torch.zeros_like(valid), torch.tensor([keys]),
                       torch.zeros(1, 1, keys, config.carry), torch.zeros(1, 1, keys, config.bins), config)
    norm = Normalization(raw.ema.mean((0, 1, 2)), raw.ema.std((0, 1, 2)))  # statistics dominated by the sink
    x = token_features(raw, norm, config)
    scorer = MLPScorer(in_dim=config.dim, hidden=(8,))
    params = module.streaming_params(scorer, config, norm.mean, norm.std, sink_share=0.03)
    scores = scorer.score(x, valid, params[None])[0, 0]
    order = scores.argsort(descending=True)
    assert order[0] == 0, "the sink first"
    assert torch.equal(order[1:], torch.arange(keys - 1, 0, -1)), "then the newest tokens, newest first"


def test_streaming_namm_checkpoint_runs_as_a_budget_policy(tmp_path):
    module = load_benchmark("streaming_namm")
    zeros = zeros_checkpoint({"kind": "mlp", "hidden": [4]})
    save_namm_checkpoint(tmp_path / "norm", zeros.params, zeros.mean + 0.01, zeros.std * 0.2, zeros.config)
    path = module.main(["--normalization", str(tmp_path / "norm"), "--hidden", "4", "--out", str(tmp_path / "s")])
    ckpt = load_namm_checkpoint(path)
    assert ckpt.provenance["rule"] == "streaming-like" and torch.equal(ckpt.std, zeros.std * 0.2)
    assert namm.make_policy("namm", checkpoint=str(tmp_path / "s"), budget=0.25).num_params == ckpt.params.numel()
