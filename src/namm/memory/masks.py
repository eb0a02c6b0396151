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


BUFFERED_CHUNK_BYTES = 64 << 20  # float32 logits of one chunk of queries in :func:`buffered_attention`


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

    The queries go in chunks whose logits (and their softmax) take at most ``chunk_bytes``, so the
    memory beyond the result stays bounded however many queries and keys there are (at least one
    query per chunk), at the cost of one matmul and one softmax per chunk: each query's row is
    computed whole, exactly as without chunks. The mask is applied only after the slots every
    query sees."""
    B, Hq, N, D = queries.shape
    H, K = keys.shape[1], keys.shape[2]
    G = Hq // H
    q = queries.reshape(B, H, G, N, D)
    k = keys.float().transpose(-1, -2)  # (B, H, D, K)
    start = shared_prefix(query_positions, key_positions, sliding_window)
    width = max(1, chunk_bytes // (4 * B * H * G * max(K, 1)))
    probs = keys.new_empty(B, H, N, K, dtype=torch.float32)
    for lo in range(0, N, width):
        hi = min(lo + width, N)
        n = hi - lo
        logits = torch.matmul(q[:, :, :, lo:hi].reshape(B, H, G * n, D).float() * scaling, k).view(B, H, G, n, K)
        visible = visibility(query_positions[:, lo:hi], key_positions[..., start:], sliding_window)
        logits[..., start:].masked_fill_(~visible[:, :, None], float("-inf"))
        probs[:, :, lo:hi] = torch.softmax(logits, dim=-1).mean(2)
    real_query = query_positions >= 0
    if not bool(real_query.all()):  # padded query rows: no attention at all (and no NaN)
        probs.masked_fill_(~real_query[:, None, :, None], 0.0)
    return probs
