"""Offline corpus, synthetic generators and dataset loaders (byte-level tokenizer, fixture files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.byte_tokenizer import byte_tokenizer
from namm.tasks import get_task, task_names
from namm.tasks.corpus import all_paragraphs, corpus_tokens, paragraphs, split_of
from namm.tasks.longbench import read_jsonl, samples_from_jsonl, truncate_middle
from namm.tasks.synthetic import SYNTHETIC_TASKS, count_tokens

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_corpus_splits_never_overlap_and_are_english():
    train, held = set(paragraphs("train")), set(paragraphs("heldout"))
    assert train and held and not train & held
    assert len(train) + len(held) == len(set(all_paragraphs()))
    assert all(split_of(p) == "heldout" for p in held)
    words = " ".join(list(held)[:50]).split()
    assert sum(w.lower() in {"the", "of", "a", "is", "to"} for w in words) > len(words) / 20


def test_corpus_tokens_exact_and_deterministic(tok):
    a = corpus_tokens(tok, 3000, "train", seed=1)
    assert a.shape == (3000,) and a.dtype.is_floating_point is False
    assert a.equal(corpus_tokens(tok, 3000, "train", seed=1))
    assert not a.equal(corpus_tokens(tok, 3000, "train", seed=2))
    assert not a.equal(corpus_tokens(tok, 3000, "heldout", seed=1))
    with pytest.raises(ValueError, match="unknown corpus split"):
        corpus_tokens(tok, 10, "test")
    with pytest.raises(ValueError, match="holds only"):
        corpus_tokens(tok, 10**9, "heldout")


@pytest.mark.parametrize("task", SYNTHETIC_TASKS, ids=lambda t: t.name)
@pytest.mark.parametrize("length", [1024, 2048])
def test_synthetic_length_determinism_and_answers(tok, task, length):
    samples = task.samples(tok, length, 2, seed=3)
    for s in samples:
        got = count_tokens(tok, s.prompt)
        assert abs(got - length) <= 0.02 * length, (s.id, got)
        assert s.length == got and s.answers and s.max_new_tokens > 0
        if task.metric == "retrieval":
            assert s.answers[0].startswith("Paragraph ")
        elif task.name not in ("common_words", "frequent_words"):
            assert all(a in s.prompt for a in s.answers)  # the answer is really in the context
    again = task.samples(tok, length, 2, seed=3)
    assert [s.prompt for s in again] == [s.prompt for s in samples]
    other = task.samples(tok, length, 2, seed=4)
    assert other[0].prompt != samples[0].prompt
    assert samples[0].prompt != samples[1].prompt


def test_common_and_frequent_words_answers_are_right(tok):
    s = get_task("common_words").samples(tok, 2048, 1)[0]
    body = s.prompt.split("\n")[1:-1]
    words = [line.split(". ", 1)[1] for line in body if ". " in line]
    ranked = sorted(set(words), key=words.count, reverse=True)
    assert set(ranked[:10]) == set(s.answers)
    assert words.count(s.answers[0]) > max(words.count(w) for w in ranked[10:])
    f = get_task("frequent_words").samples(tok, 2048, 1)[0]
    text = f.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
    assert sorted(set(text), key=lambda w: (-text.count(w), text.index(w)))[:3] == f.answers


def test_task_registry():
    names = task_names()
    assert {"passkey", "niah_multikey", "variable_tracking", "kv_retrieval", "multidoc_qa", "passage_retrieval",
            "longbench/narrativeqa", "longbench/repobench-p", "infinitebench/kv_retrieval",
            "choubun/corp_sec_sum"} <= set(names)
    assert sum(n.startswith("longbench/") for n in names) == 21
    with pytest.raises(ValueError, match="unknown task 'nope'; choose one of"):
        get_task("nope")
    with pytest.raises(ValueError, match="too short"):
        get_task("niah_multikey").samples(byte_tokenizer(), 100, 1)


def test_longbench_jsonl_template_and_truncation(tok):
    samples = samples_from_jsonl(FIXTURES / "longbench_sample.jsonl", "qa_f1", tok, max_length=1000)
    assert len(samples) == 3 and samples[1].answers == ["thirty years", "30 years"]
    s = samples[0]
    assert s.prompt.startswith("Answer the question based on the given passages.")  # hotpotqa template
    assert s.prompt.endswith("Question: Who kept the lighthouse?\nAnswer:")  # the end survives truncation
    assert s.length <= 1000 and s.max_new_tokens == 32 and s.metric == "qa_f1"
    assert truncate_middle(tok, "abcdefghij", 4) == "abij"
    assert truncate_middle(tok, "short", 10) == "short"
    generic = samples_from_jsonl(FIXTURES / "longbench_sample.jsonl", "qa_f1", tok, 5000, n=1, template="narrativeqa")
    assert len(generic) == 1 and generic[0].prompt.startswith("You are given a story")


def test_jsonl_errors_name_the_line(tok):
    with pytest.raises(ValueError, match=r"line 3 is not valid JSON"):
        samples_from_jsonl(FIXTURES / "longbench_malformed.jsonl", "qa_f1", tok, 1000)
    with pytest.raises(ValueError, match=r"line 2 lacks field\(s\) answers"):
        read_jsonl(FIXTURES / "longbench_missing_field.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_jsonl(FIXTURES / "absent.jsonl")
    with pytest.raises(ValueError, match="unknown metric"):
        samples_from_jsonl(FIXTURES / "longbench_sample.jsonl", "bleu", tok, 1000)
    with pytest.raises(ValueError, match="unknown LongBench template"):
        samples_from_jsonl(FIXTURES / "longbench_sample.jsonl", "qa_f1", tok, 1000, template="nope")


def test_dataset_tasks_from_local_files(tok, monkeypatch):
    monkeypatch.setenv("NAMM_DATA_DIR", str(FIXTURES / "data"))
    trec = get_task("longbench/trec").samples(tok, 4000, 5)
    assert len(trec) == 2 and trec[0].first_line and trec[0].all_classes == ["City", "Individual", "Country", "Date"]
    assert trec[0].prompt.startswith("Please determine the type of the question below.")
    pk = get_task("infinitebench/passkey").samples(tok, 600, 1)[0]
    assert pk.metric == "first_integer" and pk.length <= 600 and pk.prompt.endswith("The pass key is")
    choice = get_task("infinitebench/longbook_choice_eng").samples(tok, 4000, 1)[0]
    assert choice.answers == ["B. garden"] and "\nB. garden\n" in choice.prompt
    monkeypatch.setenv("NAMM_DATA_DIR", str(FIXTURES / "nowhere"))
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(FileNotFoundError, match="put a JSONL file at"):
            get_task("longbench/qasper").samples(tok, 1000, 1)


def test_choubun_from_local_file(tok, monkeypatch):
    pytest.importorskip("fugashi", reason="the japanese extra (fugashi + unidic-lite) is not installed")
    monkeypatch.setenv("NAMM_DATA_DIR", str(FIXTURES / "data"))
    s = get_task("choubun/wiki_qa").samples(tok, 800, 1)[0]
    assert s.metric == "qa_f1_ja" and s.length <= 800 * 1.02 and s.prompt.endswith("質問：日本の首都はどこですか？\n回答：")
