"""Evolution: CMA-ES settings and state, fitness normalisation, batched population scoring,
resume and staged training, the CLI and 2-process torchrun — all on tiny random models."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import namm
from namm.evolve.cmaes import CMAES, CMAESConfig, recombination_weights
from namm.evolve.fitness import MemoryTerm, PopulationScorer, normalised_fitness, tokenize_samples
from namm.evolve.trainer import EvolveConfig, Trainer
from namm.policies.namm.checkpoint import load_namm_checkpoint, save_namm_checkpoint, zeros_checkpoint
from namm.tasks.registry import get_task
from fixtures.byte_tokenizer import byte_tokenizer
from test_evolve_helpers import save_tiny_model
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def sphere(params: torch.Tensor) -> torch.Tensor:
    return -((params - 0.3) ** 2).sum(1)


def run_generations(opt: CMAES, n: int) -> None:
    for _ in range(n):
        opt.tell(sphere(opt.ask()))


# ---------------------------------------------------------------- CMA-ES

def test_defaults_follow_the_paper():
    opt = CMAES(CMAESConfig(num_params=50))
    weights = opt.es.sp.weights
    assert (opt.config.popsize, opt.config.elite, opt.config.sigma0) == (32, 16, 0.065)
    assert weights.mu == 16 and len(weights) == 32
    expected = [math.log(33 / 2) - math.log(i + 1) for i in range(16)]
    np.testing.assert_allclose(weights.positive_weights, np.array(expected) / sum(expected))
    np.testing.assert_allclose(recombination_weights(32, 16), weights.positive_weights)
    assert min(weights) < 0  # active CMA: the worst members get negative weights
    assert torch.equal(opt.mean, torch.zeros(50)) and opt.sigma == 0.065


@pytest.mark.parametrize("separable", [True, False])
def test_cmaes_state_round_trips_exactly(tmp_path, separable):
    config = CMAESConfig(num_params=20, popsize=8, elite=4, separable=separable, seed=5)
    straight = CMAES(config)
    run_generations(straight, 6)
    first = CMAES(config)
    run_generations(first, 2)
    first.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmaes_state.json", "cmaes_state.safetensors"]
    resumed = CMAES.load(tmp_path)
    assert resumed.generation == 2 and torch.equal(resumed.mean, first.mean)
    run_generations(resumed, 4)
    assert torch.equal(resumed.mean, straight.mean)
    assert resumed.sigma == straight.sigma and resumed.generation == straight.generation == 6


def test_cmaes_maximises_fitness():
    opt = CMAES(CMAESConfig(num_params=5, popsize=8, elite=4, sigma0=0.2, seed=1))
    start = float(sphere(opt.mean[None])[0])
    run_generations(opt, 60)
    assert float(sphere(opt.mean[None])[0]) > start / 100


def test_a_mean_learning_rate_below_one_scales_the_first_step_and_is_saved(tmp_path):
    full, damped = (CMAES(CMAESConfig(num_params=6, popsize=8, elite=4, sigma0=0.2, mean_lr=lr, seed=2))
                    for lr in (1.0, 0.25))
    full_samples, damped_samples = full.ask(), damped.ask()
    assert torch.equal(full_samples, damped_samples)  # same seed: the same first population
    full.tell(sphere(full_samples))
    damped.tell(sphere(damped_samples))
    assert float(full.mean.norm()) > 0.05
    torch.testing.assert_close(damped.mean, 0.25 * full.mean)
    damped.save(tmp_path)
    assert CMAES.load(tmp_path).config.mean_lr == 0.25


def test_cmaes_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="elite"):
        CMAESConfig(num_params=4, popsize=8, elite=9)
    with pytest.raises(ValueError, match="learning rate"):
        CMAESConfig(num_params=4, mean_lr=0)
    opt = CMAES(CMAESConfig(num_params=4, popsize=4, elite=2))
    with pytest.raises(RuntimeError, match="without ask"):
        opt.tell([1.0] * 4)
    opt.ask()
    with pytest.raises(ValueError, match="expected 4"):
        opt.tell([1.0] * 3)
    with pytest.raises(FileNotFoundError, match="no CMA-ES state"):
        CMAES.load(tmp_path)


# ---------------------------------------------------------------- fitness

def test_fitness_is_normalised_per_task_by_the_full_cache():
    scores = torch.tensor([[1.0, 0.0, 1.0, 0.0],
                           [1.0, 1.0, 0.0, 0.5]])
    full = torch.tensor([1.0, 0.5, 0.0, 0.0])  # task 0 full mean 0.75; task 1 full cache scores 0
    tasks = torch.tensor([0, 0, 1, 1])
    fitness = normalised_fitness(scores, full, tasks)
    # member 0: task 0 -> 0.5 / 0.75, task 1 -> 1 + 0.5 ; member 1: 1 / 0.75 and 1 + 0.25
    expected = torch.tensor([(0.5 / 0.75 + 1.5) / 2, (1 / 0.75 + 1.25) / 2], dtype=torch.float64)
    torch.testing.assert_close(fitness, expected)
    fraction = torch.tensor([[0.9, 0.7, 0.8, 0.6], [0.3, 0.4, 0.5, 0.4]])
    penalised = normalised_fitness(scores, full, tasks, fraction, MemoryTerm(target=0.5, weight=2.0))
    torch.testing.assert_close(penalised, expected - torch.tensor([2 * 0.25, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="memory target"):
        MemoryTerm(target=1.5)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama-gqa"), byte_tokenizer()


def tiny_config(**overrides) -> EvolveConfig:
    base = dict(model="tiny", tasks=["passkey", "kv_retrieval"], length=300, generations=3, prompts_per_task=2,
                train_prompts=3, population=4, separable=True, eval_every=2, n_up=128, scorer="bam",
                memory_target=0.4)
    return EvolveConfig(**{**base, **overrides})


def test_batched_population_matches_one_by_one(tiny):
    model, tokenizer = tiny
    task = get_task("passkey")
    prompts = tokenize_samples(tokenizer, model, [(0, s) for s in task.samples(tokenizer, 330, 2, seed=1)])
    policy = namm.make_policy("namm", checkpoint="zeros", n_up=128)
    params = torch.randn(4, policy.num_params, generator=torch.Generator().manual_seed(0)) * 0.2
    scorer = PopulationScorer(model, tokenizer, policy, progress=False)
    batched = scorer.members(params, prompts, batched=True)
    alone = scorer.members(params, prompts, batched=False)
    assert batched.cache_fraction.unique().numel() > 2  # members really differ
    torch.testing.assert_close(batched.cache_fraction, alone.cache_fraction, rtol=0, atol=0)
    torch.testing.assert_close(batched.scores, alone.scores, rtol=0, atol=0)
    assert policy.population is None  # the scorer restores the policy


# ---------------------------------------------------------------- trainer

def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    model, tokenizer = tiny
    straight = Trainer(tiny_config(), tmp_path / "a", model, tokenizer, progress=False)
    straight.start()
    straight.run()
    first = Trainer(tiny_config(generations=1), tmp_path / "b", model, tokenizer, progress=False)
    first.start()
    first.run()
    resumed = Trainer(tiny_config(), tmp_path / "b", model, tokenizer, progress=False)
    resumed.resume()
    assert resumed.cmaes.generation == 1
    resumed.run()
    assert resumed.cmaes.generation == 3
    assert torch.equal(resumed.cmaes.mean, straight.cmaes.mean)
    keys = ["generation", "fitness_best", "fitness_mean", "cache_fraction_mean", "sigma"]
    rows = lambda d: [{k: r[k] for k in keys} for r in (json.loads(l) for l in (d / "log.jsonl").open())]  # noqa: E731
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    out = tmp_path / "a"
    assert (out / "curve.png").stat().st_size > 0 and (out / "log.csv").read_text().startswith("generation,")
    best = load_namm_checkpoint(out / "best")
    assert best.provenance["generation"] in (2, 3) and best.provenance["tasks"] == ["passkey", "kv_retrieval"]
    assert best.provenance["normalization"] == {"kind": "calibration", "model": best.provenance["model"],
                                                "task": "passkey", "statistics": "mean, std"}
    assert torch.equal(best.mean, straight.policy.normalization.mean)
    namm.make_policy("namm", checkpoint=str(out / "best"))  # loads as a policy
    means = sorted(d.name for d in (out / "means").iterdir())
    assert means == ["gen-0002", "gen-0003"]  # every evaluated mean is kept as a candidate
    assert torch.equal(load_namm_checkpoint(out / "means" / "gen-0003").params, straight.cmaes.mean.float())
    chosen = load_namm_checkpoint(out / "means" / f"gen-{best.provenance['generation']:04d}")
    assert torch.equal(chosen.params, best.params)


def test_init_from_keeps_cma_state_and_statistics(tiny, tmp_path):
    model, tokenizer = tiny
    stage1 = Trainer(tiny_config(tasks=["passkey"], generations=2), tmp_path / "s1", model, tokenizer, progress=False)
    stage1.start()
    stage1.run()
    stage2 = Trainer(tiny_config(generations=1, init_from=str(tmp_path / "s1")), tmp_path / "s2", model, tokenizer,
                     progress=False)
    stage2.start()
    assert stage2.cmaes.generation == 2 and torch.equal(stage2.cmaes.mean, stage1.cmaes.mean)
    assert stage2.cmaes.sigma == stage1.cmaes.sigma
    assert torch.equal(stage2.policy.normalization.std, stage1.policy.normalization.std)
    inherited = load_namm_checkpoint(tmp_path / "s2" / "normalization").provenance["normalization"]
    assert inherited == load_namm_checkpoint(tmp_path / "s1" / "best").provenance["normalization"]
    stage2.run()
    assert stage2.cmaes.generation == 3
    with pytest.raises(ValueError, match="same"):
        Trainer(tiny_config(population=6, init_from=str(tmp_path / "s1")), tmp_path / "s3", model, tokenizer,
                progress=False).start()


def test_init_checkpoint_centres_a_fresh_cmaes_on_its_parameters(tiny, tmp_path):
    model, tokenizer = tiny
    zeros = zeros_checkpoint("mlp")
    params = torch.randn(zeros.params.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    std = zeros.std * 2 + 0.5
    calibration = {"kind": "calibration", "model": "elsewhere", "statistics": "median, IQR / 1.349"}
    save_namm_checkpoint(tmp_path / "start", params, zeros.mean, std, zeros.config, {"normalization": calibration})
    run = Trainer(tiny_config(generations=1, scorer="mlp", init_checkpoint=str(tmp_path / "start")), tmp_path / "r",
                  model, tokenizer, progress=False)
    run.start()
    assert run.cmaes.generation == 0 and run.cmaes.sigma == 0.065
    assert torch.allclose(run.cmaes.mean, params)
    assert torch.equal(run.policy.normalization.std, std), "the checkpoint's statistics, not a new calibration"
    start_row, = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").open()]
    assert start_row["generation"] == 0 and "fitness_best" not in start_row, "the start is scored, not a population"
    best = load_namm_checkpoint(tmp_path / "r" / "best")
    assert torch.allclose(best.params, params) and best.provenance["generation"] == 0
    assert best.provenance["mean_fitness"] == start_row["eval_fitness"]
    assert best.provenance["normalization"] == calibration, "the statistics' record travels with them"
    run.run()
    assert run.cmaes.generation == 1
    rows = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").open()]
    assert [r["generation"] for r in rows] == [0, 1] and (tmp_path / "r" / "curve.png").stat().st_size > 0
    kept = load_namm_checkpoint(tmp_path / "r" / "best").provenance
    assert kept["mean_fitness"] == max(r["eval_fitness"] for r in rows), "best/ is the better of start and mean"
    with pytest.raises(ValueError, match="scorer"):
        Trainer(tiny_config(scorer="bam", init_checkpoint=str(tmp_path / "start")), tmp_path / "b", model, tokenizer,
                progress=False).start()
    with pytest.raises(ValueError, match="not both"):
        tiny_config(init_from=str(tmp_path / "r"), init_checkpoint=str(tmp_path / "start"))


def test_a_linear_start_lifts_exactly_into_one_hidden_layer(tiny, tmp_path):
    model, tokenizer = tiny
    zeros = zeros_checkpoint("mlp")
    params = torch.randn(zeros.params.shape, generator=torch.Generator().manual_seed(4)) * 0.5
    save_namm_checkpoint(tmp_path / "start", params, zeros.mean, zeros.std, zeros.config)
    rows = {}
    for name, hidden in [("linear", None), ("hidden", [3])]:
        run = Trainer(tiny_config(generations=1, scorer="mlp", hidden=hidden, init_checkpoint=str(tmp_path / "start")),
                      tmp_path / name, model, tokenizer, progress=False)
        run.start()
        rows[name], = [json.loads(line) for line in (tmp_path / name / "log.jsonl").open()]
    assert run.cmaes.config.num_params == 25 * 3 + 3 + 3 + 1
    assert load_namm_checkpoint(tmp_path / "hidden" / "best").config["scorer"] == {"kind": "mlp", "hidden": [3]}
    assert 0 < rows["linear"]["eval_cache_fraction"] < 1, "the start evicts, so the check can fail"
    for key in ("eval_fitness", "eval_cache_fraction"):
        assert rows["hidden"][key] == pytest.approx(rows["linear"][key], abs=1e-9), key
    with pytest.raises(ValueError, match="only a linear mlp lifts"):
        Trainer(tiny_config(scorer="mlp", hidden=[2, 2], init_checkpoint=str(tmp_path / "start")), tmp_path / "deep",
                model, tokenizer, progress=False).start()


def test_pool_overrides_the_starts_and_is_recorded(tiny, tmp_path):
    model, tokenizer = tiny
    zeros = zeros_checkpoint("mlp")
    save_namm_checkpoint(tmp_path / "start", zeros.params, zeros.mean, zeros.std, zeros.config)
    run = Trainer(tiny_config(generations=1, scorer="mlp", init_checkpoint=str(tmp_path / "start"), pool=5),
                  tmp_path / "r", model, tokenizer, progress=False)
    run.start()
    assert run.policy.pool == 5
    for saved in ("normalization", "best"):
        assert load_namm_checkpoint(tmp_path / "r" / saved).config["selection"]["pool"] == 5
    stage2 = Trainer(tiny_config(generations=2, scorer="mlp", init_from=str(tmp_path / "r")), tmp_path / "s2", model,
                     tokenizer, progress=False)
    stage2.start()
    assert stage2.policy.pool == 5, "a later stage inherits the pool"
    with pytest.raises(ValueError, match="--pool must be an odd integer"):
        tiny_config(pool=4)


# ---------------------------------------------------------------- CLI and torchrun

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evolve_cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    if nproc == 1:
        cmd = [sys.executable, "-m", "namm", "evolve", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "namm", "evolve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_cli_end_to_end_and_torchrun_matches_one_process(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    common = ["--model", str(model_dir), "--tasks", "passkey", "--length", "300", "--prompts-per-task", "2",
              "--train-prompts", "2", "--population", "4", "--generations", "2", "--eval-every", "2",
              "--n-up", "128", "--separable", "--memory-target", "0.4"]
    single = evolve_cli([*common, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    assert "best mean fitness" in single.stdout
    double = evolve_cli([*common, "--out", str(tmp_path / "two")], nproc=2)
    assert double.returncode == 0, double.stderr
    one, two = CMAES.load(tmp_path / "one" / "state"), CMAES.load(tmp_path / "two" / "state")
    assert one.generation == two.generation == 2
    assert torch.equal(one.mean, two.mean) and one.sigma == two.sigma
    log = lambda d: [json.loads(l)["fitness_mean"] for l in (tmp_path / d / "log.jsonl").open()]  # noqa: E731
    # the same members and ranking; the fitness values themselves may differ in the last float32 bits,
    # since one process and two sum the same products with different thread counts
    assert log("one") == pytest.approx(log("two"), rel=1e-5, abs=1e-6)
    again = evolve_cli(["--resume", str(tmp_path / "one"), "--generations", "3"])
    assert again.returncode == 0, again.stderr
    assert CMAES.load(tmp_path / "one" / "state").generation == 3


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task", "--length", "600", "--generations", "1", "--out", "{tmp}/x"], "unknown task"),
    (["--tasks", "passkey", "--length", "300", "--generations", "1", "--out", "{tmp}/x"], "must exceed --n-up"),
    (["--tasks", "passkey", "--length", "600", "--generations", "1", "--population", "8", "--elite", "6",
      "--out", "{tmp}/x"], "elite must be"),
    (["--tasks", "passkey", "--length", "600", "--generations", "1", "--mean-lr", "1.5", "--out", "{tmp}/x"],
     "mean's learning rate"),
    (["--tasks", "passkey", "--length", "300"], "missing --generations, --out"),
    (["--resume", "{tmp}/nothing"], "no evolution run"),
    (["--tasks", "passkey", "--length", "300", "--generations", "1", "--prompts-per-task", "9",
      "--train-prompts", "4", "--out", "{tmp}/y"], "exceeds --train-prompts"),
])
def test_cli_bad_input_gives_one_line_error(tmp_path, capsys, args, message):
    from namm.cli import main

    code = main(["evolve", *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("namm evolve: error:")
