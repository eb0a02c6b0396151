"""Compression schedules (progressive, prompt-end) and budgets as memory budgets, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

import namm
from fixtures.byte_tokenizer import byte_tokenizer
from namm.cli import main
from namm.eval.perplexity import evaluate_perplexity
from namm.eval.runner import policy_label
from namm.policies.base import SCHEDULES, LayerView, MemoryPolicy
from tiny_models import random_prompt, tiny_model
from wrapped_policy import RecordingPolicy

BUDGETED = ["recency", "streaming", "h2o", "l2", "snapkv", "tova", "pyramidkv", "random", "namm"]
PROMPT_END_BY_DEFAULT = {"snapkv", "pyramidkv"}


@pytest.fixture(scope="module", params=["llama-gqa", "gemma3"])
def model(request):
    return tiny_model(request.param)


class Probe(RecordingPolicy):
    """Runs ``inner`` on its own schedule and keeps the view of every layer at every update."""

    def __init__(self, inner: MemoryPolicy):
        super().__init__(inner)
        self.views: list[LayerView] = []

    def record(self, view: LayerView, keep: torch.Tensor) -> None:
        self.views.append(view)


@pytest.mark.parametrize("name, options", [
    ("snapkv", {}),
    ("pyramidkv", {}),
    ("tova", {"schedule": "prompt-end"}),
    ("h2o", {"schedule": "prompt-end"}),  # query window None: every prompt query votes
    ("namm", {"schedule": "prompt-end", "checkpoint": "zeros", "budget": 0.5, "n_up": 64}),  # 64 queries
])
def test_prompt_end_compresses_once_after_the_prompt(model, name, options):
    options = {"budget": 0.25, **options}
    lengths = (260, 171)
    prompts = [random_prompt(n, seed=n) for n in lengths]
    probe = Probe(namm.make_policy(name, **options))
    assert probe.schedule == "prompt-end"
    outs = namm.generate(model, None, prompts, policy=probe, max_new_tokens=12, chunk_size=50, record_history=True)
    layers = model.config.num_hidden_layers
    assert len(probe.views) == layers, "one update of every layer, for all rows at once"
    window = probe.query_window
    for view in probe.views:
        assert view.tokens_seen.tolist() == list(lengths)
        for b, n in enumerate(lengths):
            seen = view.query_positions[b][view.query_positions[b] >= 0]
            first = 0 if window is None else n - window
            assert seen.tolist() == list(range(first, n)), "the observation window is the prompt's last tokens"
    for out, n, prompt in zip(outs, lengths, prompts):
        assert [h.tokens_seen for h in out.history] == [n], "compressed exactly once, right after the prompt"
        record = out.history[0]
        assert record.kv_bytes <= options["budget"] * record.kv_bytes_full
        appended = len(out.token_ids) - 1  # decoding only appends (the last token is never fed)
        assert out.cache_tokens_per_layer == [k + appended for k in record.tokens_per_layer]
        alone = namm.generate(model, None, prompt, policy=namm.make_policy(name, **options), max_new_tokens=12)
        assert out.token_ids == alone.token_ids and out.cache_tokens_per_layer == alone.cache_tokens_per_layer


def test_progressive_schedule_updates_every_n_up_tokens(model):
    policy = namm.make_policy("snapkv", budget=0.25, n_up=32, schedule="progressive")
    out = namm.generate(model, None, random_prompt(100), policy=policy, max_new_tokens=61, record_history=True)
    assert [h.tokens_seen for h in out.history] == [32, 64, 96, 128, 160], "prompt and generation alike"


def test_default_schedules_and_validation():
    for name in namm.policy_names():
        policy = namm.make_policy(name)
        assert policy.schedule == ("prompt-end" if name in PROMPT_END_BY_DEFAULT else "progressive"), name
        for schedule in SCHEDULES:
            assert namm.make_policy(name, schedule=schedule).schedule == schedule
    with pytest.raises(ValueError, match="unknown schedule 'sometimes'"):
        namm.make_policy("h2o", budget=0.5, schedule="sometimes")
    with pytest.raises(ValueError, match="unknown schedule"):
        namm.make_policy("snapkv").schedule = "never"
    assert namm.make_policy("snapkv", budget=0.5, less="smollm2-135m-h2o").schedule == "prompt-end"
    assert namm.make_policy("snapkv", less="smollm2-135m-h2o", schedule="progressive").schedule == "progressive"


def test_schedule_is_recorded_and_perplexity_refuses_prompt_end():
    assert policy_label(namm.make_policy("snapkv", budget=0.5))["schedule"] == "prompt-end"
    assert policy_label(namm.make_policy("h2o", budget=0.5))["schedule"] == "progressive"
    assert "schedule" not in policy_label(namm.make_policy("full"))
    with pytest.raises(ValueError, match="no prompt end"):
        evaluate_perplexity(None, torch.arange(10), namm.make_policy("snapkv", budget=0.5))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("budget", [0.25, 0.75, 48])
@pytest.mark.parametrize("name", BUDGETED)
def test_budget_bounds_kv_bytes_after_every_compression(model, name, budget, schedule):
    options = {"checkpoint": "zeros"} if name == "namm" else {}
    policy = namm.make_policy(name, budget=budget, n_up=32, schedule=schedule, **options)
    outs = namm.generate(model, None, [random_prompt(300), random_prompt(217, seed=1)], policy=policy,
                         max_new_tokens=40, record_history=True)
    for out in outs:
        assert out.history
        for h in out.history:
            share = budget if isinstance(budget, float) else min(1.0, budget / h.tokens_seen)
            assert h.kv_bytes <= share * h.kv_bytes_full, (h.tokens_seen, h.kv_bytes / h.kv_bytes_full)
            assert sum(h.tokens_per_layer) <= share * h.tokens_seen * len(h.tokens_per_layer)


def test_l2_whole_layers_come_out_of_the_budget():
    model = tiny_model("llama-gqa")
    out = namm.generate(model, None, random_prompt(300), policy=namm.make_policy("l2", budget=0.75, n_up=100),
                        max_new_tokens=1, record_history=True)
    for h in out.history:
        first, *rest = h.tokens_per_layer
        assert first == h.tokens_seen, "the first layer stays whole"
        assert max(rest) < 0.75 * h.tokens_seen, "so the others keep less than the budget"
        assert h.kv_bytes <= 0.75 * h.kv_bytes_full
    out = namm.generate(model, None, random_prompt(300), policy=namm.make_policy("l2", budget=0.25, n_up=100),
                        max_new_tokens=1, record_history=True)
    assert all(max(h.tokens_per_layer) <= 0.25 * h.tokens_seen for h in out.history), "no room for a whole layer"


def test_pyramidkv_layer_sizes_decrease_within_the_budget():
    model = tiny_model("llama-gqa")
    out = namm.generate(model, None, random_prompt(300), policy=namm.make_policy("pyramidkv", budget=0.5),
                        max_new_tokens=1, record_history=True)
    (record,) = out.history
    sizes = record.tokens_per_layer
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 150 > sizes[-1]
    assert sum(sizes) <= 0.5 * 300 * len(sizes)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
@pytest.mark.parametrize("options", [{"kernel": 4}, {"kernel": 0}, {"window": 0}])
def test_observation_window_policies_reject_impossible_pooling(name, options):
    with pytest.raises(ValueError, match="odd number"):
        namm.make_policy(name, **options)


def test_pyramidkv_rejects_a_top_layer_larger_than_the_mean():
    with pytest.raises(ValueError, match="beta"):
        namm.make_policy("pyramidkv", beta=0.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama-gqa").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def generate_json(capsys, model_dir, prompt_file, *argv: str) -> dict:
    code = main(["generate", "--model", model_dir, "--prompt-file", str(prompt_file), "--max-new-tokens", "5",
                 "--json", *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_cli_generate_schedule(capsys, tmp_path, model_dir):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("The memory keeps what the model needs and forgets the rest. " * 5)
    end = generate_json(capsys, model_dir, prompt_file, "--policy", "h2o", "--budget", "0.25", "--schedule", "prompt-end")
    assert end["schedule"] == "prompt-end"
    assert end["cache_tokens_per_layer"] == [end["prompt_tokens"] // 4 + 4] * 3  # compressed once, then 4 appended
    progressive = generate_json(capsys, model_dir, prompt_file, "--policy", "snapkv", "--budget", "0.25",
                                "--n-up", "32", "--schedule", "progressive")
    assert progressive["schedule"] == "progressive"
    assert generate_json(capsys, model_dir, prompt_file, "--policy", "snapkv", "--budget", "0.25")["schedule"] == "prompt-end"
    with pytest.raises(SystemExit):
        main(["generate", "--model", model_dir, "--prompt-file", str(prompt_file), "--schedule", "sometimes"])
