"""RULER-style synthetic long-context tasks, generated offline and deterministically.

Every task builds its prompt from a *size* (tokens of haystack text, or a count of list items)
and :func:`fit_size` searches the size whose prompt has the requested number of tokens, so
prompts hit their length within a few tokens. Haystack text comes from the offline corpus
(:mod:`namm.tasks.corpus`, ``train`` split). Prompts are plain completions (no chat template)
ending where the answer should start; answers are short strings checked by RULER's string match.
Every prompt is a context (everything up to and including the haystack or list) followed by a
question (the final question and answer prefix), kept apart in :attr:`Sample.question`.
The same task, tokenizer, length, count and seed always give the same samples.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from namm.tasks.base import Sample
from namm.tasks.corpus import all_paragraphs, corpus_tokens

Built = tuple[str, str, list[str]]  # (context, question, answers)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` as :func:`namm.generate` will feed it."""
    return len(tokenizer(text).input_ids)


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Distinct lower-case English words of 5-10 letters from the corpus, sorted."""
    words = {w for p in all_paragraphs() for w in re.findall(r"\b[a-z]{5,10}\b", p)}
    return tuple(sorted(words))


class Haystack:
    """Corpus text of a chosen token length for one sample (tokenised once, sliced per size)."""

    def __init__(self, tokenizer, seed: int, max_tokens: int):
        self.tokenizer = tokenizer
        self.ids = corpus_tokens(tokenizer, max_tokens, "train", seed)

    def text(self, n_tokens: int) -> str:
        n = max(0, min(n_tokens, len(self.ids)))
        text = self.tokenizer.decode(self.ids[:n].tolist())
        cut = max(text.rfind(" "), text.rfind("\n"))
        return text[:cut].rstrip() if 0 < cut and n < len(self.ids) else text.strip()


def insert_at_depths(text: str, needles: list[tuple[float, str]]) -> str:
    """Insert each (depth in [0, 1], sentence) at the sentence boundary nearest that depth."""
    bounds = sorted({0, len(text), *(m.end() for m in re.finditer(r"[.!?:]\s", text))})
    places = []
    for depth, needle in needles:
        goal = depth * len(text)
        places.append((min(bounds, key=lambda b: abs(b - goal)), needle))
    out, last = [], 0
    for pos, needle in sorted(places, key=lambda p: p[0]):
        out.append(text[last:pos])
        out.append(needle + " " if pos < len(text) else " " + needle)
        last = pos
    out.append(text[last:])
    return "".join(out)


def fit_size(tokenizer, target: int, build: Callable[[int], Built], minimum: int, rate: float) -> tuple[Built, int]:
    """The (context, question, answers) whose prompt (context + question) length is closest to
    ``target`` tokens, searching the size argument of ``build`` from ``minimum`` by secant steps;
    returns it with its length."""
    seen: dict[int, tuple[int, Built]] = {}

    def measure(size: int) -> int:
        if size not in seen:
            built = build(size)
            seen[size] = (count_tokens(tokenizer, built[0] + built[1]), built)
        return seen[size][0]

    base = measure(minimum)
    if base > target:
        raise ValueError(f"length {target} is too short for this task: its smallest prompt has {base} tokens")
    size = minimum + max(0, round((target - base) / rate))
    for _ in range(8):
        got = measure(size)
        if got == target:
            break
        if size > minimum:
            rate = max((got - base) / (size - minimum), 1e-3)
        step = round((target - got) / rate)
        if step == 0:
            step = 1 if got < target else -1
        nxt = max(minimum, size + step)
        if nxt in seen:
            break
        size = nxt
    for near in (size - 1, size + 1):
        if near >= minimum and abs(measure(size) - target) > 0:
            measure(near)
    best = min(seen, key=lambda s: (abs(seen[s][0] - target), s))
    return seen[best][1], seen[best][0]


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _keys(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct two-word keys such as 'lexical-matrix'."""
    words = vocabulary()
    keys: list[str] = []
    while len(keys) < n:
        key = f"{rng.choice(words)}-{rng.choice(words)}"
        if key not in keys:
            keys.append(key)
    return keys


def _depths(rng: random.Random, n: int) -> list[float]:
    return [rng.uniform(0.05, 0.95) for _ in range(n)]


# ---------------------------------------------------------------- haystack tasks

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n\n")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n\n")


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def passkey(rng: random.Random, hay: Haystack) -> Callable[[int], Built]:
    key = _number(rng, 5)
    depth = rng.uniform(0.05, 0.95)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return lambda n: (PASSKEY_INTRO + insert_at_depths(hay.text(n), [(depth, needle)]),
                      "\n\nWhat is the pass key? The pass key is", [key])


def niah(keys: int, values: int, queries: int) -> Callable[[random.Random, Haystack], Callable[[int], Built]]:
    """Needle in a haystack: ``keys`` needles (``values`` numbers for the asked key), ``queries``
    keys asked."""

    def make(rng: random.Random, hay: Haystack) -> Callable[[int], Built]:
        names = _keys(rng, keys)
        numbers = {k: [_number(rng, 7) for _ in range(values if i < queries else 1)] for i, k in enumerate(names)}
        needles = [_needle(k, v) for k in names for v in numbers[k]]
        rng.shuffle(needles)
        placed = list(zip(_depths(rng, len(needles)), needles))
        asked = names[:queries]
        answers = [v for k in asked for v in numbers[k]]
        if queries == 1 and values == 1:
            question = (f"What is the special magic number for {asked[0]} mentioned in the provided text? "
                        f"The special magic number for {asked[0]} mentioned in the provided text is")
        else:
            who = asked[0] if queries == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
            question = (f"What are all the special magic numbers for {who} mentioned in the provided text? "
                        f"The special magic numbers for {who} mentioned in the provided text are")
        return lambda n: (NIAH_INTRO + insert_at_depths(hay.text(n), placed), "\n\n" + question, answers)

    return make


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def variable_tracking(rng: random.Random, hay: Haystack, hops: int = 4) -> Callable[[int], Built]:
    value = _number(rng, 5)
    names: list[str] = []
    while len(names) < hops + 1:
        name = _variable_name(rng)
        if name not in names:
            names.append(name)
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    placed = list(zip(sorted(_depths(rng, len(statements))), statements))
    question = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain of variable assignments in the text above, {len(names)} variables "
                f"are assigned the value {value}, they are:")
    intro = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
    return lambda n: (intro + insert_at_depths(hay.text(n), placed), question, names)


FIRST_NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jonas",
               "Kamala", "Lukas", "Mireille", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Stefan", "Tomasz"]
LAST_NAMES = ["Abbott", "Bergström", "Castillo", "Delacroix", "Eriksen", "Fontaine", "Galloway", "Hartmann",
              "Iwasaki", "Jovanovic", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov"]
CITIES = ["Lisbon", "Krakow", "Nairobi", "Osaka", "Valparaiso", "Tallinn", "Marseille", "Winnipeg", "Hobart",
          "Cusco", "Tbilisi", "Leipzig", "Bergen", "Mombasa", "Antwerp", "Seville"]
JOBS = ["carpenter", "pharmacist", "geologist", "violinist", "librarian", "surveyor", "beekeeper", "cartographer",
        "astronomer", "glassblower", "translator", "locksmith"]
FACTS = [
    ("was born in the city of {}.", "In which city was {} born?", CITIES),
    ("works as a {}.", "What is the profession of {}?", JOBS),
]


def multidoc_qa(rng: random.Random, hay: Haystack, people: int = 6) -> Callable[[int], Built]:
    """Documents from the corpus, with templated facts about fictional people planted in some."""
    names: list[str] = []
    while len(names) < people:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if name not in names:
            names.append(name)
    statement, question, values = FACTS[rng.randrange(len(FACTS))]
    picked = rng.sample(values, people)
    facts = [f"{name} {statement.format(v)}" for name, v in zip(names, picked)]
    depths = _depths(rng, people)
    instruction = "Answer the question based on the given documents. Only give me the answer and do not output any other words."

    def build(n: int) -> Built:
        docs = [d for d in hay.text(n).split("\n\n") if d.strip()] or [""]
        for depth, fact in zip(depths, facts):
            i = min(int(depth * len(docs)), len(docs) - 1)
            docs[i] = insert_at_depths(docs[i], [(_stable_depth(fact), fact)])
        body = "\n\n".join(f"Document {i + 1}: {d}" for i, d in enumerate(docs))
        return (f"{instruction}\n\nThe following are given documents.\n\n{body}",
                f"\n\n{instruction}\n\nQuestion: {question.format(names[0])}\nAnswer:", [picked[0]])

    return build


def _stable_depth(text: str) -> float:
    """A fixed pseudo-random depth in [0, 1] derived from a string (stable across sizes)."""
    return (sum(map(ord, text)) % 97) / 96


def passage_retrieval(rng: random.Random, hay: Haystack) -> Callable[[int], Built]:
    """Numbered corpus paragraphs; which one contains the quoted sentence?"""
    available = len([p for p in hay.text(3 * len(hay.ids) // 4).split("\n\n") if p.strip()])
    chosen = int(rng.uniform(0.0, 1.0) * max(available - 1, 1))  # fixed across sizes: a stable quote

    def build(n: int) -> Built:
        paras = [p for p in hay.text(n).split("\n\n") if p.strip()] or ["(empty)"]
        whole = paras[:-1] if len(paras) > 1 else paras
        target = min(chosen, len(whole) - 1)
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", whole[target]) if len(s) >= 30]
        quote = max(sentences, key=len) if sentences else whole[target][:200]
        body = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(paras))
        context = (f"Here are {len(paras)} paragraphs, along with a sentence taken from one of them. Please "
                   f"determine which paragraph the sentence is from.\n\n{body}")
        question = (f"\n\nThe following is the sentence.\n\n{quote}\n\nPlease enter the number of the paragraph that "
                    f"the sentence is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\n"
                    f"The answer is: Paragraph")
        return context, question, [f"Paragraph {target + 1}"]

    return build


# ---------------------------------------------------------------- list tasks (size = item count)

def common_words(rng: random.Random, length: int, common: int = 10) -> Callable[[int], Built]:
    """A numbered word list where ``common`` words repeat many times and the rest appear once."""
    words = rng.sample(vocabulary(), k=min(len(vocabulary()), 4 * length // 3 + common))
    top, rest = words[:common], words[common:]
    repeats = max(2, length // 250)
    order_seed = rng.randrange(1 << 30)

    def build(n: int) -> Built:
        items = [w for w in top for _ in range(repeats)] + rest[:n]
        random.Random(order_seed).shuffle(items)
        body = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        context = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   f"Memorize the ones that appear most often.\n{body}")
        question = (f"\nQuestion: What are the {common} most common words in the above list? Answer: The top "
                    f"{common} words that appear most often in the list are:")
        return context, question, list(top)

    return build


def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))


def frequent_words(rng: random.Random, length: int, alpha: float = 2.0, vocab: int = 300) -> Callable[[int], Built]:
    """Coded text drawn from a Zipf law; the three most frequent coded words are the answer."""
    coded: list[str] = []
    while len(coded) < vocab:
        word = _coded_word(rng)
        if word not in coded:
            coded.append(word)
    weights = [1 / (r + 1) ** alpha for r in range(vocab)]
    stream = rng.choices(coded, weights=weights, k=2 * length)

    def build(n: int) -> Built:
        text = stream[:n]
        counts = Counter(text)
        top = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], text.index(wc[0])))[:3]]
        context = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                   f"frequently appeared coded words. {' '.join(text)}")
        question = ("\nQuestion: Do not provide any explanation. What are the three most frequently appeared words "
                    "in the above coded text? Answer: According to the coded text above, the three most frequently "
                    "appeared words are:")
        return context, question, top

    return build


def _short_uuid(rng: random.Random) -> str:
    return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"


def kv_retrieval(rng: random.Random, length: int) -> Callable[[int], Built]:
    """A JSON object of random keys and values; give the value of one key."""
    pairs = [(_short_uuid(rng), _short_uuid(rng)) for _ in range(max(8, length // 8))]
    depth = rng.uniform(0.0, 1.0)

    def build(n: int) -> Built:
        items = pairs[:n]
        key, value = items[min(int(depth * n), n - 1)]
        body = "{" + ", ".join(f'"{k}": "{v}"' for k, v in items) + "}"
        context = f"Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{body}"
        return context, f"\n\nKey: \"{key}\"\nThe value associated with the specified key is: \"", [value]

    return build


# ---------------------------------------------------------------- the tasks

@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task: how to build a prompt from a size, and how to score it."""

    name: str
    description: str
    make: Callable[..., Callable[[int], Built]]
    haystack: bool
    max_new_tokens: int
    metric: str = "string_match_all"
    rate: float = 1.0  # first guess of prompt tokens per unit of size

    def samples(self, tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
        """``n`` samples of ``length`` tokens (within 2%); deterministic in all arguments."""
        if tokenizer is None:
            raise ValueError(f"task {self.name!r} needs a tokenizer")
        if length < 64:
            raise ValueError(f"length must be >= 64 tokens, got {length}")
        if n < 1:
            raise ValueError(f"the number of samples must be >= 1, got {n}")
        return [self.sample(tokenizer, length, seed, i) for i in range(n)]

    def sample(self, tokenizer, length: int, seed: int, index: int) -> Sample:
        rng = random.Random(f"{self.name}|{length}|{seed}|{index}")
        if self.haystack:
            build = self.make(rng, Haystack(tokenizer, rng.randrange(1 << 30), length + 64))
            minimum = 0
        else:
            build = self.make(rng, length)
            minimum = 1
        (context, question, answers), got = fit_size(tokenizer, length, build, minimum, self.rate)
        return Sample(id=f"{self.name}-{length}-{seed}-{index}", prompt=context + question, answers=answers,
                      max_new_tokens=self.max_new_tokens, metric=self.metric, length=got, question=question)


SYNTHETIC_TASKS = [
    SyntheticTask("passkey", "find a 5-digit pass key hidden in corpus text", passkey, True, 8),
    SyntheticTask("niah_single", "one key-number needle in a haystack; recall the number", niah(1, 1, 1), True, 12),
    SyntheticTask("niah_multikey", "four needles with different keys; recall one key's number", niah(4, 1, 1),
                  True, 12),
    SyntheticTask("niah_multivalue", "four numbers for the same key; recall all four", niah(1, 4, 1), True, 48),
    SyntheticTask("niah_multiquery", "four needles; recall the numbers of all four keys", niah(4, 1, 4), True, 48),
    SyntheticTask("variable_tracking", "follow a chain of variable assignments; name every variable", variable_tracking,
                  True, 32),
    SyntheticTask("common_words", "name the 10 most repeated words of a numbered list", common_words, False, 64,
                  rate=4.0),
    SyntheticTask("frequent_words", "name the 3 most frequent words of a Zipf-distributed coded text",
                  frequent_words, False, 24, rate=2.5),
    SyntheticTask("kv_retrieval", "give the value of one key of a JSON object of random keys", kv_retrieval, False, 16,
                  rate=20.0),
    SyntheticTask("multidoc_qa", "answer a question from templated facts planted in corpus documents", multidoc_qa,
                  True, 16, metric="string_match_part"),
    SyntheticTask("passage_retrieval", "which numbered paragraph contains the quoted sentence", passage_retrieval,
                  True, 8, metric="retrieval"),
]

TASKS = {t.name: (lambda t=t: t) for t in SYNTHETIC_TASKS}  # name -> factory, read by namm.tasks.registry


