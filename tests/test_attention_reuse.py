"""A prefill step that ends at a memory update hands its attention to the update: same output as
SDPA, same probabilities as attending the buffered queries again, same tokens and kept sets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import namm
from namm.memory.masks import attention_with_probs, buffered_attention, visibility
from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.wrapped import WrappedPolicy
from tiny_models import random_prompt, tiny_model


@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("queries_per_chunk", [10_000, 7, 1])
def test_attention_with_probs_matches_sdpa_and_buffered_attention(sliding_window, ragged, queries_per_chunk):
    gen = torch.Generator().manual_seed(0)
    B, H, G, N, K, D = 2, 3, 2, 24, 70, 16
    keys, values = torch.randn(B, H, K, D, generator=gen), torch.randn(B, H, K, D, generator=gen)
    queries = torch.randn(B, H * G, N, D, generator=gen) * 2
    key_positions = torch.arange(K).expand(B, H, K).clone()
    if ragged:  # heads hold fewer older tokens, padded up to the step's own keys (the last N slots)
        key_positions[0, 1, 36:K - N] = -1
        key_positions[1, 2, 20:K - N] = -1
    query_positions = torch.arange(K - N, K).expand(B, N).clone()
    chunk_bytes = queries_per_chunk * 4 * B * H * G * K
    out, probs = attention_with_probs(queries, query_positions, keys, values, key_positions, 0.25, sliding_window,
                                      last=10, chunk_bytes=chunk_bytes)
    visible = visibility(query_positions, key_positions, sliding_window).repeat_interleave(G, dim=1)
    want = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    buffered = buffered_attention(queries[:, :, -10:], query_positions[:, -10:], keys, key_positions, 0.25,
                                  sliding_window)
    torch.testing.assert_close(probs, buffered, atol=1e-6, rtol=1e-5)


class Views(WrappedPolicy):
    """Runs ``inner`` and keeps every update's view, its keep mask and whether the step handed it
    its attention."""

    def __init__(self, inner: MemoryPolicy):
        super().__init__(inner)
        self.updates: list[tuple[LayerView, bool, torch.Tensor]] = []

    def select(self, view: LayerView) -> torch.Tensor:
        handed = view._attention is not None
        keep = super().select(view)
        self.updates.append((view, handed, keep))
        return keep


class NoReuse(Views):
    """The same, with an attention hook that changes nothing: the runtime then never reuses."""

    def attend(self, layer_idx, queries, keys, values, visible, scaling):
        return None


@pytest.mark.parametrize("kind", ["llama-gqa", "gemma3"])
@pytest.mark.parametrize("name, options", [
    ("h2o", {"budget": 0.5}),  # query window None: every query since the previous update
    ("tova", {"budget": 0.5}),  # window 1
    ("namm", {"checkpoint": "smollm2-135m", "budget": 0.4, "schedule": "progressive"}),  # window n_up
])
def test_reused_attention_changes_nothing(kind, name, options):
    model = tiny_model(kind)
    prompt = random_prompt(200)
    reuse, fresh = (cls(namm.make_policy(name, n_up=32, **options)) for cls in (Views, NoReuse))
    got = namm.generate(model, None, prompt, policy=reuse, max_new_tokens=40)
    want = namm.generate(model, None, prompt, policy=fresh, max_new_tokens=40)
    assert got.token_ids == want.token_ids
    assert len(reuse.updates) == len(fresh.updates)
    assert not any(handed for _, handed, _ in fresh.updates)
    assert sum(handed for _, handed, _ in reuse.updates) >= model.config.num_hidden_layers * 5, "prefill updates"
    for (view, handed, keep), (_, _, keep_fresh) in zip(reuse.updates, fresh.updates):
        assert torch.equal(keep, keep_fresh)
        if handed:
            again = buffered_attention(view.queries, view.query_positions, view.keys, view.positions, view.scaling,
                                       view.sliding_window)
            torch.testing.assert_close(view.attention(), again, atol=1e-6, rtol=1e-5)
