"""Stop strings checked incrementally stop at exactly the token where the full decode first holds one."""

from __future__ import annotations

import pytest
import torch

import namm
from namm.memory.stopping import StopStrings

STOPS = [["\n\n"], [" the"], ["é", "Question:"], ["ing."], [". "], ["\u4e2d"]]


def first_stop_full(tokenizer, tokens: list[int], stops: list[str]) -> int | None:
    for t in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:t]) for s in stops):
            return t
    return None


def first_stop_incremental(tokenizer, tokens: list[int], stops: list[str]) -> int | None:
    check = StopStrings(tokenizer, stops)
    for t in range(1, len(tokens) + 1):
        if check.found(tokens[:t]):
            return t
    return None


@pytest.fixture(scope="module")
def tokenizer():
    return namm.load_model("smollm2-135m")[1]


@pytest.mark.parametrize("stops", STOPS)
def test_incremental_stop_matches_full_decode(tokenizer, stops):
    text = ("Reading the passage. Question: what is the café's name?\n\nAnswer: the one in the 中文 corner, "
            "closing. Then nothing.  Done ing. ")
    sequences = [tokenizer(text).input_ids, tokenizer(text * 3, add_special_tokens=False).input_ids]
    gen = torch.Generator().manual_seed(0)
    sequences += [torch.randint(0, tokenizer.vocab_size, (80,), generator=gen).tolist() for _ in range(3)]
    for tokens in sequences:
        assert first_stop_incremental(tokenizer, tokens, stops) == first_stop_full(tokenizer, tokens, stops)


def test_no_stop_strings_never_stop(tokenizer):
    assert not StopStrings(tokenizer, [])
    assert not StopStrings(tokenizer, [""]).found(tokenizer("a b c").input_ids)
