"""Stop strings, checked as tokens arrive without decoding the whole output at every step.

A stop string found now must overlap the newest token (otherwise an earlier check had found it),
so it lies in the text of the last few tokens: a check decodes only enough of the newest tokens
that the text before the newest one holds the longest stop string plus a margin for what
decoding a slice may change at its start (a stripped leading space, a split multi-byte character).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

MARGIN = 4  # characters a slice's decoded start may differ from the full decode


class StopStrings:
    """Whether the decoded text of a growing token list contains any of ``stops``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def found(self, tokens: list[int]) -> bool:
        """Whether ``tokens`` decode to a text holding a stop string, given that ``tokens[:-1]`` did not."""
        if not self.stops or not tokens:
            return False
        need = self.longest + MARGIN
        width = need + 1  # tokens decode to at least one character each, as a rule
        while width < len(tokens) and len(self.tokenizer.decode(tokens[-width:-1])) < need:
            width *= 2
        text = self.tokenizer.decode(tokens[-width:])
        return any(s in text for s in self.stops)
