"""LongBench (21 tasks) and the dataset machinery shared with InfiniteBench and ChouBun.

A dataset task reads LongBench-format rows (``context``, ``input``, ``answers``, optional
``all_classes``, ``length``, ``_id``) from a local JSONL file, ``$NAMM_DATA_DIR/SUITE/NAME.jsonl``
(default ``~/.cache/namm/data``), or, when the ``datasets`` package is installed and the hub is
reachable, from the hub (then saved to that path for next time). Each row is formatted with the
task's prompt template (``data/SUITE.json``: template, max new tokens, metric, first-line rule)
and truncated in the middle to the requested length, as LongBench does. The part of the template
after ``{context}`` (question and answer prefix) is the sample's question when it survives the
truncation whole and the context part holds no ``{input}``.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import ClassVar

from namm.tasks.base import Sample
from namm.tasks.metrics import get_metric

GENERIC_TEMPLATE = "{context}\n\nQuestion: {input}\nAnswer:"
GENERIC_MAX_NEW_TOKENS = 64
REQUIRED = ("context", "input", "answers")


@lru_cache(maxsize=None)
def task_specs(suite: str) -> dict[str, dict]:
    """The shipped prompt templates and settings of a suite (``longbench``, ``infinitebench``, ``choubun``)."""
    text = resources.files("namm.tasks").joinpath("data", f"{suite}.json").read_text(encoding="utf-8")
    return json.loads(text)


def data_dir() -> Path:
    """Where local benchmark JSONL files are looked up (``$NAMM_DATA_DIR`` or the namm cache)."""
    from namm.models import cache_dir

    return Path(os.environ.get("NAMM_DATA_DIR", cache_dir() / "data"))


def read_jsonl(path: str | Path, required: tuple[str, ...] = REQUIRED, torn_tail_ok: bool = False) -> list[dict]:
    """The rows of a JSONL file (each with its ``_line`` number); a malformed line or a missing field
    is an error naming the line. With ``torn_tail_ok`` an unterminated, unparsable last line (a
    write cut short by a crash) is skipped and an empty file is allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if torn_tail_ok and number == len(lines):
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        missing = [f for f in required if f not in row]
        if missing:
            raise ValueError(f"{path}: line {number} lacks field(s) {', '.join(missing)}")
        row["_line"] = number
        rows.append(row)
    if not rows and not torn_tail_ok:
        raise ValueError(f"{path} holds no rows")
    return rows


def answers_of(row: dict, field: str = "answers") -> list[str]:
    """A row's reference answers as a list of strings (a single answer becomes a list)."""
    value = row[field]
    answers = [str(a) for a in value] if isinstance(value, (list, tuple)) else [str(value)]
    if not answers:
        raise ValueError(f"line {row.get('_line', '?')}: no reference answers")
    return answers


def truncate_middle(tokenizer, text: str, max_tokens: int) -> str:
    """Keep the first and last ``max_tokens // 2`` tokens of ``text`` (LongBench's truncation)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[len(ids) - half:], skip_special_tokens=True))


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        raise ValueError(f"the prompt template needs field {key!r}, which the row lacks")


def format_prompt(template: str, fields: dict) -> str:
    """Fill a ``{field}`` template; a field the row lacks is a clear error."""
    return template.format_map(_Fields({k: v for k, v in fields.items() if isinstance(v, (str, int, float))}))


def question_template(template: str) -> str | None:
    """The question part of a prompt template: what follows its last ``{context}`` (None when the
    template has no ``{context}``, nothing after it, or an ``{input}`` before it)."""
    end = template.rfind("{context}") + len("{context}")
    if end < len("{context}") or end == len(template) or "{input}" in template[:end]:
        return None
    return template[end:]


def build_sample(row: dict, index: int, prefix: str, template: str, metric: str, max_new_tokens: int,
                 first_line: bool, tokenizer, max_length: int, answers: list[str] | None = None,
                 fields: dict | None = None) -> Sample:
    """One Sample from a row: formatted, truncated in the middle to ``max_length`` tokens, with its
    question apart when the template separates one (see :func:`question_template`)."""
    fields = fields or row
    full = format_prompt(template, fields)
    prompt = truncate_middle(tokenizer, full, max_length)
    asks = question_template(template)
    question = format_prompt(asks, fields) if asks else None
    rid = str(row.get("_id") or row.get("id") or index)
    return Sample(id=f"{prefix}-{index}-{rid}"[:120], prompt=prompt, answers=answers or answers_of(row),
                  max_new_tokens=max_new_tokens, metric=metric, all_classes=row.get("all_classes") or None,
                  length=len(tokenizer(prompt).input_ids), first_line=first_line,
                  question=question if question and prompt.endswith(question) else None, truncated=prompt != full)


def hub_rows(repo: str, config: str | None, split: str, target: Path) -> list[dict] | None:
    """Rows from the hub through ``datasets`` (None if it is not installed), saved to ``target``."""
    try:
        import datasets
    except ImportError:
        return None
    try:
        table = datasets.load_dataset(repo, config, split=split) if config else datasets.load_dataset(repo, split=split)
    except Exception as err:  # noqa: BLE001  (network, auth, format: all mean "not reachable")
        raise FileNotFoundError(f"{repo} ({config or split}) could not be loaded from the hub "
                                f"({type(err).__name__}); put a JSONL file at {target}") from None
    rows = [dict(r) for r in table]
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for r in rows:
            handle.write(json.dumps(r, ensure_ascii=False) + "\n")
    return rows


@dataclass(frozen=True)
class DatasetTask:
    """A task of a dataset suite: template and settings from ``data/SUITE.json``, rows from a local
    JSONL file or the hub."""

    suite: str
    name: str
    hub_repo: str
    hub_config: str | None
    hub_split: str
    required: ClassVar[tuple[str, ...]] = REQUIRED

    @property
    def spec(self) -> dict:
        return task_specs(self.suite)[self.name]

    @property
    def description(self) -> str:
        return f"{self.suite} {self.name} ({self.spec['metric']})"

    def local_file(self) -> Path:
        return data_dir() / self.suite / f"{self.name}.jsonl"

    def rows(self) -> list[dict]:
        file = self.local_file()
        if file.is_file():
            return read_jsonl(file, self.required)
        rows = hub_rows(self.hub_repo, self.hub_config, self.hub_split, file)
        if rows is None:
            raise FileNotFoundError(f"no data for {self.suite}/{self.name}: put a JSONL file at {file} "
                                    f"(or set NAMM_DATA_DIR), or pip install datasets to fetch {self.hub_repo}")
        return rows

    def fields(self, row: dict) -> tuple[dict, list[str]]:
        """Template fields and reference answers of a row (overridden by suites with other formats)."""
        return row, answers_of(row)

    def samples(self, tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
        """The first ``n`` rows as samples, prompts truncated in the middle to ``length`` tokens
        (``seed`` is unused: dataset order is fixed)."""
        if n < 1:
            raise ValueError(f"the number of samples must be >= 1, got {n}")
        spec = self.spec
        out = []
        for i, row in enumerate(self.rows()[:n]):
            fields, answers = self.fields(row)
            out.append(build_sample(row, i, f"{self.suite}/{self.name}", spec["prompt"], spec["metric"],
                                    spec["max_new_tokens"], spec["first_line"], tokenizer, length, answers, fields))
        return out


def template_spec(template: str | None, row: dict) -> dict:
    """Prompt template, max new tokens and first-line rule of a row: LongBench task ``template``,
    a format string ``template`` (fields of the row in braces, e.g. ``"{context}\\n\\n{input}"``), the
    row's ``dataset`` field when it names a LongBench task, else a plain context + question prompt."""
    specs = task_specs("longbench")
    generic = {"prompt": GENERIC_TEMPLATE, "max_new_tokens": GENERIC_MAX_NEW_TOKENS, "first_line": False}
    if template is None:
        return specs.get(row.get("dataset"), generic)
    if template in specs:
        return specs[template]
    if "{" not in template:
        raise ValueError(f"unknown LongBench template {template!r}; choose one of: {', '.join(sorted(specs))}, "
                         "or give a format string such as '{context}\\n\\n{input}'")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"bad template format string {template!r}: {err}") from None
    if "context" not in fields:
        raise ValueError(f"the template format string {template!r} has no {{context}} field")
    return {**generic, "prompt": template}


def samples_from_jsonl(path: str | Path, metric: str, tokenizer, max_length: int | None, n: int | None = None,
                       template: str | None = None, model_context: int | None = None) -> list[Sample]:
    """Samples from a LongBench-format JSONL file scored with ``metric``, the prompt template
    chosen by :func:`template_spec`. Prompts are cut in the middle to ``max_length`` tokens, or
    with None to ``model_context`` minus the answer length (``Sample.truncated`` marks cut ones)."""
    get_metric(metric)
    if max_length is None and model_context is None:
        raise ValueError("give max_length or model_context")
    template_spec(template, {})
    rows = read_jsonl(path)
    if n is not None:
        rows = rows[:n]
    stem = Path(path).stem
    out = []
    for i, row in enumerate(rows):
        spec = template_spec(template, row)
        limit = max_length if max_length is not None else model_context - spec["max_new_tokens"]
        try:
            answers = answers_of(row)
            out.append(build_sample(row, i, stem, spec["prompt"], metric, spec["max_new_tokens"], spec["first_line"],
                                    tokenizer, limit, answers))
        except ValueError as err:
            raise ValueError(f"{path}: line {row['_line']}: {err}") from None
        if metric == "classification" and not out[-1].all_classes:
            raise ValueError(f"{path}: line {row['_line']}: the classification metric needs all_classes")
    return out


TASKS = {f"longbench/{name}": (lambda n=name: DatasetTask("longbench", n, "THUDM/LongBench", n, "test"))
         for name in task_specs("longbench")}  # name -> factory, read by namm.tasks.registry
