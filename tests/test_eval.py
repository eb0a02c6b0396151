"""The evaluation runner, `namm eval` and `namm compare` on a tiny random model (byte tokenizer)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import namm
from fixtures.byte_tokenizer import byte_tokenizer
from namm.cli import main
from namm.commands.common import locked_output_dir
from namm.eval import runner
from namm.eval.report import markdown_table, mean_rows, normalized_score, reference_dir
from namm.eval.runner import evaluate
from namm.tasks import get_task
from tiny_models import tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
CONTRACT = {"task", "policy", "model", "n", "score", "cache_fraction", "kv_bytes_peak", "kv_bytes_full_peak",
            "prefill_tokens_per_s", "decode_tokens_per_s", "wall_s"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep reference scores and the corpus cache of these tests out of the user's cache."""
    monkeypatch.setenv("NAMM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama-gqa"), byte_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny model and byte tokenizer saved as a local model directory for the CLI."""
    path = tmp_path_factory.mktemp("tiny-model")
    model, tok = tiny_model("llama-gqa"), byte_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def samples():
    return get_task("passkey").samples(byte_tokenizer(), 600, 3)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()]


def test_evaluate_writes_contract_and_resumes(tiny, samples, tmp_path, monkeypatch):
    model, tok = tiny
    out = tmp_path / "run"
    policy = namm.make_policy("h2o", budget=0.5, n_up=128)
    metrics = evaluate(model, tok, policy, samples, out_dir=out, progress=False, task="passkey", model_name="tiny")
    assert CONTRACT <= set(metrics) and metrics["n"] == 3 and 0 <= metrics["score"] <= 100
    assert metrics["cache_fraction"] < 0.8 and metrics["kv_bytes_peak"] < metrics["kv_bytes_full_peak"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert json.loads((out / "config.json").read_text())["policy_config"]["policy"] == "h2o"
    first = rows_of(out)
    assert [r["id"] for r in first] == [s.id for s in samples]
    # lose the last row, leave a torn line as a crash would: the rerun computes exactly one sample
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    calls = []
    real = runner.generate
    monkeypatch.setattr(runner, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    again = evaluate(model, tok, namm.make_policy("h2o", budget=0.5, n_up=128), samples, out_dir=out,
                     progress=False, task="passkey", model_name="tiny")
    assert calls == [1]
    assert [r["prediction"] for r in rows_of(out)] == [r["prediction"] for r in first]
    assert again["score"] == metrics["score"] and again["n"] == 3


def test_more_samples_later_runs_only_the_new_ones(tiny, samples, tmp_path, monkeypatch):
    model, tok = tiny
    evaluate(model, tok, namm.make_policy("full"), samples[:1], out_dir=tmp_path, progress=False)
    calls = []
    real = runner.generate
    monkeypatch.setattr(runner, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    metrics = evaluate(model, tok, namm.make_policy("full"), samples, out_dir=tmp_path, progress=False)
    assert calls == [1, 1] and metrics["n"] == 3
    changed = [replace(samples[0], answers=["a different answer"])]
    with pytest.raises(ValueError, match="differs from the one already answered"):
        evaluate(model, tok, namm.make_policy("full"), changed, out_dir=tmp_path, progress=False)


def test_other_run_in_same_folder_is_refused(tiny, samples, tmp_path):
    model, tok = tiny
    evaluate(model, tok, namm.make_policy("full"), samples[:1], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds results of a different run"):
        evaluate(model, tok, namm.make_policy("recency", budget=0.5), samples[:1], out_dir=tmp_path, progress=False)


def test_corrupt_predictions_line_is_named(tiny, samples, tmp_path):
    model, tok = tiny
    evaluate(model, tok, namm.make_policy("full"), samples[:2], out_dir=tmp_path, progress=False)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    (tmp_path / "predictions.jsonl").write_text("{oops\n" + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        evaluate(model, tok, namm.make_policy("full"), samples[:2], out_dir=tmp_path, progress=False)


def test_batched_evaluation_matches_single(tiny, samples):
    model, tok = tiny
    policy = lambda: namm.make_policy("snapkv", budget=0.5, n_up=128)  # noqa: E731
    one = evaluate(model, tok, policy(), samples, progress=False)
    two = evaluate(model, tok, policy(), samples, batch_size=2, progress=False)
    assert one["score"] == two["score"] and one["cache_fraction"] == pytest.approx(two["cache_fraction"])


def test_report_helpers():
    rows = [
        {"task": "a", "policy": "h2o", "budget": "0.5", "n": 2, "score": 40.0, "normalized_score": 50.0,
         "cache_fraction": 0.5, "kv_fraction": 0.5, "kv_fraction_peak": 0.9, "kv_bytes_peak_mean": 2**20,
         "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0, "sample_scores": [0.0, 80.0]},
        {"task": "b", "policy": "h2o", "budget": "0.5", "n": 2, "score": 60.0, "normalized_score": None,
         "cache_fraction": 0.6, "kv_fraction": 0.4, "kv_fraction_peak": 0.8, "kv_bytes_peak_mean": 3 * 2**20,
         "prefill_tokens_per_s": 200.0, "decode_tokens_per_s": 20.0, "sample_scores": [60.0, 60.0],
         "score_ci": [60.0, 60.0]},
    ]
    mean = mean_rows(rows)
    assert len(mean) == 1 and mean[0]["score"] == 50.0 and mean[0]["normalized_score"] == 50.0
    assert mean[0]["cache_fraction"] == pytest.approx(0.55) and mean[0]["n"] == 4
    assert mean[0]["kv_fraction"] == pytest.approx(0.45) and mean[0]["kv_fraction_peak"] == 0.9
    assert mean[0]["score_ci"] == pytest.approx((30.0, 70.0))  # task a resampled alone: 0, 40 or 80
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| task | policy | budget |") and len(table) == 4
    assert table[2] == "| a | h2o | 0.5 | – | – | 2 | 40.0 | 50.0 | 0.500 | 0.900 | 0.500 | 1.0 | 100 | 10.0 |"  # no labels
    assert table[3].startswith("| b | h2o | 0.5 | – | – | 2 | 60.0 [60.0, 60.0] | – | 0.400 |")
    assert normalized_score(40.0, 80.0) == 50.0 and normalized_score(10.0, 0.0) is None


def test_cli_eval_end_to_end_with_cached_reference(tiny_dir, tmp_path, capsys):
    base = ["eval", "--model", tiny_dir, "--task", "passkey", "--length", "600", "--samples", "2", "--quiet"]
    assert main(base + ["--policy", "full", "--out", str(tmp_path / "full")]) == 0
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert CONTRACT <= set(metrics) and metrics["cache_fraction"] == 1.0
    assert len(rows_of(tmp_path / "full")) == 2
    out = tmp_path / "h2o"
    assert main(base + ["--policy", "h2o", "--budget", "0.5", "--n-up", "128", "--normalize", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference_score"] == json.loads((tmp_path / "full" / "metrics.json").read_text())["score"]
    assert "normalized_score" in metrics and metrics["budget"] == "0.5"
    assert "score" in capsys.readouterr().out


def test_reference_is_kept_per_dtype(tiny_dir, tmp_path):
    """A bfloat16 full-cache run is the reference of bfloat16 runs only, never of float32 ones."""
    base = ["eval", "--model", tiny_dir, "--task", "passkey", "--length", "600", "--samples", "2", "--quiet"]
    assert main(base + ["--policy", "full", "--dtype", "bfloat16", "--out", str(tmp_path / "full-bf16")]) == 0
    references = Path(os.environ["NAMM_CACHE"]) / "references"
    assert [p.name.split("-")[-3:-1] for p in references.iterdir()] == [["bfloat16", "cpu"]]
    assert main(base + ["--policy", "h2o", "--budget", "0.5", "--n-up", "128", "--normalize",
                        "--out", str(tmp_path / "h2o")]) == 0
    assert sorted(p.name.split("-")[-3] for p in references.iterdir()) == ["bfloat16", "float32"]  # computed anew


def test_two_commands_needing_one_reference_compute_it_once(monkeypatch):
    """A second command that needs a full-cache reference being computed waits for it and reads it."""
    import threading
    import time

    from namm.eval import report

    calls = []

    def slow_full_run(model, tokenizer, policy, samples, out_dir, **kwargs):
        calls.append(policy.name)
        time.sleep(0.3)
        metrics = {"n": len(samples), "score": 50.0}
        (Path(out_dir) / runner.METRICS).write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(report, "evaluate", slow_full_run)
    model = SimpleNamespace(dtype=torch.float32, device=torch.device("cpu"))
    samples = get_task("passkey").samples(byte_tokenizer(), 600, 2)
    found = []
    threads = [threading.Thread(target=lambda: found.append(
        report.reference_metrics(model, None, samples, "tiny", "passkey"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["full"] and found == [{"n": 2, "score": 50.0}] * 2


def test_reference_of_a_local_folder_follows_its_files(tmp_path):
    """Replacing a local model folder's weights or a local .gguf file gives a new reference key; an untouched
    folder keeps its key."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"old weights")
    model = SimpleNamespace(dtype=torch.float32, device=torch.device("cpu"))
    samples = get_task("passkey").samples(byte_tokenizer(), 600, 2)
    before = reference_dir(str(folder), model, samples)
    assert reference_dir(str(folder), model, samples) == before
    (folder / "model.safetensors").write_bytes(b"new weights, longer")
    assert reference_dir(str(folder), model, samples) != before
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"old file")
    first = reference_dir(str(gguf), model, samples)
    gguf.write_bytes(b"new file, longer")
    assert reference_dir(str(gguf), model, samples) != first
    assert reference_dir("smollm2-135m", model, samples).name.startswith("smollm2-135m-float32-cpu-")


def test_second_command_on_one_out_folder_stops(tiny_dir, tmp_path, capsys):
    """While one command writes to a folder, another one aimed at it stops with a one-line error."""
    out = str(tmp_path / "o")
    argv = ["eval", "--model", tiny_dir, "--task", "passkey", "--length", "600", "--samples", "1", "--quiet",
            "--out", out]
    with locked_output_dir(out):
        assert main(argv) == 2
        assert main(["compare", "--model", tiny_dir, "--policies", "full", "--tasks", "passkey", "--length", "600",
                     "--samples", "1", "--quiet", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("another namm command is writing to" in line for line in err)
    assert not (tmp_path / "o" / "metrics.json").exists()
    assert main(argv) == 0  # released when the first one ends


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--data-file", str(FIXTURES / "longbench_malformed.jsonl"), "--metric", "qa_f1"], "line 3 is not valid JSON"),
    (["--data-file", str(FIXTURES / "longbench_missing_field.jsonl"), "--metric", "qa_f1"], "line 2 lacks field"),
    (["--data-file", str(FIXTURES / "longbench_sample.jsonl"), "--metric", "bleu"], "unknown metric 'bleu'"),
    (["--data-file", str(FIXTURES / "longbench_sample.jsonl")], "--data-file needs --metric"),
    (["--data-file", str(FIXTURES / "absent.jsonl"), "--metric", "qa_f1"], "no such file"),
    (["--task", "passkey", "--samples", "0"], "--samples must be >= 1"),
])
def test_cli_eval_bad_inputs(tiny_dir, tmp_path, capsys, argv, message):
    assert main(["eval", "--model", tiny_dir, "--out", str(tmp_path / "o"), "--quiet"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("namm eval: error:") and message in err


def test_cli_eval_unwritable_output(tiny_dir, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["eval", "--model", tiny_dir, "--task", "passkey", "--out", str(blocker / "sub"), "--quiet"]) == 2
    assert "namm eval: error:" in capsys.readouterr().err


def test_cli_eval_data_file(tiny_dir, tmp_path):
    out = tmp_path / "lb"
    argv = ["eval", "--model", tiny_dir, "--data-file", str(FIXTURES / "longbench_sample.jsonl"), "--metric", "qa_f1",
            "--length", "700", "--samples", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    rows = rows_of(out)
    assert len(rows) == 2 and rows[1]["answers"] == ["thirty years", "30 years"]
    assert json.loads((out / "metrics.json").read_text())["task"] == "longbench_sample"


def test_cli_eval_perplexity(tiny_dir, tmp_path):
    out = tmp_path / "ppl"
    argv = ["eval", "--model", tiny_dir, "--task", "perplexity", "--length", "300", "--samples", "1",
            "--policy", "recency",
            "--budget", "0.5", "--n-up", "128", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "perplexity" and metrics["perplexity"] > 1 and metrics["tokens"] == 299
    assert metrics["cache_fraction"] < 1


def test_cli_compare_table_and_plot(tiny_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", tiny_dir, "--policies", "full,recency,h2o", "--budgets", "0.25,0.5",
            "--tasks", "passkey,kv_retrieval", "--length", "600", "--samples", "1", "--n-up", "128",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = (out / "results.md").read_text()
    assert "| passkey | h2o | 0.25 | progressive | query-aware | 1 |" in table
    assert "| kv_retrieval | full | – | – | query-aware | 1 |" in table
    assert "| mean | recency | 0.5 | progressive | query-aware | 2 |" in table
    assert (out / "score_vs_cache.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2 * (1 + 2 + 2)
    assert {r["policy"] for r in rows if r["cache_fraction"] < 1} == {"recency", "h2o"}
    assert main(argv[:5] + ["--tasks", "nope", "--out", str(out)]) == 2


def test_stopped_compare_keeps_the_table_of_finished_runs(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", tiny_dir, "--policies", "recency,full", "--budgets", "0.25", "--tasks", "passkey",
            "--length", "600", "--samples", "1", "--n-up", "128", "--out", str(out), "--quiet"]
    real, calls = runner.evaluate_shared, []

    def stop_on_second_run(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_shared", stop_on_second_run)
    assert main(argv) == 130  # interrupted (Ctrl-C) during the second run
    assert [r["policy"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["full"]  # full runs first
    assert "| passkey | full |" in (out / "results.md").read_text()
    monkeypatch.setattr(runner, "evaluate_shared", real)
    assert main(argv) == 0
    assert [r["policy"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["full", "recency"]


def test_cli_namm_and_h2o_with_less_count_the_state_in_every_memory_figure(tiny_dir, tmp_path, capsys):
    from namm.less import KernelConfig, LessKernels, save_less_kernels

    kernels = save_less_kernels(tmp_path / "less", LessKernels(KernelConfig.for_model(tiny_model("llama-gqa"), 8)))
    state = 3 * 2 * 8 * (16 + 1) * 4  # layers * KV heads * R * (d + 1) * float32
    out = tmp_path / "cmp"
    assert main(["compare", "--model", tiny_dir, "--policies", "full,h2o,namm", "--budgets", "0.25", "--checkpoint",
                 "smollm2-135m", "--less", str(kernels), "--tasks", "passkey", "--length", "600", "--samples", "1",
                 "--n-up", "128", "--out", str(out), "--quiet"]) == 0
    assert "KV + LESS fraction" in (out / "results.md").read_text()
    rows = {r["policy"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"full", "h2o+less", "namm+less"} and rows["full"]["less_state_bytes"] == 0
    for name in ("h2o+less", "namm+less"):
        assert rows[name]["less_state_bytes"] == state
        assert rows[name]["memory_fraction"] > rows[name]["kv_fraction"]
    ppl = tmp_path / "ppl"
    assert main(["eval", "--model", tiny_dir, "--task", "perplexity", "--length", "300", "--samples", "1",
                 "--policy", "namm", "--checkpoint", "smollm2-135m", "--n-up", "128", "--less", str(kernels),
                 "--out", str(ppl), "--quiet"]) == 0
    metrics = json.loads((ppl / "metrics.json").read_text())
    assert metrics["policy"] == "namm+less" and metrics["less_state_bytes"] == state
    assert metrics["memory_fraction_peak"] == pytest.approx((metrics["kv_bytes_peak"] + state)
                                                            / metrics["kv_bytes_full_peak"])
    assert "LESS state 3.2 KiB" in capsys.readouterr().out
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("x" * 300)
    assert main(["generate", "--model", tiny_dir, "--policy", "namm", "--checkpoint", "smollm2-135m", "--n-up", "128",
                 "--less", str(kernels), "--prompt-file", str(prompt), "--max-new-tokens", "2", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["less_state_bytes"] == state and reply["memory_fraction"] > reply["kv_bytes"] / reply["kv_bytes_full"]


@pytest.mark.slow
def test_smollm2_finds_pass_keys(smollm2, tmp_path):
    model, tok = smollm2
    samples = get_task("passkey").samples(tok, 1024, 2)
    metrics = evaluate(model, tok, namm.make_policy("full"), samples, out_dir=tmp_path, progress=False,
                       task="passkey", model_name="smollm2-135m")
    assert metrics["score"] >= 50 and metrics["cache_fraction"] == 1.0
