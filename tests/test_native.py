"""transformers-native use: ``model.generate`` and ``pipeline`` with ``namm.cache`` ≡ ``namm.generate``,
and chat messages as prompts, on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, pipeline

import namm
from fixtures.byte_tokenizer import byte_tokenizer
from namm.memory.driver import cache_argument
from namm.policies.base import LayerView, MemoryPolicy
from tiny_models import random_prompt, tiny_model
from wrapped_policy import RecordingPolicy

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module", params=["llama-gqa", "gemma3"])
def model(request):
    return tiny_model(request.param)


class Keeps(RecordingPolicy):
    """Runs ``inner`` and records what every layer kept at every update."""

    def __init__(self, inner: MemoryPolicy):
        super().__init__(inner)
        self.kept: list[tuple[int, list[int], torch.Tensor]] = []

    def record(self, view: LayerView, keep: torch.Tensor) -> None:
        self.kept.append((view.layer_idx, view.tokens_seen.tolist(), torch.where(keep, view.positions, -1)))


def random_namm(seed: int = 0):
    policy = namm.make_policy("namm", checkpoint="zeros", n_up=64)
    policy.params = torch.randn(policy.num_params, generator=torch.Generator().manual_seed(seed)) * 0.5
    return policy


POLICIES = {
    "full": lambda: namm.make_policy("full"),
    "h2o": lambda: namm.make_policy("h2o", budget=0.3, n_up=64),
    "namm-zeros": lambda: namm.make_policy("namm", checkpoint="zeros", n_up=64),
    "namm-random": random_namm,
    "snapkv": lambda: namm.make_policy("snapkv", budget=0.3),  # prompt-end: compresses before the first decode step
}


def native_generate(model, ids: torch.Tensor, policy: MemoryPolicy, n: int, chunk: int | None, **kwargs):
    memory = namm.cache(model, policy)
    with torch.inference_mode():
        out = model.generate(ids, **{cache_argument(model): memory}, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, prefill_chunk_size=chunk, **kwargs)
    return out, memory


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("chunk", [128, 100])  # 100: updates fall inside prefill chunks
def test_model_generate_with_namm_cache_matches_namm_generate(model, name, chunk):
    prompt = random_prompt(300)
    ref_policy, native_policy = Keeps(POLICIES[name]()), Keeps(POLICIES[name]())
    ref = namm.generate(model, None, prompt, policy=ref_policy, max_new_tokens=40)
    out, memory = native_generate(model, prompt[None], native_policy, 40, chunk)
    assert out[0, len(prompt):].tolist() == ref.token_ids
    assert memory.token_counts()[:, 0].tolist() == ref.cache_tokens_per_layer
    assert int(memory.seen[0]) == ref.tokens_seen
    assert len(native_policy.kept) == len(ref_policy.kept) and (name == "full" or ref_policy.kept)
    by_update = lambda kept: sorted(kept, key=lambda k: (k[1], k[0]))  # noqa: E731  (a chunk updates layer by layer)
    for (layer, seen, kept), (ref_layer, ref_seen, ref_kept) in zip(by_update(native_policy.kept),
                                                                    by_update(ref_policy.kept)):
        assert (layer, seen) == (ref_layer, ref_seen)
        assert torch.equal(kept, ref_kept)
    if name in ("h2o", "namm-random", "snapkv"):
        assert max(ref.cache_tokens_per_layer) < ref.tokens_seen, "the policy really evicted"


def test_left_padded_batch_matches_single_runs(model):
    prompts = [random_prompt(n, seed=n) for n in (150, 70, 201)]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out, memory = native_generate(model, ids, namm.make_policy("h2o", budget=0.3, n_up=32), 30, 64,
                                  attention_mask=mask)
    counts = memory.token_counts()
    for i, prompt in enumerate(prompts):
        alone = namm.generate(model, None, prompt, policy=namm.make_policy("h2o", budget=0.3, n_up=32),
                              max_new_tokens=30)
        assert out[i, width:].tolist() == alone.token_ids
        assert counts[:, i].tolist() == alone.cache_tokens_per_layer


def test_text_generation_pipeline(model):
    tokenizer = byte_tokenizer()
    text = "The memory of a model is its cache. " * 8
    ref = namm.generate(model, tokenizer, text, policy=namm.make_policy("h2o", budget=0.5, n_up=64),
                        max_new_tokens=12)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    memory = namm.cache(model, namm.make_policy("h2o", budget=0.5, n_up=64))
    result = pipe(text, **{cache_argument(model): memory}, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                  prefill_chunk_size=128, return_tensors=True)
    assert result[0]["generated_token_ids"][-12:] == ref.token_ids
    assert memory.token_counts()[:, 0].tolist() == ref.cache_tokens_per_layer


def test_other_caches_still_run_plain_sdpa(model):
    prompt = random_prompt(80)[None]
    with torch.inference_mode():
        before = model.generate(prompt, max_new_tokens=8, do_sample=False)
        namm.cache(model, "h2o")  # switches the model to namm's attention
        after = model.generate(prompt, max_new_tokens=8, do_sample=False, **{cache_argument(model): DynamicCache()})
    assert torch.equal(before, after)


def test_chat_messages_are_prompts(model):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a cache?"}]
    rendered = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False).input_ids
    chat = namm.generate(model, tokenizer, messages, max_new_tokens=6)
    assert chat.prompt_tokens == len(rendered)
    assert chat.token_ids == namm.generate(model, tokenizer, rendered, max_new_tokens=6).token_ids
    batch = namm.generate(model, tokenizer, [messages, messages[1:]], max_new_tokens=6)
    assert batch[0].token_ids == chat.token_ids and len(batch) == 2
    with pytest.raises(ValueError, match="chat template"):
        namm.generate(model, byte_tokenizer(), messages, max_new_tokens=2)


def test_generate_command_takes_chat(tmp_path, capsys):
    import json

    from namm.cli import main
    from test_evolve_helpers import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is a cache?")
    assert main(["generate", "--model", str(model_dir), "--prompt-file", str(prompt), "--chat",
                 "--max-new-tokens", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == len("<user>What is a cache?\n<assistant>")


@pytest.mark.parametrize("name", ["full", "h2o"])
def test_a_deep_copied_cache_continues_on_its_own(model, name):
    """transformers' prompt-reuse idiom: prefill a prefix once, then generate from deep copies of
    that cache; each copy is a cache of its own, and the prefilled one is left as it was."""
    prefix, rest = random_prompt(150, seed=1), random_prompt(40, seed=2)
    memory = namm.cache(model, POLICIES[name]())
    with torch.inference_mode():
        model(prefix[None], **{cache_argument(model): memory}, use_cache=True)
    columns, kept = memory.get_seq_length(), memory.token_counts().clone()
    ids = torch.cat([prefix, rest])[None]
    outputs = []
    for _ in range(2):
        twin = copy.deepcopy(memory)
        assert all(layer.cache is twin for layer in twin.layers)
        with torch.inference_mode():
            out = model.generate(ids, **{cache_argument(model): twin}, max_new_tokens=8, min_new_tokens=8,
                                 do_sample=False)
        outputs.append(out[0, ids.shape[1]:].tolist())
        assert twin.get_seq_length() > columns
    assert outputs[0] == outputs[1]
    assert memory.get_seq_length() == columns and torch.equal(memory.token_counts(), kept)
    if name == "full":
        scratch, _ = native_generate(model, ids, POLICIES[name](), 8, None)
        assert outputs[0] == scratch[0, ids.shape[1]:].tolist()
