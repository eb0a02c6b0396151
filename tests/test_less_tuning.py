"""End-to-end LESS fine-tuning on tiny random models: the replayed forward gives every query what
the runtime gave it, tuning lowers the KL to the full cache, runs resume exactly, bad models and
arguments give one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import namm
import namm.less.tuning as tuning
from namm.cli import main
from namm.less import KernelConfig, LessKernels, LessPolicy, load_less_kernels, save_less_kernels
from namm.less.checkpoint import read_metadata
from namm.less.tuning import REPLAY_ATTENTION, TuneConfig, check_model, record_sequence, replay_of, tune_less
from namm.memory.driver import MemoryRunner, attention_implementation, memory_attention_enabled
from test_evolve_helpers import save_tiny_model
from test_less import ByteTokenizer, active_kernels
from tiny_models import random_prompt, tiny_model


def h2o():
    return namm.make_policy("h2o", budget=0.25, n_up=64)


@torch.inference_mode()
def runtime_logits(model, prompt, policy) -> torch.Tensor:
    with memory_attention_enabled(model):
        return MemoryRunner(model, policy, 1).feed([prompt], all_logits=True)[0]


def replay_logits(model, prompt, data, kernels) -> torch.Tensor:
    replay = replay_of(data, model.config.num_hidden_layers, kernels, model.device)
    with torch.no_grad(), attention_implementation(model, REPLAY_ATTENTION):
        hidden = model.get_decoder()(input_ids=prompt[None], use_cache=False, less_replay=replay).last_hidden_state
    return model.get_output_embeddings()(hidden[0])


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mha", "qwen2"])
def test_replay_gives_every_query_what_the_runtime_gave_it(kind):
    model = tiny_model(kind)
    prompt = random_prompt(300, seed=3)
    kernels = active_kernels(model)
    with_less = runtime_logits(model, prompt, LessPolicy(h2o(), kernels))
    data = record_sequence(model, prompt, h2o(), kernels)
    assert sorted(k for k in data if k.endswith(".updates")) == ["0.updates", "1.updates", "2.updates"]
    torch.testing.assert_close(replay_logits(model, prompt, data, kernels), with_less, atol=1e-5, rtol=1e-5)
    alone = runtime_logits(model, prompt, h2o())
    assert (alone - with_less).abs().max() > 1e-3  # the kernels matter, so the match above means something
    torch.testing.assert_close(replay_logits(model, prompt, record_sequence(model, prompt, h2o(), None), None), alone,
                               atol=1e-5, rtol=1e-5)


def start_kernels(model) -> LessKernels:
    return active_kernels(model, log_scale=-1.0)


def test_tuning_lowers_the_kl_to_the_full_cache_and_resumes(tmp_path, monkeypatch):
    model = tiny_model("llama-gqa")
    config = TuneConfig(sequences=2, seq_len=160, steps=6, lr=1e-2, validation=1, eval_every=2, patience=10)
    path = tune_less(model, ByteTokenizer(), h2o(), start_kernels(model), tmp_path, config, {"model": "tiny"},
                     progress=False)
    report = read_metadata(path)["provenance"]["end_to_end"]
    assert report["validation_kl_best"] < report["validation_kl_start"]
    assert report["best_step"] in (2, 4, 6) and report["last_step"] == 6 and report["sequences_per_minute"] > 0
    log = [json.loads(line) for line in (tmp_path / "tune_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [0, 2, 4, 6]
    assert min(entry["validation_kl"] for entry in log) == pytest.approx(report["validation_kl_best"])
    assert log[0]["policy_alone_kl"] == pytest.approx(report["validation_kl_policy_alone"])
    # a finished run resumes to the same kernels without recording or stepping again
    monkeypatch.setattr(tuning, "record_sequence", lambda *a, **k: pytest.fail("a sequence was recorded again"))
    again = load_less_kernels(tune_less(model, ByteTokenizer(), h2o(), start_kernels(model), tmp_path, config,
                                        {"model": "tiny"}, progress=False))
    for a, b in zip(load_less_kernels(path).state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="other settings"):
        tune_less(model, ByteTokenizer(), h2o(), start_kernels(model), tmp_path, TuneConfig(sequences=3, seq_len=160),
                  progress=False)
    out = namm.generate(model, None, random_prompt(200), policy=namm.make_policy("h2o", budget=0.25, n_up=64,
                                                                                 less=path), max_new_tokens=3)
    assert len(out.token_ids) == 3


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    model = tiny_model("qwen2")
    config = TuneConfig(sequences=2, seq_len=160, steps=5, lr=1e-2, validation=1, eval_every=2, patience=10)
    whole = load_less_kernels(tune_less(model, ByteTokenizer(), h2o(), start_kernels(model), tmp_path / "whole",
                                        config, progress=False))
    losses, calls = tuning.sequence_losses, []

    def stop_at_step_three(*args):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return losses(*args)

    monkeypatch.setattr(tuning, "sequence_losses", stop_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        tune_less(model, ByteTokenizer(), h2o(), start_kernels(model), tmp_path / "cut", config, progress=False)
    # the interrupted run already left its best kernels so far, those of the check at step 2
    so_far = read_metadata(tmp_path / "cut" / "less.safetensors")["provenance"]["end_to_end"]
    assert so_far["best_step"] == so_far["last_step"] == 2 and so_far["validation_kl_best"] < so_far["validation_kl_start"]
    load_less_kernels(tmp_path / "cut")
    monkeypatch.setattr(tuning, "sequence_losses", losses)
    resumed = load_less_kernels(tune_less(model, ByteTokenizer(), h2o(), start_kernels(model), tmp_path / "cut",
                                          config, progress=False))
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert (tmp_path / "cut" / "tune_log.jsonl").read_text().count("\n") == 4  # steps 0, 2, 4, 5


def test_models_and_sizes_it_cannot_tune():
    with pytest.raises(ValueError, match="attend globally"):
        check_model(tiny_model("gemma3"))
    check_model(tiny_model("qwen2"))
    with pytest.raises(ValueError, match="must exceed"):
        TuneConfig(seq_len=512).check(512)
    with pytest.raises(ValueError, match="validation"):
        TuneConfig(validation=0).check(64)


def test_policies_that_evict_nothing_to_replay_are_refused(tmp_path):
    model = tiny_model("llama-gqa")
    config = TuneConfig(sequences=1, seq_len=160, validation=1)
    for policy, message in ((namm.make_policy("full"), "evicts nothing"),
                            (namm.make_policy("snapkv", budget=0.25), "prompt-end schedule")):
        with pytest.raises(ValueError, match=message):
            tune_less(model, ByteTokenizer(), policy, start_kernels(model), tmp_path / "a", config, progress=False)
    with pytest.raises(ValueError, match="evicted no token"):
        tune_less(model, ByteTokenizer(), namm.make_policy("h2o", budget=4096, n_up=64), start_kernels(model),
                  tmp_path / "b", config, progress=False)
    with pytest.raises(ValueError, match="must not exceed"):
        TuneConfig(sequences=2, batch_sequences=3).check(None)


def test_kernels_of_another_model_are_refused(tmp_path):
    other = LessKernels(KernelConfig.for_model(tiny_model("llama-mha"), hidden=8))
    with pytest.raises(ValueError, match="this model needs"):
        tune_less(tiny_model("llama-gqa"), ByteTokenizer(), h2o(), other, tmp_path, TuneConfig(seq_len=160),
                  progress=False)


def test_cli_tunes_and_reports(tmp_path, capsys):
    model_dir = str(save_tiny_model(tmp_path / "tiny"))
    start = save_less_kernels(tmp_path / "start", start_kernels(tiny_model("llama-gqa")))
    common = ["less-tune", "--model", model_dir, "--device", "cpu", "--policy", "h2o", "--budget", "0.25", "--n-up",
              "64", "--sequences", "1", "--seq-len", "160", "--validation", "1", "--steps", "2", "--eval-every", "1"]
    assert main([*common, "--init-from", str(start), "--out", str(tmp_path / "tuned")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("wrote ") and "policy alone" in line and "sequences per minute" in line
    assert main(["eval", "--model", model_dir, "--device", "cpu", "--task", "perplexity", "--length", "200",
                 "--policy", "h2o", "--budget", "0.25", "--n-up", "64", "--less", str(tmp_path / "tuned"),
                 "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    assert main([*common, "--init-from", "no-such-kernels", "--out", str(tmp_path / "x")]) == 2
    assert "no LESS kernels" in capsys.readouterr().err
    assert main([*common, "--init-from", str(start), "--less", str(start), "--out", str(tmp_path / "y")]) == 2
    assert "do not pass --less" in capsys.readouterr().err
