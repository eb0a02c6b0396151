"""NAMM on the embedded SmolLM2-135M (slow): the zero NAMM is the full-cache model, over several
memory updates, and an evolved-size NAMM really shrinks the cache."""

from __future__ import annotations

import pytest
import torch

import namm
from namm.policies.namm import shipped_checkpoints
from namm.tasks.corpus import corpus_tokens

pytestmark = pytest.mark.slow
STATS = "smollm2-135m-zeros"


@pytest.fixture(scope="module")
def prompt(smollm2):
    return corpus_tokens(smollm2[1], 2000, split="heldout", seed=5)


def test_zero_namm_equals_full_on_2000_tokens(smollm2, prompt):
    model, tokenizer = smollm2
    full = namm.generate(model, tokenizer, prompt, policy="full", max_new_tokens=6, eos_token_id=None)
    zero = namm.generate(model, tokenizer, prompt, policy=namm.make_policy("namm", checkpoint=STATS),
                         max_new_tokens=6, eos_token_id=None, record_history=True)
    assert zero.token_ids == full.token_ids
    assert len(zero.history) == 3  # updates at 512, 1024 and 1536 tokens
    assert zero.cache_tokens_per_layer == [zero.tokens_seen] * 30


def test_shipped_statistics_are_calibrated_and_random_namm_evicts(smollm2, prompt):
    assert STATS in shipped_checkpoints()
    policy = namm.make_policy("namm", checkpoint=STATS)
    assert (policy.normalization.std > 0).all() and (policy.normalization.mean > 0).all()
    assert policy.loaded_checkpoint.provenance["model"] == "smollm2-135m"
    policy.params = torch.randn(policy.num_params, generator=torch.Generator().manual_seed(0)) * 0.3
    out = namm.generate(smollm2[0], smollm2[1], prompt[:1100], policy=policy, max_new_tokens=4, eos_token_id=None)
    assert out.kv_bytes < out.kv_bytes_full and len(set(out.cache_tokens_per_layer)) > 1
    assert len(out.token_ids) == 4
