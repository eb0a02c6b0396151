"""The buffered attention of a memory update: chunked over queries ≡ one materialised softmax."""

from __future__ import annotations

import pytest
import torch

from namm.memory.masks import buffered_attention, visibility


def reference(queries, query_positions, keys, key_positions, scaling, window):
    """The attention written out: every logit materialised, one softmax, GQA mean."""
    B, Hq, N, D = queries.shape
    H = keys.shape[1]
    G = Hq // H
    logits = torch.einsum("bhgnd,bhkd->bhgnk", queries.view(B, H, G, N, D).double(), keys.double()) * scaling
    visible = visibility(query_positions, key_positions, window)[:, :, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs * (query_positions >= 0)[:, None, None, :, None]).mean(2).float()


def inputs(seed: int, padded: bool, ragged: bool):
    gen = torch.Generator().manual_seed(seed)
    B, H, G, N, K, D = 2, 3, 2, 24, 70, 16
    keys = torch.randn(B, H, K, D, generator=gen)
    queries = torch.randn(B, H * G, N, D, generator=gen) * 2
    key_positions = torch.arange(K).expand(B, H, K).clone()
    if ragged:  # heads and rows hold different tokens, right-padded with empty slots
        key_positions[0, 1, -9:] = -1
        key_positions[1, :, -4:] = -1
        key_positions[1, 2, 10:] += 3
        key_positions[1, 2, -7:] = -1
    query_positions = torch.arange(K - N, K).expand(B, N).clone()
    if padded:
        query_positions[1, :5] = -1
    return queries, query_positions, keys, key_positions


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_chunked_attention_matches_one_softmax(window, padded, ragged):
    queries, query_positions, keys, key_positions = inputs(0, padded, ragged)
    want = reference(queries, query_positions, keys, key_positions, 0.25, window)
    B, Hq, N, _ = queries.shape
    per_query = 4 * B * Hq * keys.shape[2]
    for queries_per_chunk in (10_000, N, 7, 1):  # one chunk, then several
        got = buffered_attention(queries, query_positions, keys, key_positions, 0.25, window,
                                 chunk_bytes=queries_per_chunk * per_query)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert bool(torch.isfinite(got).all())
