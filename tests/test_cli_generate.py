"""``namm generate`` on the embedded model: the JSON contract and clear errors on bad input."""

from __future__ import annotations

import json

import pytest

from namm.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is")
    return path


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--policy", "no-such-policy"], "unknown policy 'no-such-policy'"),
    (["--policy", "h2o", "--budget", "0"], "budget must be a fraction in (0, 1]"),
    (["--policy", "h2o", "--budget", "1.5"], "budget must be a fraction in (0, 1]"),
    (["--policy", "h2o", "--budget", "-3"], "budget must be a fraction in (0, 1]"),
    (["--policy", "full", "--budget", "0.5"], "policy 'full' takes no --budget"),
])
def test_bad_arguments_give_one_line_errors(capsys, prompt_file, argv, message):
    code, out, err = run_cli(capsys, "generate", "--prompt-file", str(prompt_file), *argv)
    assert code != 0 and out == ""
    assert message in err and err.count("\n") == 1 and err.startswith("namm generate: error:")


def test_missing_prompt_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(tmp_path / "absent.txt"))
    assert code != 0 and "no such file" in err and err.count("\n") == 1


@pytest.mark.slow
def test_empty_and_too_long_prompts(capsys, tmp_path, smollm2):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(empty))
    assert code != 0 and "is empty" in err and err.count("\n") == 1
    long = tmp_path / "long.txt"
    long.write_text("memory " * 9000)
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(long))
    assert code != 0 and "the model's context is 8192 tokens" in err and err.count("\n") == 1


@pytest.mark.slow
def test_generate_json_contract(capsys, prompt_file, smollm2):
    code, out, _ = run_cli(capsys, "generate", "--prompt-file", str(prompt_file), "--policy", "recency",
                           "--budget", "8", "--n-up", "16", "--max-new-tokens", "6", "--json")
    assert code == 0
    result = json.loads(out)
    for key in ("text", "tokens_seen", "cache_tokens_per_layer", "kv_bytes", "kv_bytes_full"):
        assert key in result
    assert len(result["cache_tokens_per_layer"]) == 30
    assert max(result["cache_tokens_per_layer"]) <= 8 + 16
    assert result["kv_bytes"] < result["kv_bytes_full"]


@pytest.mark.slow
def test_generate_report(capsys, prompt_file, smollm2):
    code, out, _ = run_cli(capsys, "generate", "--prompt-file", str(prompt_file), "--max-new-tokens", "3")
    assert code == 0
    assert "cache kept per layer" in out and "KV memory" in out


@pytest.mark.slow
def test_demo_runs_full_shipped_namm_and_baseline(capsys, smollm2):
    code, out, _ = run_cli(capsys, "demo", "--length", "700", "--budget", "0.5")
    assert code == 0
    assert "expected answer" in out
    for title in ("== full:", "== namm (smollm2-135m, threshold mode):", "== namm (smollm2-135m, budget 0.5):",
                  "== h2o (0.5):"):
        assert title in out
    assert out.count("cache kept per layer") == 4
