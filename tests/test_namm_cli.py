"""``namm calibrate`` and ``namm inspect`` end to end on a tiny model saved in a local folder."""

from __future__ import annotations

import json

import pytest
import torch

import namm
from fixtures.byte_tokenizer import byte_tokenizer
from namm.cli import main
from namm.policies.namm.calibration import FeatureStatistics
from namm.policies.namm.features import FeatureConfig
from tiny_models import tiny_model

PROSE = ("Memory is the faculty of the mind by which data or information is encoded, stored, and retrieved when "
         "needed. It is the retention of information over time for the purpose of influencing future action. ")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama-gqa").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROSE * 2 + "# a code comment\n    \n" + PROSE)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_calibrate_writes_a_usable_checkpoint(capsys, tmp_path, model_dir, prompt_file):
    out = tmp_path / "calib.json"
    code, stdout, err = run_cli(capsys, "calibrate", "--model", str(model_dir), "--prompt-file", str(prompt_file),
                                str(prompt_file), "--n-up", "64", "--out", str(out), "--quiet")
    assert code == 0, err
    assert "calibrated on 2 prompts" in stdout and len(stdout.strip().splitlines()) == 2 + 17
    ckpt = namm.policies.namm.load_namm_checkpoint(out)
    assert (ckpt.std > 0).all() and (ckpt.mean > 0).all() and not ckpt.params.any()
    assert ckpt.provenance["prompts"] == 2 and ckpt.config["features"]["n_up"] == 64
    code, stdout, err = run_cli(capsys, "generate", "--model", str(model_dir), "--policy", "namm", "--checkpoint",
                                str(out), "--prompt-file", str(prompt_file), "--max-new-tokens", "4", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["cache_tokens_per_layer"] == [result["tokens_seen"]] * 3  # zero parameters keep everything


def test_robust_calibration_centres_on_the_median_and_ignores_outliers(capsys, tmp_path, model_dir, prompt_file):
    stats = FeatureStatistics(FeatureConfig(n_up=64), robust=True)
    body = torch.linspace(-1.0, 1.0, 999, dtype=torch.float64)[:, None].expand(-1, 17)
    stats.sample, stats.count = [torch.cat([body, torch.full((1, 17), 1e6, dtype=torch.float64)])], 1000
    centre, spread = stats.statistics()
    # the uniform body on [-1, 1]: median 0, IQR 1, whatever the one outlier (a mean would sit near 1,000)
    torch.testing.assert_close(centre, torch.zeros(17), atol=2e-3, rtol=0)
    torch.testing.assert_close(spread, torch.full((17,), 1.0 / 1.3489795), atol=2e-3, rtol=0)
    out = tmp_path / "robust.json"
    code, stdout, err = run_cli(capsys, "calibrate", "--model", str(model_dir), "--prompt-file", str(prompt_file),
                                "--n-up", "64", "--robust", "--out", str(out), "--quiet")
    assert code == 0, err
    assert "median" in stdout
    robust = namm.policies.namm.load_namm_checkpoint(out)
    assert robust.provenance["statistics"] == "median, IQR / 1.349" and (robust.std > 0).all()


def test_calibrate_gives_an_existing_namm_this_models_statistics(capsys, tmp_path, model_dir, prompt_file):
    source = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=64)
    params = torch.randn(source.num_params, generator=torch.Generator().manual_seed(1))
    config = {**source.config(), "selection": {"threshold": -0.75, "pool": 3, "mode": "budget"}}
    record = {"kind": "calibration", "model": "elsewhere", "statistics": "median, IQR / 1.349"}
    namm.policies.namm.save_namm_checkpoint(tmp_path / "src.json", params, torch.full((17,), 9.0),
                                            torch.full((17,), 3.0), config, {"model": "elsewhere",
                                                                             "normalization": record})
    out = tmp_path / "adapted.json"
    code, stdout, err = run_cli(capsys, "calibrate", "--model", str(model_dir), "--checkpoint", str(tmp_path / "src.json"),
                                "--prompt-file", str(prompt_file), "--out", str(out), "--quiet")
    assert code == 0, err
    assert "median" in stdout, "the source's robust statistics are the default"
    adapted = namm.policies.namm.load_namm_checkpoint(out)
    assert torch.equal(adapted.params, params) and adapted.config == config
    assert not torch.equal(adapted.mean, torch.full((17,), 9.0)) and (adapted.std > 0).all()
    assert adapted.provenance["model"] == "elsewhere" and adapted.provenance["recalibrated_from"] == str(tmp_path / "src.json")
    assert adapted.provenance["normalization"]["model"] == str(model_dir)
    assert adapted.provenance["normalization"]["statistics"] == "median, IQR / 1.349"
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model_dir), "--prompt-file", str(prompt_file),
                           "--n-up", "64", "--robust", "--scorer", "mlp", "--out", str(tmp_path / "ref.json"), "--quiet")
    assert code == 0, err
    reference = namm.policies.namm.load_namm_checkpoint(tmp_path / "ref.json")  # the same prompts, from scratch
    assert torch.equal(adapted.mean, reference.mean) and torch.equal(adapted.std, reference.std)
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model_dir), "--checkpoint", str(tmp_path / "src.json"),
                           "--prompt-file", str(prompt_file), "--n-up", "32", "--out", str(tmp_path / "x.json"))
    assert code == 2 and "--n-up cannot be set with --checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_calibrate_errors(capsys, tmp_path, model_dir, prompt_file):
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model_dir), "--prompt-file", str(prompt_file),
                           "--n-up", "4096", "--out", str(tmp_path / "x.json"))
    assert code == 2 and "shorter than --n-up 4096" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model_dir), "--prompt-file", str(tmp_path / "nope.txt"),
                           "--out", str(tmp_path / "x.json"))
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(capsys, "calibrate", "--model", str(model_dir), "--task", "no-such-task",
                           "--out", str(tmp_path / "x.json"))
    assert code == 2 and "unknown task 'no-such-task'" in err


def test_inspect_writes_html_png_and_json(capsys, tmp_path, model_dir, prompt_file):
    policy = namm.make_policy("namm", checkpoint="zeros", n_up=64)
    policy.params = torch.randn(policy.num_params, generator=torch.Generator().manual_seed(0)) * 0.5
    ckpt = tmp_path / "random.json"
    namm.policies.namm.save_namm_checkpoint(ckpt, policy.params, torch.zeros(17), torch.full((17,), 0.05),
                                            policy.config(), {"source": "test"})
    out = tmp_path / "inspect"
    code, stdout, err = run_cli(capsys, "inspect", "--model", str(model_dir), "--checkpoint", str(ckpt),
                                "--prompt-file", str(prompt_file), "--max-new-tokens", "70", "--out", str(out))
    assert code == 0, err
    data = json.loads((out / "retention.json").read_text())
    seen = len(data["token_ids"]) - 1
    retention = torch.tensor(data["retention_per_layer"])
    assert retention.shape == (3, seen)
    assert retention.min() < 1 and retention[:, -1].eq(1).all()  # some tokens dropped, the newest kept
    final = data["final"]
    assert final["tokens_seen"] == seen and max(final["tokens_per_layer"]) < seen
    assert [u["tokens_seen"] for u in data["updates"]] == list(range(64, seen + 1, 64))
    page = (out / "retention.html").read_text()
    assert page.count('class="t"') >= len(data["token_ids"]) and "cache_size.png" in page
    assert (out / "cache_size.png").read_bytes().startswith(b"\x89PNG")
    assert "retention.html" in stdout


def test_inspect_full_policy_and_bad_checkpoint(capsys, tmp_path, model_dir, prompt_file):
    code, _, err = run_cli(capsys, "inspect", "--model", str(model_dir), "--policy", "full", "--prompt-file",
                           str(prompt_file), "--max-new-tokens", "2", "--out", str(tmp_path / "full"))
    assert code == 0, err
    data = json.loads((tmp_path / "full" / "retention.json").read_text())
    assert all(v == 1 for row in data["retention_per_layer"] for v in row)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    (tmp_path / "bad.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, "inspect", "--model", str(model_dir), "--checkpoint", str(bad), "--prompt-file",
                           str(prompt_file), "--out", str(tmp_path / "o"))
    assert code == 2 and "malformed NAMM checkpoint" in err and err.count("\n") == 1
