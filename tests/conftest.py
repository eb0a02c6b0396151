"""Shared fixtures: the embedded SmolLM2 model, loaded once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import tiny_models directly


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default model, float32 on CPU."""
    import namm

    return namm.load_model("smollm2-135m")
