"""Visibility of keys to queries by absolute position, and the attention of buffered queries.

Plain tensor functions with no dependency on the runtime, so that both the attention function and
a policy's :class:`~namm.policies.base.LayerView` can use them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def visibility(query_positions: Tensor, key_positions: Tensor, sliding_window: int | None) -> Tensor:
    """(B, H, Q, K) bool: which keys each query may attend to.

    ``query_positions`` is (B, Q), ``key_positions`` (B, H, K); -1 marks padding / empty slots."""
    q = query_positions[:, None, :, None]
    k = key_positions[:, :, None, :]
    visible = (k >= 0) & (k <= q)
    if sliding_window is not None:
        visible &= (q - k) < sliding_window
    return visible


BUFFERED_CHUNK_BYTES = 64 << 20  # float32 logits of one chunk of keys in :func:`buffered_attention`


def shared_prefix(query_positions: Tensor, key_positions: Tensor, sliding_window: int | None) -> int:
    """How many leading slots every real buffered query sees (older than all of them; none with a
    sliding window). Slots are packed and in temporal order (the runtime compacts before an update)."""
    real = query_positions >= 0
    if sliding_window is not None or not bool(real.any()):
        return 0
    oldest_query = int(query_positions[real].min())
    return int(((key_positions >= 0) & (key_positions < oldest_query)).sum(-1).min())


def buffered_attention(
    queries: Tensor,
    query_positions: Tensor,
    keys: Tensor,
    key_positions: Tensor,
    scaling: float,
    sliding_window: int | None = None,
    chunk_bytes: int = BUFFERED_CHUNK_BYTES,
) -> Tensor:
    """(B, H, N, K) float32 softmax attention of buffered queries (B, H*G, N, D) over keys
    (B, H, K, D), averaged over the G query heads of each KV head; zero where not visible.

    The logits are computed over chunks of keys, at most ``chunk_bytes`` at a time, so the memory
    beyond the result stays bounded at any cache size: when every key fits in one chunk the
    softmax takes one pass, otherwise a first pass accumulates each query's log-normaliser and a
    second writes the probabilities. The mask is applied only after the slots every query sees."""
    B, Hq, N, D = queries.shape
    H, K = keys.shape[1], keys.shape[2]
    G = Hq // H
    q = queries.float().reshape(B, H, G * N, D) * scaling
    start = shared_prefix(query_positions, key_positions, sliding_window)

    def logits(lo: int, hi: int) -> Tensor:  # (B, H, G * N, hi - lo), -inf where not visible
        out = torch.matmul(q, keys[:, :, lo:hi].float().transpose(-1, -2))
        if hi > start:
            first = max(lo, start)
            visible = visibility(query_positions, key_positions[..., first:hi], sliding_window)
            out.view(B, H, G, N, hi - lo)[..., first - lo:].masked_fill_(~visible[:, :, None], float("-inf"))
        return out

    width = max(1, chunk_bytes // (4 * B * H * G * N))
    if width >= K:
        probs = torch.softmax(logits(0, K), dim=-1).view(B, H, G, N, K).mean(2)
    else:
        spans = [(lo, min(lo + width, K)) for lo in range(0, K, width)]
        norm = torch.stack([torch.logsumexp(logits(lo, hi), dim=-1) for lo, hi in spans]).logsumexp(0)
        norm = norm.masked_fill_(norm == float("-inf"), 0.0)[..., None]  # a padded query sees nothing
        probs = q.new_empty(B, H, N, K)
        for lo, hi in spans:
            probs[..., lo:hi] = logits(lo, hi).sub_(norm).exp_().view(B, H, G, N, hi - lo).mean(2)
    real_query = query_positions >= 0
    if not bool(real_query.all()):  # padded query rows: no attention at all (and no NaN)
        probs.masked_fill_(~real_query[:, None, :, None], 0.0)
    return probs
