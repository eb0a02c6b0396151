"""NAMM scorers, selection and the policy in the runtime, on tiny random models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import namm
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.namm import BAMScorer, MLPScorer, NAMMPolicy, Normalization, make_scorer
from namm.policies.namm.calibration import calibrate_normalization
from namm.policies.namm.checkpoint import save_namm_checkpoint
from namm.policies.namm.scorers import lift_linear
from namm.policies.namm.selection import pooled_scores, select_tokens
from tiny_models import KINDS, random_prompt, tiny_model

N_UP = 32


def reference_bam(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The spec's BAM for one (layer, head): x (K, 25) in temporal order -> (K,) scores, by loops."""
    d, hd = 25, 32
    sizes = [d * 3 * hd, 3 * hd, hd * 2 * d, 2 * d, d, 1]
    w_qkv, b_qkv, w_o, b_o, w, b = np.split(params, np.cumsum(sizes)[:-1])
    qkv = x @ w_qkv.reshape(d, 3 * hd) + b_qkv
    q, k, v = qkv[:, :hd], qkv[:, hd:2 * hd], qkv[:, 2 * hd:]
    h = np.zeros((len(x), hd))
    for i in range(len(x)):
        logits = np.array([q[i] @ k[j] / math.sqrt(hd) for j in range(i, len(x))])  # itself and newer tokens
        p = np.exp(logits - logits.max())
        h[i] = (p / p.sum()) @ v[i:]
    o = h @ w_o.reshape(hd, 2 * d) + b_o
    mixed = x * (1 + o[:, d:]) + o[:, :d]
    return mixed @ w + b[0]


def test_parameter_counts():
    assert BAMScorer().num_params == 4172 == namm.make_policy("namm", checkpoint="zeros").num_params
    assert MLPScorer().num_params == 26 == namm.make_policy("namm", checkpoint="zeros", scorer="mlp").num_params
    assert make_scorer({"kind": "mlp", "hidden": [8]}, 25).num_params == 25 * 8 + 8 + 8 + 1


def test_bam_matches_reference_and_is_batched_over_rows():
    gen = torch.Generator().manual_seed(0)
    bam = BAMScorer()
    x = torch.randn(3, 2, 12, 25, generator=gen)
    params = torch.randn(3, bam.num_params, generator=gen) * 0.3
    valid = torch.ones(3, 2, 12, dtype=torch.bool)
    valid[1, :, 9:] = False  # a row with fewer tokens (right-padded)
    scores = bam.score(x, valid, params)
    for b in range(3):
        for h in range(2):
            n = int(valid[b, h].sum())
            expected = reference_bam(x[b, h, :n].double().numpy(), params[b].double().numpy())
            np.testing.assert_allclose(scores[b, h, :n].double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_bam_backward_mask():
    """A token's score does not change when OLDER tokens (or empty slots) change, and does when
    newer ones do."""
    gen = torch.Generator().manual_seed(1)
    bam = BAMScorer()
    params = torch.randn(1, bam.num_params, generator=gen) * 0.3
    x = torch.randn(1, 2, 20, 25, generator=gen)
    valid = torch.ones(1, 2, 20, dtype=torch.bool)
    valid[:, :, 17:] = False
    base = bam.score(x, valid, params)
    older = x.clone()
    older[:, :, :8] = torch.randn(1, 2, 8, 25, generator=gen)
    older[:, :, 17:] = 1e3  # empty slots
    changed = bam.score(older, valid, params)
    torch.testing.assert_close(changed[:, :, 8:17], base[:, :, 8:17], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[:, :, :8], base[:, :, :8])
    newer = x.clone()
    newer[:, :, 12:17] += 1.0
    assert not torch.allclose(bam.score(newer, valid, params)[:, :, :12], base[:, :, :12])


def test_mlp_scorer_is_a_per_token_linear_map():
    mlp = MLPScorer()
    params = torch.randn(2, 26)
    x = torch.randn(2, 3, 7, 25)
    expected = torch.einsum("bhkd,bd->bhk", x, params[:, :25]) + params[:, 25, None, None]
    torch.testing.assert_close(mlp.score(x, torch.ones(2, 3, 7, dtype=torch.bool), params), expected)


def test_a_lifted_linear_scorer_ranks_and_signs_every_token_as_the_linear_one():
    linear = torch.randn(26, generator=torch.Generator().manual_seed(1)) * 0.3
    lifted = lift_linear(linear, MLPScorer(hidden=(4,)), seed=2)
    x = torch.randn(1, 3, 500, 25, generator=torch.Generator().manual_seed(3)) * 3
    x[..., :4, :] *= 2.5  # sink-like outliers far outside the usual range
    valid = torch.ones(1, 3, 500, dtype=torch.bool)
    a = MLPScorer().score(x, valid, linear[None])
    b = MLPScorer(hidden=(4,)).score(x, valid, lifted[None])
    assert 20 < a.abs().max() < 36 and not torch.allclose(a, b), "a real non-linear map over a wide range"
    assert torch.equal(a.argsort(-1), b.argsort(-1)) and torch.equal(a > 0, b > 0)
    with pytest.raises(ValueError, match="one hidden layer"):
        lift_linear(linear, MLPScorer(hidden=(4, 4)))
    with pytest.raises(ValueError, match="26 parameters"):
        lift_linear(linear[:20], MLPScorer(hidden=(4,)))


def test_selection_threshold_uniform_count_newest_and_cap():
    valid = torch.ones(1, 2, 6, dtype=torch.bool)
    valid[0, :, 5] = False
    scores = torch.tensor([[[0.5, -1.0, 0.2, -0.1, -3.0, 9.0], [-0.2, -0.3, -0.4, 1.0, -5.0, 9.0]]])
    keep = select_tokens(scores, valid)
    # head 0: {0, 2} >= 0 plus the newest (4) -> 3; head 1: {3} + newest -> 2; K = 3 for both
    assert keep[0, 0].tolist() == [True, False, True, False, True, False]
    assert keep[0, 1].tolist() == [True, False, False, True, True, False]
    capped = select_tokens(scores, valid, cap=torch.tensor([2]))
    assert capped.sum(-1).tolist() == [[2, 2]] and capped[0, :, 4].all()
    assert select_tokens(torch.full_like(scores, float("nan")), valid)[0, :, :5].sum(-1).tolist() == [1, 1]
    assert select_tokens(scores, valid, threshold=-0.35).sum(-1).tolist() == [[4, 4]]
    floored = select_tokens(scores, valid, floor=torch.tensor([4]))
    assert floored[0, 1].tolist() == [True, True, False, True, True, False], "a floor keeps a head's top 4"
    assert select_tokens(scores, valid, cap=torch.tensor([2]), floor=torch.tensor([4])).sum(-1).tolist() == [[2, 2]]
    assert select_tokens(scores, valid, floor=torch.tensor([1])).equal(keep), "a floor below the count changes nothing"
    assert select_tokens(scores, valid, extra=1)[0, 1].tolist() == [True, True, False, True, True, False]
    assert select_tokens(scores, valid, extra=9).sum(-1).tolist() == [[5, 5]], "never more than the valid slots"


def test_neighbour_pool_keeps_a_peak_with_its_neighbours():
    """pool 5: the slots within two of the best-scored one share its score, so they survive
    together; empty slots never lend a score; pool 1 changes nothing."""
    valid = torch.ones(1, 1, 12, dtype=torch.bool)
    valid[0, 0, 11] = False
    scores = torch.linspace(0, 0.1, 12).view(1, 1, 12)  # newer slots score a little higher
    scores[0, 0, 4] = 5.0
    scores[0, 0, 11] = 99.0  # an empty slot
    pooled = pooled_scores(scores, valid, 5)
    assert pooled[0, 0, 2:7].eq(5.0).all() and pooled[0, 0, 7] < 1 and pooled[0, 0, 10] == scores[0, 0, 10]
    keep = select_tokens(pooled, valid, cap=torch.tensor([6]))
    assert keep[0, 0].nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 10], "the peak's five slots, then the newest"
    assert pooled_scores(scores, valid, 1) is scores
    unpooled = select_tokens(scores, valid, cap=torch.tensor([6]))
    assert unpooled[0, 0].nonzero().flatten().tolist() == [4, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return tiny_model(request.param)


def test_zero_namm_equals_full(model):
    prompt = random_prompt(300)
    full = namm.generate(model, None, prompt, policy="full", max_new_tokens=40)
    zero = namm.generate(model, None, prompt, policy=namm.make_policy("namm", checkpoint="zeros", n_up=N_UP), max_new_tokens=40)
    assert zero.token_ids == full.token_ids
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    for kind, held in zip(types, zero.cache_tokens_per_layer):
        if kind == "sliding_attention":  # tokens out of the window are dropped: they are never attended again
            assert held < zero.tokens_seen
        else:
            assert held == zero.tokens_seen
    assert zero.kv_bytes <= zero.kv_bytes_full


def random_namm(stats, seed: int, **options) -> NAMMPolicy:
    policy = namm.make_policy("namm", n_up=N_UP, **{"checkpoint": "zeros", **options})
    policy.normalization = Normalization(*stats)
    policy.params = torch.randn(policy.num_params, generator=torch.Generator().manual_seed(seed)) * 0.5
    return policy


@pytest.fixture(scope="module")
def stats(model):
    return calibrate_normalization(model, [random_prompt(200, seed=s) for s in range(2)], n_up=N_UP)


def test_random_namm_shrinks_cache_keeps_true_keys_and_decodes(model, stats):
    prompt = random_prompt(150)
    out = namm.generate(model, None, prompt, policy=random_namm(stats, 2), max_new_tokens=100, record_history=True)
    assert len(out.history) >= 7 and out.tokens_seen == 249 and len(out.token_ids) == 100
    assert out.kv_bytes < 0.5 * out.kv_bytes_full
    sizes = [tuple(h.tokens_per_layer) for h in out.history]
    assert any(len(set(s)) > 1 for s in sizes), "layers end up with different cache sizes"
    with torch.inference_mode(), memory_attention_enabled(model):
        full = MemoryRunner(model, namm.make_policy("full"), 1)
        logits_full = full.feed([prompt])
        runner = MemoryRunner(model, random_namm(stats, 2), 1)
        logits = runner.feed([prompt])
        assert torch.isfinite(logits).all() and torch.isfinite(logits_full).all()
        for full_layer, layer in zip(full.cache.layers, runner.cache.layers):
            pos = layer.positions
            assert (pos >= 0).all() and (pos.diff(dim=-1) > 0).all() and (pos[..., -1] == 149).all()
            assert pos.shape[-1] < 150
            for name, state in layer.state.items():
                assert torch.isfinite(state).all(), name
        # the first layer's keys depend only on the token and its position: after four evictions
        # every kept slot still holds the full cache's key and value of its absolute position
        first, first_full = runner.cache.layers[0], full.cache.layers[0]
        idx = first.positions[..., None].expand(-1, -1, -1, first.keys.shape[-1])
        torch.testing.assert_close(first.keys, torch.gather(first_full.keys, 2, idx))
        torch.testing.assert_close(first.values, torch.gather(first_full.values, 2, idx))


def test_cap_limits_every_layer(model, stats):
    policy = random_namm(stats, 3, max_fraction=0.2)
    policy.params = torch.zeros(policy.num_params)  # keeps everything but for the cap
    out = namm.generate(model, None, random_prompt(100), policy=policy, max_new_tokens=30, record_history=True)
    for record in out.history:
        assert max(record.tokens_per_layer) <= math.ceil(0.2 * record.tokens_seen)


def test_floor_keeps_a_share_of_every_layer_in_threshold_mode_only(model, stats, tmp_path):
    policy = random_namm(stats, 3, threshold=1e9)  # a cut no token reaches: only the newest survives
    starved = namm.generate(model, None, random_prompt(100), policy=policy, max_new_tokens=30, record_history=True)
    assert any(min(r.tokens_per_layer) < math.floor(0.3 * r.tokens_seen) for r in starved.history)
    policy.floor = 0.3
    out = namm.generate(model, None, random_prompt(100), policy=policy, max_new_tokens=30, record_history=True)
    for record in out.history:
        assert min(record.tokens_per_layer) >= math.floor(0.3 * record.tokens_seen)
    path = save_namm_checkpoint(tmp_path / "f", policy.params, *stats, policy.config())
    assert namm.make_policy("namm", checkpoint=str(path)).floor == 0.3, "the checkpoint records its floor"
    policy.set_budget(0.1)
    assert policy.floor_count(torch.tensor([100])) is None, "budget mode ignores the floor"


def test_extra_tokens_keep_that_many_more_per_layer_in_threshold_mode(model, stats):
    prompt = random_prompt(100)
    runs = []
    for extra in (0, 5):
        policy = random_namm(stats, 3, threshold=1e9, extra_tokens=extra)  # the cut alone keeps the newest only
        runs.append(namm.generate(model, None, prompt, policy=policy, max_new_tokens=30, record_history=True))
    for bare, more in zip(runs[0].history, runs[1].history):
        assert more.tokens_per_layer == [t + 5 for t in bare.tokens_per_layer]
    with pytest.raises(ValueError, match="extra_tokens must be an integer >= 0"):
        namm.make_policy("namm", extra_tokens=-1)
    with pytest.raises(ValueError, match="raise the budget"):
        namm.make_policy("namm", extra_tokens=5, budget=0.25)


def test_population_batch_equals_single_runs(model, stats):
    members = torch.stack([random_namm(stats, s).params for s in (4, 5, 6)])
    prompts = [random_prompt(130, seed=7)] * 2 + [random_prompt(100, seed=8)]
    batch_policy = random_namm(stats, 0)
    batch_policy.set_population(members)
    batch = namm.generate(model, None, prompts, policy=batch_policy, max_new_tokens=50)
    for b, out in enumerate(batch):
        alone = random_namm(stats, 0)
        alone.params = members[b]
        single = namm.generate(model, None, prompts[b], policy=alone, max_new_tokens=50)
        assert out.token_ids == single.token_ids
        assert out.cache_tokens_per_layer == single.cache_tokens_per_layer
    assert batch[0].cache_tokens_per_layer != batch[1].cache_tokens_per_layer  # members really differ
    with pytest.raises(ValueError, match="population of 3 members needs a batch of 3"):
        namm.generate(model, None, prompts[:2], policy=batch_policy, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\(P, 4172\)"):
        batch_policy.set_population(torch.zeros(3, 10))
    batch_policy.set_population(None)
    assert len(namm.generate(model, None, prompts[:2], policy=batch_policy, max_new_tokens=2)) == 2


def test_bad_policy_options():
    with pytest.raises(ValueError, match="max_tokens"):
        namm.make_policy("namm", max_tokens=1)
    with pytest.raises(ValueError, match="max_fraction"):
        namm.make_policy("namm", max_fraction=1.5)
    with pytest.raises(ValueError, match="pool must be an odd integer"):
        namm.make_policy("namm", checkpoint="zeros", pool=4)
    with pytest.raises(ValueError, match=r"floor must be a fraction in \(0, 1\]"):
        namm.make_policy("namm", checkpoint="zeros", floor=1.5)
    with pytest.raises(ValueError, match="unknown NAMM scorer"):
        namm.make_policy("namm", scorer="lstm")
