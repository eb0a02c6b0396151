"""Helper of the evolution tests: a tiny model directory that ``namm.load_model`` (and so
``namm evolve --model DIR``) can load."""

from __future__ import annotations

from pathlib import Path

from fixtures.byte_tokenizer import byte_tokenizer
from tiny_models import tiny_model


def save_tiny_model(directory: Path, kind: str = "llama-gqa") -> Path:
    """Save a tiny random model and the byte tokenizer to ``directory`` (loadable by path)."""
    tiny_model(kind).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory
