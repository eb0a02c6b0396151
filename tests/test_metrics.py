"""Every metric against values computed by hand on fixed examples."""

from __future__ import annotations

import pytest

from namm.tasks.base import Sample
from namm.tasks.metrics import get_metric, jieba_tokens, mecab_tokens, score_prediction, score_sample


def m(name: str, prediction: str, answer, **kw) -> float:
    return score_prediction(name, prediction, answer if isinstance(answer, list) else [answer], **kw)


def test_qa_f1_hand_computed():
    # normalised: "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1, F1 = 6/7
    assert m("qa_f1", "The cat sat on the mat!", "a cat on a mat") == pytest.approx(6 / 7)
    assert m("qa_f1", "dog", "cat") == 0.0
    assert m("qa_f1", "cat", ["dog", "cat"]) == 1.0  # best reference wins


def test_qa_f1_zh_hand_computed():
    assert jieba_tokens("北京是中国的首都") == ["北京", "是", "中国", "的", "首都"]
    # 1 common word of 5 predicted and 1 reference: P = 1/5, R = 1, F1 = 1/3
    assert m("qa_f1_zh", "北京是中国的首都。", "北京") == pytest.approx(1 / 3)


def test_rouge_l_hand_computed():
    # LCS 6 of 7 predicted / 6 reference tokens: F = 2 (6/7)(1) / (6/7 + 1) = 12/13
    assert m("rouge", "The cat was found under the bed", "the cat was under the bed") == pytest.approx(12 / 13)
    assert m("rouge", "", "anything") == 0.0


def test_rouge_zh_hand_computed():
    assert jieba_tokens("我爱北京") == ["我", "爱", "北京"]
    # LCS 2 of 3 and 3: F = 2/3
    assert m("rouge_zh", "我爱北京", "我爱上海") == pytest.approx(2 / 3)


def test_classification_rules():
    classes = ["city", "capital city", "country"]
    assert m("classification", "capital city", "capital city", all_classes=classes) == 1.0  # 'city' is dropped
    assert m("classification", "country or city", "city", all_classes=classes) == 0.5
    assert m("classification", "country", "city", all_classes=classes) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        m("classification", "city", "city")


def test_retrieval_count_and_code():
    assert m("retrieval", "Paragraph 3", "Paragraph 3") == 1.0
    assert m("retrieval", "Paragraph 3 or Paragraph 13", "Paragraph 3") == 0.5
    assert m("retrieval_zh", "段落5", "段落5") == 1.0
    assert m("count", "There are 7 paragraphs, not 8", "7") == 0.5
    assert m("count", "none", "7") == 0.0
    assert m("code_sim", "```python\n    return x + 1\n", "    return x + 1") == 1.0
    assert m("code_sim", "abcd", "abce") == pytest.approx(0.75)  # indel distance 2 over 8 characters


def test_ruler_string_match():
    assert m("string_match_all", "The numbers are 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert m("string_match_part", "the numbers are 123 and 456", ["789", "456"]) == 1.0
    assert m("string_match_part", "nothing", ["789"]) == 0.0
    assert m("string_match_all", "Alpha BETA", ["alpha", "beta"]) == 1.0  # case-insensitive


def test_infinitebench_metrics():
    assert m("first_integer", " 12345 is the key", "12345") == 1.0
    assert m("first_integer", "key 1234 5", "12345") == 0.0
    assert m("word_match", '"abc-123".', "abc-123") == 1.0
    assert m("first_number", "The answer is 3.5 or 4", "3.5") == 1.0
    assert m("last_integer", "the value is: 42.", "42") == 1.0
    assert m("last_integer", "no idea", "42") == 0.0
    assert m("choice", "B. Paris", "B. Paris") == 1.0
    assert m("choice", "C", "B. Paris") == 0.0
    assert m("choice", "I think the answer is B", "B. Paris") == 1.0
    assert m("choice", "Paris, of course", "B. Paris") == 1.0
    assert m("substring", "I guess it is JOHN", "John") == 1.0
    assert m("sequence_accuracy", "[1, 4, 9, 3]", "[1, 4, 8, 3]") == 0.5


def test_choubun_metrics_over_mecab_words():
    pytest.importorskip("fugashi", reason="the japanese extra (fugashi + unidic-lite) is not installed")
    assert mecab_tokens("東京は日本の首都です。") == ["東京", "は", "日本", "の", "首都", "です", "。"]
    # punctuation dropped: 6 predicted words, 3 reference words, all 3 shared: P = 1/2, R = 1
    assert m("qa_f1_ja", "東京は日本の首都です。", "日本の首都") == pytest.approx(2 / 3)
    assert m("rouge_ja", "東京は日本の首都です。", "日本の首都") == pytest.approx(2 / 3)


def test_first_line_rule_and_sample_scoring():
    s = Sample(id="x", prompt="p", answers=["Location"], max_new_tokens=4, metric="classification",
               all_classes=["Location", "Person"], first_line=True)
    assert score_sample(s, "\n\nLocation\nPerson") == 1.0
    s.first_line = False
    assert score_sample(s, "\n\nLocation\nPerson") == 0.5


def test_unknown_metric_and_empty_answers():
    with pytest.raises(ValueError, match="unknown metric 'bleu'; choose one of"):
        get_metric("bleu")
    with pytest.raises(ValueError, match="at least one reference"):
        score_prediction("qa_f1", "x", [])
