"""One prefill serving every prompt-end policy (``generate_shared``, ``evaluate_shared`` and
``namm compare``): the same answers, memory and update history as each policy run alone."""

from __future__ import annotations

import json

import pytest

import namm
from namm.cli import main
from namm.memory.cache import MemoryCache
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.memory.generation import generate_shared, widest_query_window
from namm.policies.registry import make_policy
from benchmark_modules import load_benchmark
from test_evolve_helpers import save_tiny_model
from tiny_models import random_prompt, tiny_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAMM_CACHE", str(tmp_path / "cache"))


def prompt_end_policies():
    """Policies reading all buffered queries (h2o), the last one (tova), a window (snapkv), none
    (recency, l2, random), a NAMM in budget and threshold mode, and the full cache."""
    made = [make_policy(name, budget=budget, schedule="prompt-end")
            for name in ("h2o", "tova", "snapkv", "recency", "l2", "random") for budget in (0.25, 0.5)]
    return made + [make_policy("namm", checkpoint="smollm2-135m", budget=0.3, schedule="prompt-end"),
                   make_policy("namm", checkpoint="qwen2.5-coder-0.5b", schedule="prompt-end"), make_policy("full")]


def summary(output):
    return (output.token_ids, output.cache_tokens_per_layer, output.kv_bytes, output.kv_bytes_peak,
            [(h.row, h.tokens_seen, h.tokens_per_layer, h.kv_bytes, h.kv_bytes_full) for h in output.history])


@pytest.mark.parametrize("kind", ["llama-gqa", "gemma3"])
@pytest.mark.parametrize("agnostic", [False, True])
def test_shared_prefill_gives_every_policy_what_it_gets_alone(kind, agnostic):
    model = tiny_model(kind)
    prompts = [random_prompt(n, seed=n) for n in (300, 257, 411)]  # unequal: padded steps
    questions = [random_prompt(n, seed=n) for n in (9, 5, 12)] if agnostic else None
    shared = generate_shared(model, None, prompts, prompt_end_policies(), max_new_tokens=6, record_history=True,
                             question=questions)
    for policy, outputs in zip(prompt_end_policies(), shared):
        alone = namm.generate(model, None, prompts, policy=policy, max_new_tokens=6, record_history=True,
                              question=questions)
        assert [summary(o) for o in outputs] == [summary(o) for o in alone], policy.name
        assert all(o.history for o in outputs) == policy.evicts, policy.name
        if policy.evicts and policy.budget is not None:  # the threshold-mode NAMM may keep everything here
            assert all(o.kv_bytes < o.kv_bytes_full for o in outputs), policy.name


def test_shared_prefill_refuses_policies_that_compress_during_it():
    model = tiny_model("llama-gqa")
    with pytest.raises(ValueError, match="h2o compresses during the prefill"):
        generate_shared(model, None, random_prompt(200), [make_policy("h2o", budget=0.5)], max_new_tokens=2)


def test_a_fork_needs_the_queries_its_policy_reads():
    cache = MemoryCache(make_policy("full"), num_layers=3, batch_size=1)
    cache.query_window = 1  # buffered the last query only
    tova, h2o = (make_policy(name, budget=0.5, schedule="prompt-end") for name in ("tova", "h2o"))
    cache.fork(tova)
    with pytest.raises(ValueError, match="buffered 1 queries per layer; the policy reads None"):
        cache.fork(h2o)
    assert widest_query_window([tova, h2o]) is None
    assert widest_query_window([tova, make_policy("recency", budget=0.5)]) == 1


def test_compare_shares_the_prefill_and_keeps_every_answer(tmp_path):
    model_dir = str(save_tiny_model(tmp_path / "tiny"))
    common = ["--model", model_dir, "--budgets", "0.3", "--tasks", "passkey", "--length", "500", "--batch-size", "2",
              "--schedule", "prompt-end", "--quiet"]
    shared_out = str(tmp_path / "shared")
    assert main(["compare", "--policies", "h2o", "--samples", "2", "--out", shared_out, *common]) == 0  # resumed below
    assert main(["compare", "--policies", "h2o,full,tova,recency", "--samples", "3", "--out", shared_out,
                 *common]) == 0
    sharing = {"h2o": [None, None, 4], "full": [3, 3, 4], "tova": [3, 3, 4], "recency": [3, 3, 4]}  # h2o had batch 1
    for name in sharing:
        assert main(["compare", "--policies", name, "--samples", "3", "--out", str(tmp_path / name), *common]) == 0
        run = "runs/passkey/full" if name == "full" else f"runs/passkey/{name}-0.3-prompt-end"
        shared = [json.loads(line) for line in (tmp_path / "shared" / run / "predictions.jsonl").open()]
        alone = [json.loads(line) for line in (tmp_path / name / run / "predictions.jsonl").open()]
        keys = ("id", "prediction", "score", "kv_fraction", "cache_tokens_per_layer", "kv_bytes_peak")
        assert [{k: r[k] for k in keys} for r in shared] == [{k: r[k] for k in keys} for r in alone]
        assert [r.get("prefill_shared_by") for r in shared] == sharing[name]
        assert all("prefill_shared_by" not in r for r in alone)


def test_benchmark_times_both_ways_and_checks_the_answers(tmp_path, capsys):
    bench = load_benchmark("shared_prefill")
    model_dir = str(save_tiny_model(tmp_path / "tiny"))
    out = tmp_path / "bench.json"
    assert bench.main(["--model", model_dir, "--task", "passkey", "--length", "400", "--samples", "2",
                       "--policies", "h2o,tova", "--budgets", "0.3", "--query-agnostic", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["runs"] == 2 and figures["same_answers_and_memory"] is True and figures["shared_s"] > 0
    assert "faster; same answers and memory: True" in capsys.readouterr().out


def test_a_compressed_cache_cannot_be_forked():
    model = tiny_model("llama-gqa")
    runner = MemoryRunner(model, make_policy("recency", budget=0.5, n_up=64), 1)
    with memory_attention_enabled(model):
        runner.feed([random_prompt(100)])  # one progressive update at 64 tokens
    with pytest.raises(ValueError, match="never compressed can be forked"):
        runner.cache.fork(make_policy("tova", budget=0.5, schedule="prompt-end"))
