"""NAMM features against a plain loop/numpy reference written from docs/algorithm.md §3-4."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import namm
from namm.policies.namm import FeatureConfig, NAMMPolicy, Normalization
from namm.policies.namm.calibration import calibrate_normalization
from namm.policies.namm import features
from namm.policies.namm.features import raw_features, signal_window
from tiny_models import random_prompt, tiny_model

N_UP = 32
CONFIG = FeatureConfig(n_up=N_UP)


def reference_token(signal: np.ndarray, tail: np.ndarray | None, old_ema: np.ndarray | None, u: int,
                    cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """One token: its n_up-long signal -> (new EMA (bins,), new tail (carry,)), by loops."""
    prefix = np.zeros(cfg.carry) if tail is None else tail
    full = np.concatenate([prefix, signal, np.zeros(cfg.end_pad)])
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / cfg.window) for n in range(cfg.window)])
    a = cfg.gamma ** cfg.hop
    ema = np.zeros(cfg.bins)
    for t in range(cfg.frames):
        if tail is None and t < u // cfg.hop:  # a new token contributes from its arrival frame on
            continue
        frame = full[t * cfg.hop: t * cfg.hop + cfg.window] * hann
        magnitude = np.array([abs(sum(frame[n] * np.exp(-2j * math.pi * k * n / cfg.window) for n in range(cfg.window)))
                              for k in range(cfg.bins)])
        ema += (1 - a) * a ** (cfg.frames - 1 - t) * magnitude
    if old_ema is not None:
        ema += cfg.gamma ** cfg.n_up * old_ema
    return ema, signal[-cfg.carry:]


def reference_recency(r: int, cfg: FeatureConfig) -> list[float]:
    half = cfg.recency_dims // 2
    omegas = [cfg.recency_base ** (-k / half) for k in range(half)]
    return [math.sin(r * w) for w in omegas] + [math.cos(r * w) for w in omegas]


class Recorder(NAMMPolicy):
    """NAMM that records, at every update, its inputs and the feature vectors it computed."""

    def token_features(self, view):
        x = super().token_features(view)
        self.records.append(dict(layer=view.layer_idx, positions=view.positions.clone(), x=x.clone(),
                                 attention=view.attention().clone(), query_positions=view.query_positions.clone(),
                                 seen=view.tokens_seen.clone(), previous=view.previous_tokens_seen.clone()))
        return x


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama-gqa")


@pytest.fixture(scope="module")
def stats(tiny):
    return calibrate_normalization(tiny, [random_prompt(160, seed=s) for s in range(2)], n_up=N_UP)


def test_features_match_reference_through_the_runtime(tiny, stats):
    """Evicting NAMM on a real (tiny) model over prefill and decoding: every update's features equal
    the reference that tracks each token's carried state by position. Covers carry-over across
    updates, state gathered through eviction, and tokens arriving mid-window."""
    policy = Recorder(checkpoint="zeros", n_up=N_UP)
    policy.records = []
    policy.normalization = Normalization(*stats)
    policy.params = torch.randn(policy.num_params, generator=torch.Generator().manual_seed(1)) * 0.5
    out = namm.generate(tiny, None, random_prompt(90), policy=policy, max_new_tokens=70)
    assert out.tokens_seen == 159 and len(policy.records) == 4 * 3  # updates at 32, 64, ..., 128 (+ 3 layers each)
    mean, std = (t.double().numpy() for t in stats)
    carried: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}  # (layer, head, pos) -> (ema, tail)
    evicted_some = False
    for rec in policy.records:
        pos, attn, seen = rec["positions"][0], rec["attention"][0].double().numpy(), int(rec["seen"][0])
        assert rec["query_positions"][0].tolist() == list(range(seen - N_UP, seen))
        H, K = pos.shape
        for h in range(H):
            held = [int(p) for p in pos[h] if p >= 0]
            assert held == sorted(held) and held[-1] == seen - 1
            evicted_some |= len(held) < seen
            for j, p in enumerate(held):
                key = (rec["layer"], h, p)
                old = carried.get(key)
                assert (old is None) == (p >= int(rec["previous"][0]))
                ema, tail = reference_token(attn[h, :, j], None if old is None else old[1],
                                            None if old is None else old[0], p - (seen - N_UP), CONFIG)
                carried[key] = (ema, tail)
                expected = reference_recency(held[-1] - p, CONFIG) + list((ema - mean) / np.maximum(std, 1e-7))
                np.testing.assert_allclose(rec["x"][0, h, j].double().numpy(), expected, rtol=2e-4, atol=2e-5)
            assert not rec["x"][0, h, len(held):].any(), "empty slots have zero features"
    assert evicted_some


@pytest.mark.parametrize("chunk", [8192, 7])
def test_tokens_arriving_mid_window_and_carried_state(monkeypatch, chunk):
    """Direct check of raw_features on random attention for two updates: old tokens with carried
    tail/EMA, new tokens arriving at various in-window indices (attention zero before arrival).
    Also with the tokens transformed in small chunks."""
    monkeypatch.setattr(features, "CHUNK_TOKENS", chunk)
    gen = torch.Generator().manual_seed(0)
    seen, K = 96, 40
    positions = torch.tensor(sorted(torch.randperm(64, generator=gen)[:20].tolist()) + list(range(76, 96)))
    positions = positions.view(1, 1, K).expand(1, 2, K).clone()
    q_pos = torch.arange(seen - N_UP, seen).view(1, N_UP)
    attn = torch.rand(1, 2, N_UP, K, generator=gen) * (positions[:, :, None, :] <= q_pos[:, None, :, None])
    is_new = positions >= 64
    old_tail = torch.rand(1, 2, K, CONFIG.carry, generator=gen)
    old_ema = torch.rand(1, 2, K, CONFIG.bins, generator=gen)
    raw = raw_features(attn, q_pos, positions, positions >= 0, is_new, torch.tensor([seen]), old_tail, old_ema, CONFIG)
    for h in range(2):
        for j in range(K):
            new = bool(is_new[0, h, j])
            ema, tail = reference_token(attn[0, h, :, j].double().numpy(), None if new else old_tail[0, h, j].double().numpy(),
                                        None if new else old_ema[0, h, j].double().numpy(),
                                        int(positions[0, h, j]) - (seen - N_UP), CONFIG)
            np.testing.assert_allclose(raw.ema[0, h, j].double().numpy(), ema, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(raw.tail[0, h, j].double().numpy(), tail, rtol=1e-6)
            np.testing.assert_allclose(raw.recency[0, h, j].double().numpy(),
                                       reference_recency(95 - int(positions[0, h, j]), CONFIG), atol=1e-5)


@pytest.mark.parametrize("end_pad", [0, 16])
def test_arrival_mask_matters_when_the_signal_is_not_zero_before_arrival(end_pad):
    """The arrival mask is applied to the frame weights, not only implied by a zero signal (with and
    without zeros appended to the signal)."""
    cfg = FeatureConfig(n_up=64, end_pad=end_pad)
    attn = torch.rand(1, 1, 64, 1)
    positions = torch.tensor([[[40]]])
    kwargs = dict(query_positions=torch.arange(64).view(1, 64), positions=positions, valid=positions >= 0,
                  tokens_seen=torch.tensor([64]), old_tail=torch.zeros(1, 1, 1, 16), old_ema=torch.zeros(1, 1, 1, 17),
                  config=cfg)
    new = raw_features(attn, is_new=torch.tensor([[[True]]]), **kwargs).ema[0, 0, 0].double().numpy()
    ema, _ = reference_token(attn[0, 0, :, 0].double().numpy(), None, None, 40, cfg)
    np.testing.assert_allclose(new, ema, rtol=1e-4, atol=1e-6)
    old = raw_features(attn, is_new=torch.tensor([[[False]]]), **kwargs).ema[0, 0, 0]
    assert (old > torch.from_numpy(new).float() + 1e-6).any()


def test_end_pad_lets_the_newest_queries_count():
    """Without end padding the Hann window hides the newest query's attention (weight ~0.01 at the
    window's last sample); 16 appended zeros put it under a frame's centre, and every query of the
    buffer then gets a total window weight of 1 (docs/algorithm.md §4)."""
    def dc(end_pad: int, query: int) -> float:
        cfg = FeatureConfig(n_up=32, end_pad=end_pad)
        attn = torch.zeros(1, 1, 32, 1)
        attn[0, 0, query, 0] = 1.0
        positions = torch.tensor([[[0]]])
        raw = raw_features(attn, torch.arange(32).view(1, 32), positions, positions >= 0, torch.tensor([[[True]]]),
                           torch.tensor([32]), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 17), cfg)
        return float(raw.ema[0, 0, 0, 0])
    assert dc(0, 31) < 0.01 * dc(0, 16)
    assert dc(16, 31) > 0.5 * dc(16, 16)
    assert FeatureConfig(n_up=32, end_pad=16).frames == FeatureConfig(n_up=32).frames + 1


def test_signal_window_places_padded_and_short_query_buffers_in_time_order():
    """Rows whose buffer holds fewer than n_up queries (padding at the end, the runtime's batch
    layout) get their signal right-aligned: the missing, oldest steps are zeros at the front."""
    attn = torch.rand(2, 1, 5, 3)
    q_pos = torch.tensor([[10, 11, 12, 13, 14], [12, 13, 14, -1, -1]])
    out = signal_window(attn, q_pos, torch.tensor([15, 15]), n_up=6)
    assert out.shape == (2, 1, 6, 3)
    torch.testing.assert_close(out[0, :, 1:], attn[0])
    assert not out[0, :, 0].any()
    torch.testing.assert_close(out[1, :, 3:], attn[1, :, :3])
    assert not out[1, :, :3].any()


def test_feature_config_rejects_inconsistent_windows():
    with pytest.raises(ValueError, match="multiple of hop"):
        FeatureConfig(n_up=40)
    with pytest.raises(ValueError, match="multiple of hop"):
        FeatureConfig(n_up=32, end_pad=8)
    with pytest.raises(ValueError, match="end_pad >= 0"):
        FeatureConfig(n_up=32, end_pad=-16)
    with pytest.raises(ValueError, match="n_up"):
        namm.make_policy("namm", checkpoint="zeros", n_up=8)
    assert FeatureConfig().frames == 32 and FeatureConfig().bins == 17 and FeatureConfig().dim == 25
