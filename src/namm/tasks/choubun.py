"""ChouBun: Sakana AI's Japanese long-context benchmark (extractive QA and summarisation).

LongBench-format rows from ``$NAMM_DATA_DIR/choubun/NAME.jsonl`` or the hub (``SakanaAI/ChouBun``).
Scoring uses F1 and ROUGE-L over MeCab words, which needs the optional extra
``pip install 'namm[japanese]'`` (fugashi + unidic-lite).
"""

from __future__ import annotations

from dataclasses import dataclass

from namm.tasks.base import Sample
from namm.tasks.longbench import DatasetTask, task_specs
from namm.tasks.metrics import mecab_tokens


@dataclass(frozen=True)
class ChouBunTask(DatasetTask):
    def samples(self, tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
        mecab_tokens("")  # fail early, with the install hint, when fugashi is missing
        return super().samples(tokenizer, length, n, seed)


TASKS = {f"choubun/{name}": (lambda n=name: ChouBunTask("choubun", n, "SakanaAI/ChouBun", n, "test"))
         for name in task_specs("choubun")}  # name -> factory, read by namm.tasks.registry
