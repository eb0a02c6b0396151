"""Visibility of keys to queries by absolute position, and the attention of buffered queries.

Plain tensor functions with no dependency on the runtime, so that both the attention function and
a policy's :class:`~namm.policies.base.LayerView` can use them.
"""

from __future__ import annotations

from collections.abc import Iterator

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


BUFFERED_CHUNK_BYTES = 4 << 20  # float32 logits of one chunk of queries: small chunks stay in cache (docs/results/runtime.md)


def shared_prefix(query_positions: Tensor, key_positions: Tensor, sliding_window: int | None) -> int:
    """How many leading slots every real query sees in every row and head: slots holding a token
    older than all the queries (none with a sliding window). Empty slots end the prefix, wherever
    they are."""
    real = query_positions >= 0
    if sliding_window is not None or not bool(real.any()):
        return 0
    oldest_query = query_positions[real].min()
    seen_by_all = ((key_positions >= 0) & (key_positions < oldest_query)).flatten(0, -2).all(0)
    return int(seen_by_all.int().cumprod(0).sum())


def _softmax_chunks(
    queries: Tensor,
    query_positions: Tensor,
    keys: Tensor,
    key_positions: Tensor,
    scaling: float,
    sliding_window: int | None,
    chunk_bytes: int,
    own_keys_last: bool = False,
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(lo, hi, probs)``: the (B, H, G, hi - lo, K') float32 softmax attention of queries
    ``lo:hi`` (B, H*G, N, D) over the first K' of the keys (B, H, K, D), zero where not visible, in
    chunks of queries whose logits take at most ``chunk_bytes`` (at least one query per chunk).
    K' = K, except with ``own_keys_last`` (the last N slots hold the queries' own keys, in query
    order, as in a forward step): a chunk then skips the slots after its newest query's own key,
    which none of its queries can see (their attention there is zero). Each query's row is computed
    whole, so the chunking never changes a value. The mask is applied only after the slots every
    query sees."""
    B, Hq, N, D = queries.shape
    H, K = keys.shape[1], keys.shape[2]
    G = Hq // H
    q = queries.reshape(B, H, G, N, D)
    k = keys.float().transpose(-1, -2)  # (B, H, D, K)
    start = shared_prefix(query_positions, key_positions, sliding_window)
    width = max(1, chunk_bytes // (4 * B * H * G * max(K, 1)))
    for lo in range(0, N, width):
        hi = min(lo + width, N)
        n, seen = hi - lo, K - N + hi if own_keys_last else K
        logits = torch.matmul(q[:, :, :, lo:hi].reshape(B, H, G * n, D).float() * scaling, k[..., :seen])
        logits = logits.view(B, H, G, n, seen)
        visible = visibility(query_positions[:, lo:hi], key_positions[..., start:seen], sliding_window)
        logits[..., start:].masked_fill_(~visible[:, :, None], float("-inf"))
        yield lo, hi, torch.softmax(logits, dim=-1)


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
    (B, H, K, D), averaged over the G query heads of each KV head; zero where not visible and for
    padded queries (position -1). Memory beyond the result stays bounded by ``chunk_bytes``."""
    B, _, N, _ = queries.shape
    H, K = keys.shape[1], keys.shape[2]
    probs = keys.new_empty(B, H, N, K, dtype=torch.float32)
    for lo, hi, chunk in _softmax_chunks(queries, query_positions, keys, key_positions, scaling, sliding_window,
                                         chunk_bytes):
        probs[:, :, lo:hi] = chunk.mean(2)
    real_query = query_positions >= 0
    if not bool(real_query.all()):  # padded query rows: no attention at all (and no NaN)
        probs.masked_fill_(~real_query[:, None, :, None], 0.0)
    return probs


def attention_with_probs(
    queries: Tensor,
    query_positions: Tensor,
    keys: Tensor,
    values: Tensor,
    key_positions: Tensor,
    scaling: float,
    sliding_window: int | None,
    last: int,
    chunk_bytes: int = BUFFERED_CHUNK_BYTES,
) -> tuple[Tensor, Tensor]:
    """Attention written out, for a step whose queries end at a memory update: the (B, H*G, N, D)
    output (in the queries' dtype) and the (B, H, min(last, N), K) probabilities of the last
    ``last`` queries averaged over each KV head's G query heads, exactly what
    :func:`buffered_attention` gives the update for them. One softmax serves both, so the update
    does not attend these queries a second time. Every query must be real (no padding), and the
    last N slots must hold the queries' own keys in query order (a forward step's keys)."""
    B, Hq, N, _ = queries.shape
    H, K, Dv = keys.shape[1], keys.shape[2], values.shape[-1]
    G, last = Hq // H, min(last, N)
    out = queries.new_empty(B, Hq, N, Dv)
    probs = keys.new_empty(B, H, last, K, dtype=torch.float32)
    v, first = values.float(), N - last
    for lo, hi, chunk in _softmax_chunks(queries, query_positions, keys, key_positions, scaling, sliding_window,
                                         chunk_bytes, own_keys_last=True):
        n, seen = hi - lo, chunk.shape[-1]
        attended = torch.matmul(chunk.reshape(B, H, G * n, seen), v[:, :, :seen])  # (B, H, G*n, Dv)
        out[:, :, lo:hi] = attended.view(B, Hq, n, Dv)
        if hi > first:
            rows = slice(max(lo, first) - first, hi - first)
            probs[:, :, rows, :seen] = chunk[:, :, :, max(lo, first) - lo:].mean(2)
            probs[:, :, rows, seen:] = 0.0
    return out, probs
