"""InfiniteBench (12 tasks): loader and prompt formatting over the shared dataset machinery.

Rows follow the InfiniteBench JSONL format (``context``, ``input``, ``answer``, optional
``options``, ``id``) from ``$NAMM_DATA_DIR/infinitebench/NAME.jsonl`` or the hub. Prompts are the
benchmark's completion-style templates (for base models); multiple-choice answers are turned
into 'X. option' so the ``choice`` metric can accept the letter or the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from namm.tasks.longbench import DatasetTask, answers_of, task_specs

LETTERS = "ABCD"


@dataclass(frozen=True)
class InfiniteBenchTask(DatasetTask):
    required: ClassVar[tuple[str, ...]] = ("context", "input", "answer")

    def fields(self, row: dict) -> tuple[dict, list[str]]:
        fields = dict(row)
        options = [str(o) for o in row.get("options") or []]
        for letter, option in zip(LETTERS.lower(), options):
            fields[f"option_{letter}"] = option
        text = str(row.get("input", ""))
        fields["func"] = text.split("(")[0].strip()
        found = re.findall(r"The \w+ number", text)
        fields["prefix"] = f"What is {found[0].lower()} in the following list?" if found else text
        answers = answers_of(row, "answer")
        if self.spec["metric"] == "choice" and options:
            answers = [f"{LETTERS[options.index(a)]}. {a}" if a in options else a for a in answers]
        return fields, answers


TASKS = {f"infinitebench/{name}": (lambda n=name: InfiniteBenchTask("infinitebench", n,
                                                                   "xinrongzhang2022/InfiniteBench", None, n))
         for name in task_specs("infinitebench")}  # name -> factory, read by namm.tasks.registry
