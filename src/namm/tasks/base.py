"""What every benchmark task produces (:class:`Sample`) and what a task is (:class:`Task`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass
class Sample:
    """One prompt to answer and how to score the answer.

    ``metric`` names a function in :mod:`namm.tasks.metrics`; ``all_classes`` is the label set of
    classification tasks; ``length`` the prompt length in tokens when known. ``first_line``
    scores only the first non-empty line of the prediction (LongBench's rule for few-shot tasks).
    ``question``, when the task separates it, is the final part of ``prompt`` that asks (the
    question and answer prefix); the rest is the :attr:`context`, which the query-agnostic protocol
    compresses before the question is seen. ``truncated``: the prompt was cut to fit a length.
    """

    id: str
    prompt: str
    answers: list[str]
    max_new_tokens: int
    metric: str
    all_classes: list[str] | None = None
    length: int | None = None
    first_line: bool = False
    question: str | None = None
    truncated: bool = False

    def __post_init__(self) -> None:
        if self.question is not None and not (self.question and self.prompt.endswith(self.question)):
            raise ValueError(f"sample {self.id}: the question must be a non-empty ending of the prompt")

    @property
    def context(self) -> str:
        """The prompt without its question (the whole prompt when the sample carries no question)."""
        return self.prompt[:len(self.prompt) - len(self.question)] if self.question else self.prompt

    def to_dict(self) -> dict:
        return asdict(self)

    def reference(self) -> str:
        """The reference continuation of the prompt, for teacher-forced scoring: the answers joined
        by ", ", without a leading word the prompt already ends with ("... Paragraph" + "Paragraph 3"
        gives " 3"), after a space unless the prompt ends in a space or an opening quote/bracket."""
        text = ", ".join(self.answers).strip()
        words = self.prompt.rstrip().split()
        last = words[-1] if words else ""
        if last and text.split(" ", 1)[0] == last:
            text = text[len(last):].lstrip()
        return text if self.prompt[-1:].isspace() or self.prompt[-1:] in "\"'([{" else " " + text


class Task(Protocol):
    """A benchmark task: a name, a description and a deterministic sample generator."""

    name: str
    description: str

    def samples(self, tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
        """``n`` samples whose prompts are about ``length`` tokens (synthetic tasks: within 2%;
        dataset tasks: ``length`` is the truncation limit). The same arguments give the same
        samples."""
        ...
