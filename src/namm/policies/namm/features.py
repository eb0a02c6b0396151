"""NAMM token features: attention spectrogram, EMA over updates, normalisation, recency.

For every cached token of a layer and KV head the signal is the attention it received from the
last ``n_up`` queries (GQA-averaged, in time order). Prepended with the last ``carry`` values of
the token's previous signal (zeros for new tokens) and, optionally, followed by ``end_pad`` zeros,
it goes through an STFT (periodic Hann window 32, hop 16, no centring, magnitude: 32 frames x 17
bins), the frames are folded into an exponential moving average that carries over between
updates, and the normalised EMA is joined to a sinusoidal embedding of the token's recency. See
docs/algorithm.md §3-4.

Everything runs in float32 over (batch, heads, tokens) at once; the STFT is one batched matmul
of a fixed (window -> real/imag bins) basis with strided frames of the attention tensor, in the
(B, H, N, K) layout the attention arrives in (no transpose of the large tensor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

from namm.policies.base import LayerView

TAIL_STATE = "namm_tail"  # (B, H, K, carry): last signal values of each token's previous update
EMA_STATE = "namm_ema"  # (B, H, K, bins): each token's un-normalised spectrogram EMA
CHUNK_TOKENS = 2048  # (row, head, token) signals transformed at once: small enough to stay in cache


@dataclass(frozen=True)
class FeatureConfig:
    """Constants of the feature pipeline (defaults: the paper setting of docs/algorithm.md §4)."""

    n_up: int = 512  # queries per signal = tokens between memory updates
    window: int = 32  # STFT window (periodic Hann)
    hop: int = 16  # STFT hop
    carry: int = 16  # signal values carried from the previous update and prepended
    gamma: float = 0.99  # EMA decay per token
    recency_dims: int = 8  # sin/cos recency embedding size (even)
    recency_base: float = 50000.0  # recency frequencies base^(-k / (recency_dims / 2))
    eps: float = 1e-7  # floor of the normalisation std
    end_pad: int = 0  # zeros appended after the newest query (0: the paper; docs/algorithm.md §4)

    def __post_init__(self) -> None:
        if self.window < 2 or self.hop < 1 or self.carry < 0 or self.end_pad < 0:
            raise ValueError("feature config: window must be >= 2, hop >= 1, carry >= 0 and end_pad >= 0")
        if self.n_up + self.carry < self.window or (self.n_up + self.carry + self.end_pad - self.window) % self.hop:
            raise ValueError(f"feature config: n_up + carry + end_pad - window must be a non-negative multiple of "
                             f"hop (n_up={self.n_up}, carry={self.carry}, end_pad={self.end_pad}, "
                             f"window={self.window}, hop={self.hop})")
        if self.carry > self.n_up:
            raise ValueError(f"feature config: carry ({self.carry}) must not exceed n_up ({self.n_up})")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"feature config: gamma must be in (0, 1], got {self.gamma}")
        if self.recency_dims < 0 or self.recency_dims % 2:
            raise ValueError(f"feature config: recency_dims must be even and >= 0, got {self.recency_dims}")

    @property
    def frames(self) -> int:
        return (self.n_up + self.carry + self.end_pad - self.window) // self.hop + 1

    @property
    def bins(self) -> int:
        return self.window // 2 + 1

    @property
    def dim(self) -> int:
        """Length of a token's feature vector: recency embedding then spectrogram bins."""
        return self.recency_dims + self.bins

    def to_dict(self) -> dict:
        return asdict(self)


class Normalization(NamedTuple):
    """Frozen per-frequency-bin statistics of the spectrogram EMA."""

    mean: Tensor  # (bins,)
    std: Tensor  # (bins,)

    def to(self, device: torch.device) -> "Normalization":
        """The statistics as float32 on ``device`` (this object when they are there already)."""
        if self.mean.device == device and self.mean.dtype == self.std.dtype == torch.float32:
            return self
        return Normalization(self.mean.to(device, torch.float32), self.std.to(device, torch.float32))

    def apply(self, ema: Tensor, eps: float) -> Tensor:
        norm = self.to(ema.device)
        return (ema - norm.mean) / norm.std.clamp(min=eps)

    def invert(self, normalised: Tensor, eps: float) -> Tensor:
        """The un-normalised EMA of ``normalised`` (..., bins): the inverse of :meth:`apply`."""
        norm = self.to(normalised.device)
        return normalised * norm.std.clamp(min=eps) + norm.mean


@lru_cache(maxsize=16)
def stft_basis(config: FeatureConfig, device: torch.device | str = "cpu") -> Tensor:
    """(2 * bins, window) float32: rows are Hann-windowed cosines then negative sines, so that
    ``basis @ frame`` gives the real parts then the imaginary parts of the one-sided DFT."""
    n = torch.arange(config.window, dtype=torch.float64)
    k = torch.arange(config.bins, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / config.window
    hann = torch.hann_window(config.window, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * hann
    return basis.to(device=device, dtype=torch.float32)


@lru_cache(maxsize=16)
def ema_frame_weights(config: FeatureConfig, device: torch.device | str = "cpu") -> Tensor:
    """(frames,) weight of each STFT frame in the EMA: (1 - a) a^(T - 1 - t) with a = gamma^hop."""
    a = config.gamma ** config.hop
    t = torch.arange(config.frames, dtype=torch.float64)
    return ((1 - a) * a ** (config.frames - 1 - t)).to(device=device, dtype=torch.float32)


def signal_window(attention: Tensor, query_positions: Tensor, tokens_seen: Tensor, n_up: int) -> Tensor:
    """(B, H, n_up, K) float32 attention of the last ``n_up`` query positions, in time order.

    ``attention`` is (B, H, N, K) for buffered queries at ``query_positions`` (B, N), -1 marking
    padding. Query position ``p`` lands at time index ``p - (tokens_seen - n_up)``; time steps with
    no buffered query (a row with fewer than ``n_up`` queries) stay zero, at the front."""
    B, H, N, K = attention.shape
    start = (tokens_seen - n_up).view(B, 1)
    slot = query_positions - start
    expected = torch.arange(n_up, device=slot.device).expand(B, n_up)
    if N == n_up and bool((slot == expected).all()):
        return attention.float()
    ok = (query_positions >= 0) & (slot >= 0) & (slot < n_up)
    src = attention.float() * ok[:, None, :, None]
    index = slot.clamp(0, n_up - 1)[:, None, :, None].expand(B, H, N, K)
    return attention.new_zeros(B, H, n_up, K, dtype=torch.float32).scatter_add_(2, index, src)


def spectrogram(signal: Tensor, tail: Tensor, config: FeatureConfig) -> Tensor:
    """(B, H, frames, bins, K) STFT magnitude of every token's signal with its tail prepended and
    ``config.end_pad`` zeros appended.

    ``signal`` is (B, H, n_up, K) (time along dim 2), ``tail`` is (B, H, carry, K)."""
    parts = [tail, signal]
    if config.end_pad:
        parts.append(signal.new_zeros(*signal.shape[:2], config.end_pad, signal.shape[3]))
    full = torch.cat(parts, dim=2)  # (B, H, carry + n_up + end_pad, K)
    B, H, _, K = full.shape
    s = full.stride()
    frames = full.as_strided((B, H, config.frames, config.window, K), (s[0], s[1], config.hop * s[2], s[2], s[3]))
    spec = torch.matmul(stft_basis(config, full.device), frames)  # (B, H, T, 2 * bins, K)
    return torch.hypot(spec[:, :, :, :config.bins], spec[:, :, :, config.bins:])


def arrival_frame(positions: Tensor, is_new: Tensor, tokens_seen: Tensor, config: FeatureConfig) -> Tensor:
    """(B, H, K) first STFT frame a token contributes to: floor(u / hop) for a new token at
    in-window index ``u``, 0 for a token that was already cached."""
    start = (tokens_seen - config.n_up).view(-1, 1, 1)
    u = (positions - start).clamp(min=0)
    return torch.where(is_new, torch.div(u, config.hop, rounding_mode="floor"), 0)


def ema_update(spec: Tensor, first_frame: Tensor, old_ema: Tensor, config: FeatureConfig) -> Tensor:
    """(B, H, K, bins) new un-normalised EMA: frames weighted by (1 - a) a^(T-1-t) from each
    token's arrival frame on, plus gamma^n_up times the carried EMA (zero for new tokens)."""
    t = torch.arange(config.frames, device=spec.device)
    weights = ema_frame_weights(config, spec.device)[None, None, :, None] * (t[None, None, :, None] >= first_frame[:, :, None, :])
    fresh = (spec * weights[:, :, :, None, :]).sum(2)  # (B, H, bins, K)
    return fresh.transpose(-1, -2) + config.gamma ** config.n_up * old_ema


def recency_frequencies(config: FeatureConfig, device: torch.device | str = "cpu") -> Tensor:
    """(recency_dims / 2,) float64 frequencies w_k = base^(-k / (recency_dims / 2)), fastest first."""
    half = config.recency_dims // 2
    return config.recency_base ** (-torch.arange(half, device=device, dtype=torch.float64) / half)


def recency_embedding(positions: Tensor, valid: Tensor, config: FeatureConfig) -> Tensor:
    """(B, H, K, recency_dims): [sin(r w_k)..., cos(r w_k)...] with r = newest position in the head
    minus the token's position and w_k = base^(-k / (recency_dims / 2)); zero for empty slots."""
    newest = torch.where(valid, positions, -1).amax(-1, keepdim=True)
    r = torch.where(valid, newest - positions, 0).float()
    angle = r[..., None] * recency_frequencies(config, positions.device).float()
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1) * valid[..., None]


@dataclass
class RawFeatures:
    """What one update computes for one layer before normalisation."""

    ema: Tensor  # (B, H, K, bins) un-normalised spectrogram EMA (the carried state)
    tail: Tensor  # (B, H, K, carry) last signal values (the carried state)
    recency: Tensor  # (B, H, K, recency_dims)


def raw_features(
    attention: Tensor,
    query_positions: Tensor,
    positions: Tensor,
    valid: Tensor,
    is_new: Tensor,
    tokens_seen: Tensor,
    old_tail: Tensor,
    old_ema: Tensor,
    config: FeatureConfig,
) -> RawFeatures:
    """Features of every slot of one layer from the attention of its buffered queries.

    Shapes: ``attention`` (B, H, N, K), ``query_positions`` (B, N), ``positions``/``valid``/
    ``is_new`` (B, H, K), ``tokens_seen`` (B,), ``old_tail`` (B, H, K, carry), ``old_ema``
    (B, H, K, bins). New tokens ignore the carried tensors."""
    signal = signal_window(attention, query_positions, tokens_seen, config.n_up)
    old = (valid & ~is_new)[..., None]
    tail = torch.where(old, old_tail.float(), 0.0).transpose(-1, -2)  # (B, H, carry, K)
    first = arrival_frame(positions, is_new, tokens_seen, config)
    old_ema = torch.where(old, old_ema.float(), 0.0)
    B, H, K = positions.shape
    ema = old_ema.new_empty(B, H, K, config.bins)
    step = max(1, CHUNK_TOKENS // (B * H))  # bounds the memory of the spectrogram at long contexts
    for k in range(0, K, step):
        part = slice(k, k + step)
        spec = spectrogram(signal[..., part], tail[..., part], config)
        ema[:, :, part] = ema_update(spec, first[..., part], old_ema[:, :, part], config)
    valid_f = valid[..., None].float()
    new_tail = signal[:, :, signal.shape[2] - config.carry:].transpose(-1, -2) * valid_f
    return RawFeatures(ema=ema * valid_f, tail=new_tail, recency=recency_embedding(positions, valid, config))


def layer_features(view: LayerView, config: FeatureConfig) -> RawFeatures:
    """Compute a layer's raw features from a runtime view and store the carried state in it."""
    B, H, K = view.positions.shape
    zeros = view.positions.new_zeros((B, H, K, 1), dtype=torch.float32)
    old_tail = view.state.get(TAIL_STATE, zeros.expand(B, H, K, config.carry))
    old_ema = view.state.get(EMA_STATE, zeros.expand(B, H, K, config.bins))
    raw = raw_features(view.attention(), view.query_positions, view.positions, view.valid, view.is_new,
                       view.tokens_seen, old_tail, old_ema, config)
    view.state[TAIL_STATE] = raw.tail
    view.state[EMA_STATE] = raw.ema
    return raw


def token_features(raw: RawFeatures, normalization: Normalization, config: FeatureConfig) -> Tensor:
    """(B, H, K, dim) feature vectors: [recency embedding, normalised spectrogram EMA]."""
    return torch.cat([raw.recency, normalization.apply(raw.ema, config.eps)], dim=-1)
