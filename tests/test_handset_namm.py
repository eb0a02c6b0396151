"""benchmarks/handset_namm.py: through the real feature pipeline, the streaming-like NAMM ranks a
sink first, then the newest tokens, and the attention-ranked NAMM the most attended tokens first,
then the newest; their checkpoints load as budget-mode policies."""

from __future__ import annotations


import pytest
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


def features_of(attention: torch.Tensor, config: FeatureConfig, norm: Normalization | None = None):
    """The NAMM's token features of one head's ``attention`` (1, 1, n_up, keys) and their normalisation."""
    keys = attention.shape[-1]
    positions = torch.arange(keys)[None, None]
    valid = torch.ones(1, 1, keys, dtype=torch.bool)
    raw = raw_features(attention, positions[0, :, -config.n_up:], positions, valid, torch.zeros_like(valid),
                       torch.tensor([keys]), torch.zeros(1, 1, keys, config.carry),
                       torch.zeros(1, 1, keys, config.bins), config)
    norm = norm or Normalization(raw.ema.mean((0, 1, 2)), raw.ema.std((0, 1, 2)))
    return token_features(raw, norm, config), valid, norm


def test_streaming_namm_keeps_the_sink_then_the_newest():
    module = load_benchmark("handset_namm")
    config = FeatureConfig(n_up=128)
    keys = 1024
    # statistics dominated by the sink
    x, valid, norm = features_of(causal_attention_with_sink(keys, config.n_up, 0.3), config)
    scorer = MLPScorer(in_dim=config.dim, hidden=(8,))
    params = module.streaming_params(scorer, config, norm.mean, norm.std, sink_share=0.03)
    scores = scorer.score(x, valid, params[None])[0, 0]
    order = scores.argsort(descending=True)
    assert order[0] == 0, "the sink first"
    assert torch.equal(order[1:], torch.arange(keys - 1, 0, -1)), "then the newest tokens, newest first"


def test_handset_checkpoints_run_as_budget_policies(tmp_path):
    module = load_benchmark("handset_namm")
    zeros = zeros_checkpoint({"kind": "mlp", "hidden": [4]})
    save_namm_checkpoint(tmp_path / "norm", zeros.params, zeros.mean + 0.01, zeros.std * 0.2, zeros.config)
    path = module.main(["--normalization", str(tmp_path / "norm"), "--hidden", "4", "--out", str(tmp_path / "s")])
    ckpt = load_namm_checkpoint(path)
    assert ckpt.provenance["rule"] == "streaming-like" and torch.equal(ckpt.std, zeros.std * 0.2)
    assert namm.make_policy("namm", checkpoint=str(tmp_path / "s"), budget=0.25).num_params == ckpt.params.numel()
    path = module.main(["--rule", "attention", "--normalization", str(tmp_path / "norm"), "--hidden", "4",
                        "--pool", "7", "--schedule", "prompt-end", "--out", str(tmp_path / "a")])
    ckpt = load_namm_checkpoint(path)
    assert ckpt.provenance["rule"] == "attention-ranked" and ckpt.config["selection"]["pool"] == 7
    policy = namm.make_policy("namm", checkpoint=str(tmp_path / "a"), budget=0.5)
    assert policy.num_params == ckpt.params.numel() and policy.pool == 7 and policy.config()["selection"]["pool"] == 7
    assert policy.schedule == "prompt-end"
    assert namm.make_policy("namm", checkpoint=str(tmp_path / "a"), pool=1).pool == 1, "an explicit pool wins"


def test_attention_namm_keeps_the_most_attended_then_the_newest():
    module = load_benchmark("handset_namm")
    config = FeatureConfig(n_up=32)
    keys = 512
    _, _, norm = features_of(causal_attention_with_sink(keys, config.n_up, 0.3), config)  # statistics of another prompt
    # the question's 32 queries put 40% and 20% of their attention on two context tokens, 5% on the
    # sink, and spread the rest evenly over every visible token
    attention = causal_attention_with_sink(keys, config.n_up, 0.05)
    attention[..., 100] += 0.4
    attention[..., 300] += 0.2
    attention /= attention.sum(-1, keepdim=True)
    x, valid, _ = features_of(attention, config, norm)
    scorer = MLPScorer(in_dim=config.dim, hidden=(8,))
    scores = scorer.score(x, valid, module.attention_params(scorer, config)[None])[0, 0]
    order = scores.argsort(descending=True)
    assert order[:3].tolist() == [100, 300, 0], "the most attended tokens first, in order of attention"
    context = order[(order < keys - config.n_up) & (order != 0) & (order != 100) & (order != 300)]
    assert torch.equal(context, context.sort(descending=True).values), "equally attended context: newest first"
    with pytest.raises(ValueError, match="hidden layer"):
        module.attention_params(MLPScorer(in_dim=config.dim, hidden=(1,)), config)


def old_token_attended_a_little_more(config: FeatureConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (x, valid) of a 2k cache where the question attends token 40 1.5 times the even
    spread, and the (K - 2 - n_up,) evenly attended context tokens (neither the sink nor token 40)."""
    keys = 2048
    _, _, norm = features_of(causal_attention_with_sink(keys, config.n_up, 0.3), config)
    attention = causal_attention_with_sink(keys, config.n_up, 0.3)
    attention[..., 40] *= 1.5
    attention /= attention.sum(-1, keepdim=True)
    x, valid, _ = features_of(attention, config, norm)
    context = torch.arange(1, keys - config.n_up)
    return x, valid, context[context != 40]


def test_attention_namm_ranks_a_slightly_more_attended_old_token_above_newer_ones():
    """The recency unit only breaks ties: an old token that the question attends a little more than
    the even spread outranks every newer, evenly attended token of a 2k cache (with a recency weight
    of 0.05 it did not, and the needle of a NIAH prompt was dropped for recent filler)."""
    module = load_benchmark("handset_namm")
    config = FeatureConfig(n_up=32, end_pad=16)
    x, valid, context = old_token_attended_a_little_more(config)
    scorer = MLPScorer(in_dim=config.dim, hidden=(8,))
    scores = scorer.score(x, valid, module.attention_params(scorer, config)[None])[0, 0]
    assert (scores[40] > scores[context]).all()


def test_a_steep_centred_attention_unit_survives_search_sized_perturbations():
    """The same ranking as the default slope, but a random step of the search's size (sd 0.02 on
    every parameter) keeps a slightly more attended old token above the even spread far more often:
    at the default slope the step's noise outweighs the attention signal."""
    module = load_benchmark("handset_namm")
    config = FeatureConfig(n_up=32, end_pad=16)
    x, valid, context = old_token_attended_a_little_more(config)
    filler = float(x[0, 0, context, config.recency_dims].median())
    scorer = MLPScorer(in_dim=config.dim, hidden=(8,))
    default = module.attention_params(scorer, config)
    steep = module.attention_params(scorer, config, slope=10.0, center=filler)
    steep_scores = scorer.score(x, valid, steep[None])[0, 0]
    assert (steep_scores[40] > steep_scores[context]).all(), "unperturbed, both keep the old token first"
    generator = torch.Generator().manual_seed(0)
    steps = 0.02 * torch.randn(64, scorer.num_params, generator=generator)

    def survival(params: torch.Tensor) -> float:
        scores = scorer.score(x.expand(64, *x.shape[1:]), valid.expand(64, *valid.shape[1:]), params + steps)
        return float((scores[:, 0, 40:41] > scores[:, 0, context]).float().mean())

    assert survival(steep) > 0.95 and survival(default) < 0.7  # measured: 1.0 and 0.56
