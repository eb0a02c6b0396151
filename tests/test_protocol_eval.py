"""The query-agnostic protocol, bootstrap intervals, equal-memory comparisons and evaluation fixes
(issue 12, parts 2, 4 and 6), on tiny models and the byte tokenizer."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest

import namm
from fixtures.byte_tokenizer import byte_tokenizer
from namm.cli import main
from namm.commands.common import show_progress
from namm.commands.compare import accepts
from namm.eval.perplexity import evaluate_perplexity
from namm.eval.intervals import bootstrap_interval, format_difference, paired_difference
from namm.eval.runner import evaluate
from namm.tasks import Sample, get_task
from namm.tasks.corpus import corpus_tokens
from namm.tasks.longbench import samples_from_jsonl
from test_evolve_helpers import save_tiny_model
from test_schedules import Probe
from tiny_models import random_prompt, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
LONGBENCH = str(FIXTURES / "longbench_sample.jsonl")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep reference scores and the corpus cache of these tests out of the user's cache."""
    monkeypatch.setenv("NAMM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module", params=["llama-gqa", "gemma3"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


# ---------------------------------------------------------------- the query-agnostic protocol

CONTEXTS, QUESTIONS = (230, 171), (40, 25)  # row 0's question crosses 256, row 1's crosses 192


@pytest.mark.parametrize("name, options", [
    ("snapkv", {}),
    ("pyramidkv", {}),
    ("h2o", {"n_up": 64}),
    ("tova", {"n_up": 64}),
    ("streaming", {"n_up": 64}),
    ("namm", {"checkpoint": "zeros", "budget": 0.5, "n_up": 64}),
])
def test_compression_never_sees_the_question(model, name, options):
    probe = Probe(namm.make_policy(name, **{"budget": 0.25, **options}))
    contexts = [random_prompt(n, seed=n) for n in CONTEXTS]
    questions = [random_prompt(n, seed=100 + n) for n in QUESTIONS]
    outs = namm.generate(model, None, contexts, question=questions, policy=probe, max_new_tokens=12,
                         record_history=True)
    assert probe.views
    for view in probe.views:
        for row, b in enumerate(view.rows.tolist()):
            assert int(view.positions[row].max()) < CONTEXTS[b], "no question token is in the cache at an update"
            if view.query_positions is not None:
                assert int(view.query_positions[row].max()) < CONTEXTS[b], "no question query is seen"
    for out, n, q in zip(outs, CONTEXTS, QUESTIONS):
        seen = [h.tokens_seen for h in out.history]
        assert seen[-1] == n, "compressed once at the end of the context, by every policy"
        expected = [n] if probe.schedule == "prompt-end" else [*range(64, n, 64), n]
        assert seen == expected, "progressive updates run during the context, none during the question"
        assert out.prompt_tokens == n + q and out.tokens_seen == n + q + 11


def test_decoding_continues_on_the_policy_schedule():
    model = tiny_model("llama-gqa")
    out = namm.generate(model, None, random_prompt(230), question=random_prompt(40, seed=1), record_history=True,
                        policy=namm.make_policy("h2o", budget=0.25, n_up=64), max_new_tokens=60)
    assert [h.tokens_seen for h in out.history] == [64, 128, 192, 230, 320]


@pytest.mark.parametrize("name", ["snapkv", "tova", "h2o"])
def test_answer_equals_one_prompt_compressed_at_the_same_point(model, name):
    context, question = random_prompt(200, seed=3), random_prompt(30, seed=4)
    agnostic = namm.generate(model, None, context, question=question, max_new_tokens=20, record_history=True,
                             policy=namm.make_policy(name, budget=0.25, schedule="prompt-end"))
    compress_at_200 = namm.make_policy(name, budget=0.25, n_up=200, schedule="progressive")
    one = namm.generate(model, None, context.tolist() + question.tolist(), max_new_tokens=20,
                        record_history=True, policy=compress_at_200)
    assert [h.tokens_seen for h in one.history] == [h.tokens_seen for h in agnostic.history] == [200]
    assert agnostic.token_ids == one.token_ids
    assert agnostic.cache_tokens_per_layer == one.cache_tokens_per_layer


def test_generate_question_errors():
    model = tiny_model("llama-gqa")
    with pytest.raises(ValueError, match="2 questions for 1 prompts"):
        namm.generate(model, None, [random_prompt(10)], question=[random_prompt(3), random_prompt(3)])
    with pytest.raises(ValueError, match="question 0 is empty"):
        namm.generate(model, None, random_prompt(10), question=[])
    with pytest.raises(ValueError, match="prompt 0 and its question have 4100 tokens"):
        namm.generate(model, None, random_prompt(4000), question=random_prompt(100))


def test_tasks_carry_context_and_question_apart():
    tok = byte_tokenizer()
    for name in ("passkey", "niah_single", "kv_retrieval", "multidoc_qa", "passage_retrieval", "common_words"):
        s = get_task(name).samples(tok, 1100, 1)[0]
        assert s.question and s.context + s.question == s.prompt
        assert "\n" in s.question and len(s.question) < 600, "the question is the final question / answer prefix"
    passkey = get_task("passkey").samples(tok, 1100, 1)[0]
    assert passkey.answers[0] in passkey.context and passkey.answers[0] not in passkey.question
    assert passkey.question == "\n\nWhat is the pass key? The pass key is"
    rows = samples_from_jsonl(LONGBENCH, "qa_f1", tok, max_length=1000)
    assert rows[0].question.endswith("Question: Who kept the lighthouse?\nAnswer:")
    assert "Mara Lind" in rows[0].context and rows[0].truncated
    with pytest.raises(ValueError, match="non-empty ending of the prompt"):
        Sample("x", "context. Question?", ["a"], 4, "qa_f1", question="Other?")


def test_evaluate_marks_the_protocol(tmp_path):
    model, tok = tiny_model("llama-gqa"), byte_tokenizer()
    samples = get_task("passkey").samples(tok, 600, 2)
    policy = lambda: namm.make_policy("snapkv", budget=0.5)  # noqa: E731
    aware = evaluate(model, tok, policy(), samples, out_dir=tmp_path / "a", progress=False)
    agnostic = evaluate(model, tok, policy(), samples, out_dir=tmp_path / "b", progress=False,
                        question_after_compression=True)
    assert aware["protocol"] == "query-aware" and agnostic["protocol"] == "query-agnostic"
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["protocol"] == "query-agnostic"
    with pytest.raises(ValueError, match="differs in: protocol"):
        evaluate(model, tok, policy(), samples, out_dir=tmp_path / "a", progress=False, question_after_compression=True)
    bare = [Sample("bare", "no question here", ["a"], 4, "qa_f1")]
    with pytest.raises(ValueError, match="carries no separate question"):
        evaluate(model, tok, policy(), bare, progress=False, question_after_compression=True)


# ---------------------------------------------------------------- intervals and equal memory

def test_bootstrap_interval_on_a_hand_made_example():
    # nine right, one wrong: a resample's mean is 1 - K/10 with K ~ Binomial(10, 0.1). P(K = 0) = 0.35
    # puts the 97.5th percentile at 100; P(K >= 3) = 0.070 and P(K >= 4) = 0.013 put the 2.5th at 70.
    scores = [100.0] * 9 + [0.0]
    assert bootstrap_interval([scores]) == pytest.approx((70.0, 100.0))
    assert bootstrap_interval([scores]) == bootstrap_interval([scores]), "fixed seed"
    assert bootstrap_interval([[42.0] * 5]) == (42.0, 42.0)
    assert bootstrap_interval([[100.0] * 4, [0.0] * 7]) == (50.0, 50.0), "each group resampled on its own"
    low, high = bootstrap_interval([[0.0, 100.0] * 10])
    assert 20 <= low < 50 < high <= 80  # about 50 ± 1.96 × 50 / sqrt(20)
    with pytest.raises(ValueError):
        bootstrap_interval([[]])


def test_paired_difference_is_paired():
    # the same scores: the difference is exactly 0 with a degenerate interval, however spread they are
    assert paired_difference([100.0, 0.0, 100.0], [100.0, 0.0, 100.0]) == (0.0, (0.0, 0.0))
    # better on every prompt by 100: the interval sits at +100
    assert paired_difference([100.0] * 4, [0.0] * 4) == (100.0, (100.0, 100.0))
    # one prompt in four flips: +25 on average, an interval that contains 0
    diff, (low, high) = paired_difference([100.0, 0.0, 0.0, 0.0], [0.0] * 4)
    assert diff == 25.0 and low == 0.0 and high > 25.0
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])
    assert format_difference(diff, (low, high)) == f"+25.0 [+0.0, +{high:.1f}]"
    assert format_difference(-15.625, (-34.375, 3.125)) == "-15.6 [-34.4, +3.1]"


def test_compare_match_cache_runs_baselines_at_the_matched_budget(model_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", model_dir, "--policies", "full,recency,l2", "--match-cache", "h2o",
            "--tasks", "passkey", "--length", "600", "--samples", "2", "--n-up", "128", "--out", str(out), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = {r["policy"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == ["full", "h2o", "recency", "l2"], "the full cache, then the matched policy"
    references = list((Path(os.environ["NAMM_CACHE"]) / "references").iterdir())
    assert len(references) == 1 and not (references[0] / "config.json").exists(), \
        "the full run is the reference: the full cache is not evaluated a second time for it"
    h2o = rows["h2o"]
    assert h2o["budget"] is None and h2o["kv_fraction"] == pytest.approx(0.25, abs=0.01)
    budget = f"{h2o['kv_fraction']:.4f}"
    for name in ("recency", "l2"):
        row = rows[name]
        assert row["budget"] == budget and row["matched_to"] == "h2o"
        config = json.loads((out / "runs" / "passkey" / f"{name}-{budget}" / "config.json").read_text())
        assert config["budget"] == budget and config["matched_to"] == "h2o"
        assert row["kv_fraction"] <= float(budget) + 1e-9, "every row at the same memory after compressions"
    assert rows["full"]["budget"] is None and rows["full"]["kv_fraction"] == 1.0
    table = (out / "results.md").read_text()
    assert f"| passkey | recency | {budget} (matched to h2o) | progressive | query-aware | 2 |" in table
    assert "| mean | recency | matched to h2o |" in table
    low, high = rows["recency"]["score_ci"]
    assert low <= rows["recency"]["score"] <= high
    assert main([*argv, "--budgets", "0.5"]) == 2
    assert "--match-cache measures the budgets" in capsys.readouterr().err


def test_compare_data_file_and_query_agnostic(model_dir, tmp_path, capsys):
    out = tmp_path / "lb"
    argv = ["compare", "--model", model_dir, "--policies", "full,snapkv", "--budgets", "0.5", "--data-file", LONGBENCH,
            "--metric", "qa_f1", "--length", "700", "--samples", "2", "--question-after-compression",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "longbench_sample: 2 of 2 prompts were longer than the length limit" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["task"], r["policy"], r["protocol"]) for r in rows] == [
        ("longbench_sample", "full", "query-agnostic"), ("longbench_sample", "snapkv", "query-agnostic")]
    assert all(r["prompts_cut"] == 2 and len(r["sample_scores"]) == 2 for r in rows)
    assert (out / "runs" / "longbench_sample" / "snapkv-0.5-query-agnostic" / "predictions.jsonl").is_file()
    assert "| longbench_sample | snapkv | 0.5 | prompt-end | query-agnostic | 2 |" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        main([*argv, "--tasks", "passkey"])


# ---------------------------------------------------------------- evaluation fixes

def test_template_format_strings():
    tok = byte_tokenizer()
    s = samples_from_jsonl(LONGBENCH, "qa_f1", tok, None, template="{context}\n\nQ: {input}\nA:", model_context=4096)[0]
    row = json.loads(Path(LONGBENCH).read_text().splitlines()[0])
    assert s.prompt == row["context"] + "\n\nQ: Who kept the lighthouse?\nA:" and not s.truncated
    assert s.question == "\n\nQ: Who kept the lighthouse?\nA:" and s.max_new_tokens == 64
    assert samples_from_jsonl(LONGBENCH, "qa_f1", tok, 5000, template="{input}: {context}")[0].question is None
    with pytest.raises(ValueError, match="has no {context} field"):
        samples_from_jsonl(LONGBENCH, "qa_f1", tok, 1000, template="{input} only")
    with pytest.raises(ValueError, match="unknown LongBench template 'nope'"):
        samples_from_jsonl(LONGBENCH, "qa_f1", tok, 1000, template="nope")
    with pytest.raises(ValueError, match="lacks|needs field 'title'"):
        samples_from_jsonl(LONGBENCH, "qa_f1", tok, 1000, template="{title}: {context}")


def test_cli_eval_template_and_default_length(model_dir, tmp_path, capsys):
    base = ["eval", "--model", model_dir, "--data-file", LONGBENCH, "--metric", "qa_f1", "--samples", "2", "--quiet"]
    # as typed in a shell: backslash-n, read as a newline
    assert main(base + ["--template", "{context}\\n\\n{input}", "--out", str(tmp_path / "t")]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["prompts_cut"] == 0 and metrics["length"] is None, "default: the model's context, nothing cut"
    lengths = [json.loads(line)["prompt_tokens"] for line in (tmp_path / "t" / "predictions.jsonl").open()]
    row = json.loads(Path(LONGBENCH).read_text().splitlines()[0])
    assert lengths[0] == len((row["context"] + "\n\n" + row["input"]).encode())
    assert main(base + ["--length", "700", "--out", str(tmp_path / "cut")]) == 0
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["prompts_cut"] == 2
    assert "2 of 2 prompts were longer than the length limit" in capsys.readouterr().out
    assert main(base + ["--template", "{input} only", "--out", str(tmp_path / "bad")]) == 2
    assert "has no {context} field" in capsys.readouterr().err
    assert main(["eval", "--model", model_dir, "--task", "passkey", "--template", "x", "--out", str(tmp_path)]) == 2
    assert "go with --data-file" in capsys.readouterr().err


def test_cli_perplexity_scores_n_sequences(model_dir, tmp_path):
    out = tmp_path / "ppl"
    argv = ["eval", "--model", model_dir, "--task", "perplexity", "--length", "200", "--samples", "3", "--policy",
            "recency", "--budget", "0.5", "--n-up", "64", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["tokens"] == 3 * 199 and len(metrics["sequences"]) == 3
    nlls = [s["nll"] for s in metrics["sequences"]]
    assert len(set(nlls)) == 3, "three different held-out sequences"
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(nlls) / 3))
    model, tok = tiny_model("llama-gqa"), byte_tokenizer()
    second = corpus_tokens(tok, 600, "heldout", 0)[200:400]
    alone = evaluate_perplexity(model, second, namm.make_policy("recency", budget=0.5, n_up=64))
    assert metrics["sequences"][1]["nll"] == pytest.approx(alone["nll"], rel=1e-5), "consecutive disjoint slices"


class FakeStderr:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty, quiet, shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_progress_bars_only_on_a_terminal(monkeypatch, tty, quiet, shown):
    monkeypatch.setattr("sys.stderr", FakeStderr(tty))
    assert show_progress(argparse.Namespace(quiet=quiet)) is shown


def test_compare_reads_options_off_the_policy_signatures():
    assert not accepts("full", "budget") and accepts("namm", "budget") and accepts("l2", "budget")
    assert accepts("h2o", "n_up") and not accepts("full", "n_up") and not accepts("tova", "checkpoint")
