"""Devices and dtypes: ``load_model`` defaults, ``--device``/``--dtype`` on every command (bfloat16
results close to float32 on a tiny model), and tensors kept on the model's device (checked on the
``meta`` device where the computation allows it)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import namm
from namm.cli import main
from namm.eval.perplexity import piece_nll
from namm.less import KernelConfig, LessKernels, LessPolicy
from namm.memory.cache import MemoryCache
from namm.memory.generation import seeded_generator
from namm.policies.namm.checkpoint import load_namm_checkpoint
from namm.policies.random_policy import random_scores
from test_evolve_helpers import save_tiny_model
from tiny_models import random_prompt, tiny_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAMM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "prompt.txt"
    path.write_text("The memory keeps what the model needs and forgets the rest. " * 4)
    return str(path)


def test_load_model_devices_and_dtypes(model_dir):
    model, _ = namm.load_model(model_dir)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device.type == expected
    assert model.dtype == (torch.float32 if expected == "cpu" else torch.bfloat16)
    model, _ = namm.load_model(model_dir, device="cpu", dtype="bfloat16")
    assert model.device.type == "cpu" and model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        namm.load_model(model_dir, device="cpu", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            namm.load_model(model_dir, device="cuda")


def run(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def close(a: float, b: float, rel: float = 0.1) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-3)


# Each command: (argv given the model dir, the prompt file and an output dir; what to compare).
COMMANDS = {
    "generate": lambda d, p, o: ["generate", "--model", d, "--prompt-file", p, "--policy", "h2o", "--budget", "0.5",
                                 "--n-up", "32", "--max-new-tokens", "4", "--json"],
    "eval": lambda d, p, o: ["eval", "--model", d, "--task", "perplexity", "--length", "96", "--samples", "1",
                             "--policy", "h2o", "--budget", "0.5", "--n-up", "32", "--out", o],
    "compare": lambda d, p, o: ["compare", "--model", d, "--policies", "full,recency", "--budgets", "0.5",
                                "--tasks", "passkey", "--length", "300", "--samples", "1", "--n-up", "64", "--out", o],
    "calibrate": lambda d, p, o: ["calibrate", "--model", d, "--prompt-file", p, "--n-up", "32",
                                  "--out", f"{o}/stats.json"],
    "inspect": lambda d, p, o: ["inspect", "--model", d, "--prompt-file", p, "--policy", "h2o", "--budget", "0.5",
                                "--n-up", "32", "--max-new-tokens", "3", "--out", o],
    "bench": lambda d, p, o: ["bench", "--model", d, "--prefill-tokens", "64", "--decode-context", "64",
                              "--decode-tokens", "3", "--policies", "recency", "--repeats", "1", "--out", o],
    "less-train": lambda d, p, o: ["less-train", "--model", d, "--policy", "h2o", "--budget", "0.5", "--n-up", "32",
                                   "--sequences", "2", "--seq-len", "80", "--queries", "8", "--steps", "2",
                                   "--batch", "1", "--hidden", "8", "--rank", "2", "--out", o],
    "demo": lambda d, p, o: ["demo", "--model", d, "--baseline", "recency", "--budget", "0.5", "--length", "300"],
}


def outcome(name: str, out: str, folder: str) -> dict:
    """The figures of a command's run that bfloat16 must reproduce (closely) from float32."""
    if name == "generate":
        result = json.loads(out)
        return {"cache": result["cache_tokens_per_layer"], "seen": result["tokens_seen"],
                "kv_bytes_per_token": result["kv_bytes_full"] / result["tokens_seen"]}
    if name == "eval":
        return {"perplexity": json.load(open(f"{folder}/metrics.json"))["perplexity"]}
    if name == "compare":
        rows = json.load(open(f"{folder}/results.json"))["rows"]
        return {"kv_fraction": [r["kv_fraction"] for r in rows]}
    if name == "calibrate":
        ckpt = load_namm_checkpoint(f"{folder}/stats.json")
        return {"mean": ckpt.mean.tolist()}
    if name == "inspect":
        return {"final": json.load(open(f"{folder}/retention.json"))["final"]}
    if name == "bench":
        return {"written": (json.load(open(f"{folder}/bench.json")) != {})}
    if name == "less-train":
        layers = json.load(open(f"{folder}/less.json"))["provenance"]["layers"]
        return {"policy_mse": [v["policy_mse"] for v in layers.values() if "policy_mse" in v]}
    return {"cache lines": [line for line in out.splitlines() if line.startswith("cache kept per layer")]}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_runs_in_bfloat16_close_to_float32(capsys, tmp_path, model_dir, prompt_file, name):
    results = {}
    for dtype in ("float32", "bfloat16"):
        folder = str(tmp_path / dtype)
        out = run(capsys, [*COMMANDS[name](model_dir, prompt_file, folder), "--device", "cpu", "--dtype", dtype])
        results[dtype] = outcome(name, out, folder)
    full, half = results["float32"], results["bfloat16"]
    if name == "generate":
        assert half["cache"] == full["cache"] and half["seen"] == full["seen"]
        assert half["kv_bytes_per_token"] == full["kv_bytes_per_token"] / 2, "bfloat16 keys and values"
    elif name == "eval":
        assert close(half["perplexity"], full["perplexity"], 0.05)
    elif name == "calibrate":
        assert all(close(a, b, 0.2) for a, b in zip(half["mean"], full["mean"]))
    elif name == "less-train":
        assert half["policy_mse"] and all(close(a, b, 0.2) for a, b in zip(half["policy_mse"], full["policy_mse"]))
    else:
        assert half == full


def test_evolve_and_finalize_run_in_bfloat16(capsys, tmp_path, model_dir):
    run(capsys, ["evolve", "--model", model_dir, "--tasks", "passkey", "--length", "300", "--train-prompts", "2",
                 "--prompts-per-task", "1", "--population", "4", "--generations", "1", "--eval-every", "1",
                 "--n-up", "128", "--separable", "--scorer", "mlp", "--budgets", "0.2,0.6", "--out",
                 str(tmp_path / "run"), "--device", "cpu", "--dtype", "bfloat16"])
    out = run(capsys, ["finalize", "--run", str(tmp_path / "run"), "--target", "0.5", "--prompts", "2",
                       "--out", str(tmp_path / "c.json"), "--device", "cpu", "--dtype", "bfloat16"])
    assert "mean KV fraction" in out


def test_bad_device_gives_one_line_error(capsys, model_dir, prompt_file):
    code = main(["generate", "--model", model_dir, "--prompt-file", prompt_file, "--device", "no-such-device"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("namm generate: error:") and err.count("\n") == 1


def test_bfloat16_generation_and_native_cache_agree():
    model = tiny_model("llama-gqa").to(torch.bfloat16)
    prompt = random_prompt(200)
    ours = namm.generate(model, None, prompt, policy=namm.make_policy("h2o", budget=0.3, n_up=64), max_new_tokens=10)
    memory = namm.cache(model, namm.make_policy("h2o", budget=0.3, n_up=64))
    with torch.inference_mode():
        native = model.generate(prompt[None], cache=memory, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                prefill_chunk_size=128)
    assert native[0, 200:].tolist() == ours.token_ids
    assert ours.kv_bytes_full == ours.tokens_seen * 2 * 3 * 2 * 16 * 2  # bf16: 2 bytes x K+V x 3 layers x 2 heads x 16


def test_seeded_sampling_draws_on_the_logits_device():
    assert seeded_generator(3, torch.device("cpu")).device.type == "cpu"
    model = tiny_model("llama-gqa")
    a = namm.generate(model, None, random_prompt(30), do_sample=True, top_k=10, seed=5, max_new_tokens=6)
    b = namm.generate(model, None, random_prompt(30), do_sample=True, top_k=10, seed=5, max_new_tokens=6)
    assert a.token_ids == b.token_ids


def test_perplexity_scores_on_the_logits_device():
    logits = torch.randn(5, 11, device="meta")
    assert piece_nll(logits, torch.tensor([1, 2, 3, 4, 5])).device.type == "meta"  # targets follow the logits


def test_less_kernels_follow_the_model():
    model = tiny_model("llama-gqa").to(torch.bfloat16)
    policy = LessPolicy(namm.make_policy("h2o", budget=0.3, n_up=32), LessKernels(KernelConfig.for_model(model, 8)))
    policy.bind(model)
    assert {p.dtype for p in policy.kernels.parameters()} == {torch.bfloat16}
    out = namm.generate(model, None, random_prompt(120), policy=policy, max_new_tokens=4)
    assert len(out.token_ids) == 4 and policy.state_nbytes() > 0
    policy.bind(model.to("meta"))
    assert {p.device.type for p in policy.kernels.parameters()} == {"meta"}
    B, Hq, H, Q, K, D = 1, 4, 2, 3, 7, 16
    q = torch.randn(B, Hq, Q, D, device="meta", dtype=torch.bfloat16)
    k = torch.randn(B, H, K, D, device="meta", dtype=torch.bfloat16)
    visible = torch.ones(B, 1, Q, K, dtype=torch.bool, device="meta")
    policy.reset(B)
    policy.state.fold(0, torch.zeros(1, dtype=torch.long, device="meta"), torch.rand(B, H, K, 8, device="meta"),
                      k, visible[:, 0, :1].expand(B, H, K))
    out = policy.attend(0, q, k, k, visible, 0.25)
    assert out.device.type == "meta" and out.shape == q.shape


def test_cache_and_random_scores_stay_on_the_cache_device():
    memory = MemoryCache(namm.make_policy("full"), num_layers=2, batch_size=2, device="meta")
    memory.layers[0].assign(torch.zeros(2, 1, 5, 4, device="meta"), torch.zeros(2, 1, 5, 4, device="meta"),
                            torch.zeros(2, 1, 5, dtype=torch.long, device="meta"))  # layer 1 holds nothing yet
    assert memory.token_counts().device.type == "meta" and memory.nbytes().device.type == "meta"
    positions = torch.arange(6).expand(2, 3, 6).to("meta")
    assert random_scores(0, 1, torch.tensor([6, 6], device="meta"), positions).device.type == "meta"
    seen = torch.tensor([50, 9])
    scores = random_scores(0, 1, seen, torch.arange(50).expand(2, 3, 50))
    assert torch.equal(scores[1:], random_scores(0, 1, seen[1:], torch.arange(50).expand(1, 3, 50)))
    assert not torch.equal(scores[0], scores[1]) and ((scores >= 0) & (scores < 1)).all()
