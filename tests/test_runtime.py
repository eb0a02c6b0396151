"""The memory runtime on tiny random models: equivalences, budgets, positions, batching."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import namm
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.base import LayerView, MemoryPolicy
from tiny_models import KINDS, random_prompt, tiny_model

BASELINES = ["recency", "streaming", "h2o", "l2", "snapkv", "tova", "pyramidkv", "random"]


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return tiny_model(request.param)


def hf_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    out = model.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_full_policy_matches_hf_generate(model):
    prompt = random_prompt(300)
    ours = namm.generate(model, None, prompt, policy="full", max_new_tokens=12)
    assert ours.token_ids == hf_greedy(model, prompt, 12)
    assert ours.tokens_seen == 300 + 11
    assert ours.kv_bytes == ours.kv_bytes_full


def test_large_recency_window_matches_full(model):
    prompt = random_prompt(300)
    full = namm.generate(model, None, prompt, policy="full", max_new_tokens=10)
    window = namm.generate(model, None, prompt, policy=namm.make_policy("recency", budget=4000, n_up=64),
                           max_new_tokens=10)
    assert window.token_ids == full.token_ids


@torch.inference_mode()
def last_logits(model, prompt: torch.Tensor, chunk: int) -> torch.Tensor:
    runner = MemoryRunner(model, namm.make_policy("full"), 1, chunk_size=chunk)
    with memory_attention_enabled(model):
        return runner.feed([prompt])[0]


def test_chunked_prefill_matches_one_shot(model):
    prompt = random_prompt(333)
    one_shot = last_logits(model, prompt, 4096)
    for chunk in (128, 50, 1):
        torch.testing.assert_close(last_logits(model, prompt, chunk), one_shot, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["full", "h2o", "snapkv", "tova", "l2", "random"])
def test_batch_matches_single_runs(model, policy):
    prompts = [random_prompt(n, seed=n) for n in (70, 150, 33)]

    def make():
        return namm.make_policy(policy) if policy == "full" else namm.make_policy(policy, budget=0.5, n_up=32)

    batch = namm.generate(model, None, prompts, policy=make(), max_new_tokens=40)
    for prompt, out in zip(prompts, batch):
        alone = namm.generate(model, None, prompt, policy=make(), max_new_tokens=40)
        assert out.token_ids == alone.token_ids
        assert out.cache_tokens_per_layer == alone.cache_tokens_per_layer


class Inspect(MemoryPolicy):
    """Wraps a policy and records what every update kept, to check budgets and positions."""

    def __init__(self, inner: MemoryPolicy):
        self.inner, self.n_up, self.query_window = inner, inner.n_up, inner.query_window
        self.records: list[tuple[LayerView, torch.Tensor]] = []

    def select(self, view: LayerView) -> torch.Tensor:
        keep = self.inner.select(view)
        self.records.append((view, keep))
        return keep


@pytest.mark.parametrize("policy", BASELINES)
@pytest.mark.parametrize("length", [20, 200])
def test_policy_budget_newest_and_positions(model, policy, length):
    probe = Inspect(namm.make_policy(policy, budget=0.3, n_up=32))
    out = namm.generate(model, None, random_prompt(length), policy=probe, max_new_tokens=80)
    assert len(probe.records) >= 3  # several updates, including during decoding
    for view, keep in probe.records:
        cap = torch.ceil(view.tokens_seen.double() * 0.3).long()
        held = keep.sum(-1)  # (B, H)
        if not (policy == "l2" and view.layer_idx < 2):
            if policy == "pyramidkv":
                cap = 2 * cap  # its lower layers may hold up to twice the mean budget
            assert (held <= cap[:, None]).all()
        assert (held == held[:, :1]).all(), "every head of a layer keeps the same count"
        newest = view.tokens_seen - 1
        kept_pos = torch.where(keep, view.positions, -1)
        assert (kept_pos == newest[:, None, None]).any(-1).all(), "newest token kept in every head"
    assert all(0 < n <= out.tokens_seen for n in out.cache_tokens_per_layer)
    assert out.kv_bytes < out.kv_bytes_full or length + 80 <= 32


@pytest.mark.parametrize("policy", BASELINES)
def test_kept_keys_are_the_full_cache_keys_at_their_positions(model, policy):
    """At the first update (end of a 64-token prefill), every kept slot must hold exactly the key
    the full cache holds for that position: nothing is re-rotated, shifted or mixed up."""
    prompt = random_prompt(64)
    with torch.inference_mode(), memory_attention_enabled(model):
        full = MemoryRunner(model, namm.make_policy("full"), 1)
        full.feed([prompt])
        evict = MemoryRunner(model, namm.make_policy(policy, budget=0.25, n_up=64), 1)
        evict.feed([prompt])
        evict.end_prompt()  # the update of prompt-end policies (progressive ones updated at 64 tokens)
    for full_layer, layer in zip(full.cache.layers, evict.cache.layers):
        pos = layer.positions  # (1, H, K)
        assert (pos >= 0).all() and (pos.diff(dim=-1) > 0).all(), "packed and in temporal order"
        idx = pos[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        torch.testing.assert_close(layer.keys, torch.gather(full_layer.keys, 2, idx))
        torch.testing.assert_close(layer.values, torch.gather(full_layer.values, 2, idx))
        assert layer.keys.shape[2] < full_layer.keys.shape[2] or policy == "l2"
        assert not {"keys", "values", "positions"} & set(layer._stores), "pre-eviction storage released"


def test_prompt_shorter_than_a_chunk(model):
    prompt = random_prompt(5)
    assert namm.generate(model, None, prompt, policy="full", max_new_tokens=6).token_ids == hf_greedy(model, prompt, 6)


def test_sampling_is_seeded(model):
    prompt = random_prompt(40)
    a = namm.generate(model, None, prompt, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3, max_new_tokens=8)
    b = namm.generate(model, None, prompt, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3, max_new_tokens=8)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("policy", [namm.make_policy("full"), namm.make_policy("h2o", budget=64, n_up=32)],
                         ids=["full", "h2o"])
def test_cache_is_freed_without_a_gc_pass(model, policy):
    """A finished runner's cache (and the KV it holds) goes as soon as the runner does: nothing in
    the runtime holds it in a reference cycle that only the garbage collector would break."""
    runner = MemoryRunner(model, policy, 1, chunk_size=50)
    with torch.inference_mode(), memory_attention_enabled(model):
        runner.feed([random_prompt(150)])
    cache, keys = weakref.ref(runner.cache), weakref.ref(runner.cache.layers[0].keys)
    gc.disable()
    try:
        del runner
        assert cache() is None and keys() is None
    finally:
        gc.enable()
