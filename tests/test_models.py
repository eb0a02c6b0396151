"""Converting a model package's GGUF into the local cache, alone and beside another process."""

from __future__ import annotations

from pathlib import Path

import namm.models as models
from tiny_models import tiny_model


class _Tokenizer:
    """Stands in for a tokenizer; `on_save` runs while the conversion is under way."""

    def __init__(self, on_save=None):
        self.on_save = on_save

    def save_pretrained(self, folder) -> None:
        (Path(folder) / "tokenizer.json").write_text("{}")
        if self.on_save:
            self.on_save()


def _patch_loaders(monkeypatch, tokenizer: _Tokenizer) -> None:
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model("llama-gqa"))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)


def test_a_conversion_leaves_the_model_and_no_partial_folder(tmp_path, monkeypatch):
    _patch_loaders(monkeypatch, _Tokenizer())
    target = tmp_path / "models" / "tiny"
    models._convert_gguf(tmp_path / "tiny.gguf", target)
    assert (target / "config.json").exists() and (target / "tokenizer.json").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]


def test_a_conversion_finished_first_by_another_process_is_kept(tmp_path, monkeypatch):
    target = tmp_path / "models" / "tiny"

    def other_process_finishes() -> None:
        target.mkdir(parents=True)
        (target / "config.json").write_text('{"other": true}')

    _patch_loaders(monkeypatch, _Tokenizer(on_save=other_process_finishes))
    models._convert_gguf(tmp_path / "tiny.gguf", target)
    assert (target / "config.json").read_text() == '{"other": true}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]
