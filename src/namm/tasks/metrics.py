"""Answer metrics of LongBench, RULER, InfiniteBench and ChouBun, each a value in [0, 1].

A metric is registered with one of two modes: ``max`` metrics score the prediction against each
reference answer and keep the best (LongBench, InfiniteBench, ChouBun); ``all`` metrics receive
the whole answer list at once (RULER's string matches). :func:`score_sample` applies the right
mode and LongBench's first-line rule.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from namm.tasks.base import Sample

_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_ALL_PUNCTUATION = set(string.punctuation + _ZH_PUNCTUATION + "・「」『』（）［］【】〈〉《》≪≫")


# ---------------------------------------------------------------- normalisation and tokenisation

def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, drop punctuation and English articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese variant: lower case, drop ASCII and CJK punctuation and all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION and not ch.isspace())


def jieba_tokens(text: str) -> list[str]:
    """Chinese words (jieba, precise mode)."""
    import jieba

    jieba.setLogLevel(60)
    return list(jieba.cut(text, cut_all=False))


@lru_cache(maxsize=1)
def _mecab():
    try:
        import fugashi
    except ImportError as err:
        raise ModuleNotFoundError("Japanese metrics need fugashi and unidic-lite: "
                                  "pip install 'namm[japanese]'") from err
    return fugashi.Tagger()


def mecab_tokens(text: str) -> list[str]:
    """Japanese words as MeCab (fugashi + unidic-lite) surface forms."""
    return [word.surface for word in _mecab()(text)]


def f1_tokens(prediction: list[str], reference: list[str]) -> float:
    """Bag-of-tokens F1 between two token lists."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


class _Whitespace:
    """A rouge-score tokenizer that keeps tokens as they are (already segmented text)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


@lru_cache(maxsize=2)
def _rouge_scorer(segmented: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Whitespace() if segmented else None)


def _rouge_l(prediction: str, reference: str, segmented: bool = False) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_rouge_scorer(segmented).score(reference, prediction)["rougeL"].fmeasure)


def _numbers_matching(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


# ---------------------------------------------------------------- LongBench

def qa_f1(prediction: str, answer: str, **_) -> float:
    """Token F1 after SQuAD normalisation."""
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(answer).split())


def qa_f1_zh(prediction: str, answer: str, **_) -> float:
    """Token F1 over jieba words after Chinese normalisation."""
    pred = [t for t in (normalize_zh_answer(w) for w in jieba_tokens(prediction)) if t]
    ref = [t for t in (normalize_zh_answer(w) for w in jieba_tokens(answer)) if t]
    return f1_tokens(pred, ref)


def rouge(prediction: str, answer: str, **_) -> float:
    """ROUGE-L F-measure (rouge-score, default English tokenizer)."""
    return _rouge_l(prediction, answer)


def rouge_zh(prediction: str, answer: str, **_) -> float:
    """ROUGE-L F-measure over jieba words."""
    return _rouge_l(" ".join(jieba_tokens(prediction)), " ".join(jieba_tokens(answer)), segmented=True)


def classification(prediction: str, answer: str, all_classes: list[str] | None = None, **_) -> float:
    """1/k if the right class is among the k class names found in the prediction (class names
    contained in the answer, other than the answer itself, do not count)."""
    if not all_classes:
        raise ValueError("the classification metric needs all_classes")
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in answer and c != answer)]
    return 1.0 / len(found) if answer in found else 0.0


def retrieval(prediction: str, answer: str, **_) -> float:
    """Share of the numbers in the prediction that equal the answer's 'Paragraph N'."""
    match = re.findall(r"Paragraph (\d+)", answer)
    return _numbers_matching(prediction, match[0]) if match else 0.0


def retrieval_zh(prediction: str, answer: str, **_) -> float:
    """Chinese variant of :func:`retrieval` ('段落N')."""
    match = re.findall(r"段落(\d+)", answer)
    return _numbers_matching(prediction, match[0]) if match else 0.0


def count(prediction: str, answer: str, **_) -> float:
    """Share of the numbers in the prediction that equal the answer."""
    return _numbers_matching(prediction, str(answer).strip())


def code_sim(prediction: str, answer: str, **_) -> float:
    """Edit similarity (rapidfuzz ratio / 100) of the first code line of the prediction (lines with
    back-quotes or comments skipped)."""
    from rapidfuzz import fuzz

    line = next((l for l in prediction.lstrip("\n").split("\n") if "`" not in l and "#" not in l and "//" not in l), "")
    return fuzz.ratio(line, answer) / 100


# ---------------------------------------------------------------- RULER

def string_match_all(prediction: str, answers: list[str], **_) -> float:
    """Share of the reference strings found in the prediction (case-insensitive)."""
    low = prediction.lower()
    return sum(a.lower() in low for a in answers) / len(answers) if answers else 0.0


def string_match_part(prediction: str, answers: list[str], **_) -> float:
    """1 if any reference string is found in the prediction (case-insensitive)."""
    low = prediction.lower()
    return float(any(a.lower() in low for a in answers))


# ---------------------------------------------------------------- InfiniteBench

def first_integer(prediction: str, answer: str, **_) -> float:
    """1 if the first run of digits in the prediction is the answer (passkey, number string)."""
    match = re.search(r"\d+", prediction)
    return float(match is not None and match.group(0) == str(answer).strip())


def word_match(prediction: str, answer: str, **_) -> float:
    """1 if the answer is one of the prediction's words after splitting on punctuation (kv retrieval)."""
    words = re.sub(r"[\n:\"'.,?!{}]", " ", prediction).split()
    return float(str(answer).strip() in words)


def first_number(prediction: str, answer: str, **_) -> float:
    """1 if the first number (integer or decimal) in the prediction equals the answer (math find)."""
    match = re.search(r"-?\d+\.\d+|-?\d+", prediction)
    if match is None:
        return 0.0
    try:
        return float(float(match.group(0)) == float(answer))
    except ValueError:
        return 0.0


def last_integer(prediction: str, answer: str, **_) -> float:
    """1 if the last word of the prediction, as an integer, equals the answer (code run)."""
    words = re.sub(r"[\n.`'\":]", " ", prediction.strip()).split()
    try:
        return float(bool(words) and int(words[-1]) == int(answer))
    except ValueError:
        return 0.0


def choice(prediction: str, answer: str, **_) -> float:
    """Multiple choice: the answer is 'X' or 'X. text'; the prediction names option letter X first
    (e.g. 'B', 'B.', '(B)', 'answer is B') or contains the option text."""
    letter, _, text = str(answer).partition(".")
    letter, text = letter.strip(), text.strip()
    pred = prediction.strip()
    head = re.match(r"^\(?([A-D])(?:[).:\s]|$)", pred)
    if head:
        return float(head.group(1) == letter)
    said = re.search(r"answer is:?\s*\(?([A-D])\b", pred, flags=re.IGNORECASE)
    if said:
        return float(said.group(1).upper() == letter)
    return float(bool(text) and text in pred)


def substring(prediction: str, answer: str, **_) -> float:
    """1 if the answer occurs in the prediction, ignoring case (dialogue QA)."""
    return float(str(answer).strip().lower() in prediction.lower())


def sequence_accuracy(prediction: str, answer: str, **_) -> float:
    """Share of leading numbers of the prediction that match the answer's sequence, stopping at
    the first mistake (math calc)."""
    ref = re.findall(r"-?\d+", str(answer))
    pred = re.findall(r"-?\d+", prediction)
    right = 0
    for p, r in zip(pred, ref):
        if p != r:
            break
        right += 1
    return right / len(ref) if ref else 0.0


# ---------------------------------------------------------------- ChouBun (Japanese)

def _ja_tokens(text: str) -> list[str]:
    return [t for t in (normalize_zh_answer(w) for w in mecab_tokens(text)) if t]


def qa_f1_ja(prediction: str, answer: str, **_) -> float:
    """Token F1 over MeCab words (punctuation and whitespace dropped, lower case)."""
    return f1_tokens(_ja_tokens(prediction), _ja_tokens(answer))


def rouge_ja(prediction: str, answer: str, **_) -> float:
    """ROUGE-L F-measure over MeCab words."""
    return _rouge_l(" ".join(_ja_tokens(prediction)), " ".join(_ja_tokens(answer)), segmented=True)


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class Metric:
    """A metric function and whether it takes one answer at a time (``max``) or all (``all``)."""

    fn: Callable[..., float]
    mode: str = "max"


METRICS: dict[str, Metric] = {
    "qa_f1": Metric(qa_f1), "qa_f1_zh": Metric(qa_f1_zh), "rouge": Metric(rouge), "rouge_zh": Metric(rouge_zh),
    "classification": Metric(classification), "retrieval": Metric(retrieval), "retrieval_zh": Metric(retrieval_zh),
    "count": Metric(count), "code_sim": Metric(code_sim),
    "string_match_all": Metric(string_match_all, "all"), "string_match_part": Metric(string_match_part, "all"),
    "first_integer": Metric(first_integer), "word_match": Metric(word_match), "first_number": Metric(first_number),
    "last_integer": Metric(last_integer), "choice": Metric(choice), "substring": Metric(substring),
    "sequence_accuracy": Metric(sequence_accuracy),
    "qa_f1_ja": Metric(qa_f1_ja), "rouge_ja": Metric(rouge_ja),
}


def metric_names() -> list[str]:
    return sorted(METRICS)


def get_metric(name: str) -> Metric:
    """The metric registered under ``name``; ValueError naming the choices otherwise."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of: {', '.join(metric_names())}")
    return METRICS[name]


def first_line(prediction: str) -> str:
    """LongBench's few-shot rule: the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def score_prediction(metric: str, prediction: str, answers: list[str], all_classes: list[str] | None = None) -> float:
    """Score one prediction against its reference answers with the named metric, in [0, 1]."""
    m = get_metric(metric)
    if not answers:
        raise ValueError("a sample needs at least one reference answer")
    if m.mode == "all":
        return float(m.fn(prediction, answers))
    return max(float(m.fn(prediction, a, all_classes=all_classes)) for a in answers)


def score_sample(sample: Sample, prediction: str) -> float:
    """Score a prediction for a :class:`Sample` (applies the sample's first-line rule), in [0, 1]."""
    if sample.first_line:
        prediction = first_line(prediction)
    return score_prediction(sample.metric, prediction, sample.answers, sample.all_classes)
