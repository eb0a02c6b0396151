"""The memory runtime on the embedded SmolLM2-135M: equivalence with Hugging Face generate."""

from __future__ import annotations

import pytest
import torch

import namm
from namm.tasks.corpus import corpus_tokens

pytestmark = pytest.mark.slow


def test_full_policy_matches_hf_generate_on_a_long_prompt(smollm2):
    model, tokenizer = smollm2
    prompt = corpus_tokens(tokenizer, 1600, split="heldout", seed=3)
    ours = namm.generate(model, tokenizer, prompt, policy="full", max_new_tokens=12, eos_token_id=None)
    with torch.inference_mode():
        ref = model.generate(prompt[None], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours.token_ids == ref[0, len(prompt):].tolist()
    assert ours.kv_bytes == ours.kv_bytes_full


def test_eviction_shrinks_memory_and_keeps_generating(smollm2):
    model, tokenizer = smollm2
    prompt = corpus_tokens(tokenizer, 1100, split="heldout", seed=4)
    out = namm.generate(model, tokenizer, prompt, policy=namm.make_policy("h2o", budget=0.25),
                        max_new_tokens=8, eos_token_id=None)
    assert len(out.token_ids) == 8
    assert len(out.cache_tokens_per_layer) == model.config.num_hidden_layers
    # updates at 512 and 1024 tokens seen: 256 kept, then 76 more tokens arrive
    assert out.cache_tokens_per_layer == [256 + (1100 + 7 - 1024)] * model.config.num_hidden_layers
    assert out.kv_bytes / out.kv_bytes_full == pytest.approx(out.cache_fraction)
    assert out.kv_bytes < 0.4 * out.kv_bytes_full
