"""An offline corpus of natural English text that ships with every Python install.

The text comes from the standard library itself: the prose paragraphs of the language reference
bundled in ``pydoc_data.topics`` and the prose paragraphs of the library's docstrings (read with
``ast``, never imported). Paragraphs that look like code, grammar or tables are dropped. Each
paragraph belongs to exactly one split (``train`` or ``heldout``, about 4:1) by a stable hash of
its text, so the two splits never share a paragraph. The paragraph list is built once (a few
seconds) and cached as JSON under the namm cache directory.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sys
import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 5  # one paragraph in five (by hash) is held out
_VERSION = 1  # bump when the extraction rules change


def _prose(text: str, min_chars: int = 80, min_letter_ratio: float = 0.85) -> list[str]:
    """The paragraphs of ``text`` that read as English prose, each joined onto one line."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.strip("\n").split("\n")
        if any(line.startswith((" ", "\t")) for line in lines) or para.lstrip().startswith(("*", "-", "=", ">")):
            continue
        joined = " ".join(line.strip() for line in lines)
        if len(joined) < min_chars or joined[-1] not in ".:":
            continue
        if sum(c.isalpha() or c == " " for c in joined) / len(joined) < min_letter_ratio:
            continue
        out.append(joined)
    return out


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    return sorted(f for f in root.rglob("*.py") if not skip.intersection(f.relative_to(root).parts))


def _docstring_paragraphs() -> list[str]:
    out = []
    for file in _stdlib_files():
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.extend(_prose(doc))
    return out


def _build_paragraphs() -> list[str]:
    import pydoc_data.topics as topics

    paragraphs = [p for key in sorted(topics.topics) for p in _prose(topics.topics[key])]
    paragraphs += _docstring_paragraphs()
    return list(dict.fromkeys(paragraphs))  # drop repeats, keep the first order


def _cache_file() -> Path:
    from namm.models import cache_dir

    tag = f"v{_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return cache_dir() / "corpus" / f"stdlib-{tag}.json"


@lru_cache(maxsize=1)
def all_paragraphs() -> tuple[str, ...]:
    """Every paragraph of the corpus, in a fixed order (cached on disk after the first build)."""
    file = _cache_file()
    if file.is_file():
        try:
            return tuple(json.loads(file.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, OSError):
            pass
    paragraphs = _build_paragraphs()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".partial")
        tmp.write_text(json.dumps(paragraphs), encoding="utf-8")
        tmp.replace(file)
    except OSError:
        pass  # a read-only cache only costs the rebuild next time
    return tuple(paragraphs)


def split_of(paragraph: str) -> str:
    """The split (``train`` or ``heldout``) a paragraph belongs to, by a stable hash of its text."""
    return "heldout" if zlib.crc32(paragraph.encode("utf-8")) % HELDOUT_EVERY == 0 else "train"


def paragraphs(split: str = "train", seed: int = 0) -> list[str]:
    """The paragraphs of one split, shuffled deterministically by ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; choose one of: {', '.join(SPLITS)}")
    chosen = [p for p in all_paragraphs() if split_of(p) == split]
    random.Random(f"corpus-{split}-{seed}").shuffle(chosen)
    return chosen


def corpus_tokens(tokenizer, n_tokens: int, split: str = "train", seed: int = 0) -> Tensor:
    """Exactly ``n_tokens`` token ids (1-D int64) of natural English text from ``split``.

    Deterministic for a tokenizer, split and seed; different seeds give different paragraph
    orders. Paragraphs are separated by a blank line. Raises ValueError if the split holds fewer
    tokens than asked.
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if n_tokens == 0:
        return torch.zeros(0, dtype=torch.long)
    pool = paragraphs(split, seed)
    taken, chars = 0, 0
    ids: list[int] = []
    while True:
        goal = 4 * n_tokens + 64 if not ids else chars * 2
        while taken < len(pool) and chars < goal:
            chars += len(pool[taken]) + 2
            taken += 1
        ids = tokenizer("\n\n".join(pool[:taken]), add_special_tokens=False).input_ids
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.long)
        if taken == len(pool):
            raise ValueError(f"the offline corpus split {split!r} holds only {len(ids)} tokens with this "
                             f"tokenizer; {n_tokens} were asked")
