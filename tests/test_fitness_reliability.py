"""benchmarks/fitness_reliability.py on a tiny campaign: disjoint stratified draws, and the whole
pool's fitness is the run's own fitness of the same members."""

from __future__ import annotations

import pytest
import torch
from benchmark_modules import load_benchmark
from test_evolve_helpers import save_tiny_model

import namm
from namm.evolve.cmaes import CMAES
from namm.evolve.fitness import answer_fitness
from namm.evolve.trainer import EvolveConfig, Trainer


def test_stratified_halves_are_disjoint_with_k_prompts_of_every_task():
    module = load_benchmark("fitness_reliability")
    tasks = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    a, b = module.stratified_halves(tasks, 2, torch.Generator().manual_seed(0))
    assert not set(a.tolist()) & set(b.tolist())
    assert torch.bincount(tasks[a]).tolist() == [2, 2, 2] == torch.bincount(tasks[b]).tolist()


def test_the_whole_pool_fitness_is_the_runs_fitness(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    model, tokenizer = namm.load_model(str(model_dir))
    config = EvolveConfig(model=str(model_dir), tasks=["passkey", "kv_retrieval"], length=330, generations=1,
                          prompts_per_task=1, train_prompts=2, population=4, separable=True, eval_every=1, n_up=128,
                          scorer="mlp", fitness="margin", evaluator="proxy", budgets=[0.2, 0.6])
    trainer = Trainer(config, tmp_path / "run", model, tokenizer, progress=False)
    trainer.start()
    trainer.run()
    module = load_benchmark("fitness_reliability")
    result = module.main(["--run", str(tmp_path / "run"), "--model", str(model_dir), "--per-task", "1",
                          "--draws", "20", "--budgets", "0.3,0.6", "--around", str(tmp_path / "run" / "best"),
                          "--record-cache", str(tmp_path / "records"), "--out", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").exists() and result["pool_per_task"] == 2
    assert len(list((tmp_path / "records").glob("*.safetensors"))) == len(trainer.pool)  # the pool's recordings kept
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit):  # a record cache that is not a folder stops before the model loads
        module.main(["--run", str(tmp_path / "run"), "--record-cache", str(tmp_path / "a-file")])
    assert "output path is not a directory" in capsys.readouterr().err
    state_set, around_set = result["sets"].values()
    assert list(result["sets"])[1] == f"around:{tmp_path / 'run' / 'best'}"
    for budget in ("0.3", "0.6"):
        row = state_set["budgets"][budget]["per_task"][1]
        assert all(-1 <= row[key]["mean"] <= 1 for key in ("split_half", "vs_pool"))
        assert len(around_set["budgets"][budget]["fitness"]) == 4
    params = CMAES.load(tmp_path / "run" / "state").ask()
    trainer.policy.set_budget(0.3)
    scores = trainer.scorer.members(params, trainer.pool).scores
    full = trainer.scorer.full(trainer.pool, config.eval_batch_size)
    expected = answer_fitness(scores, full, torch.tensor([p.task for p in trainer.pool]))
    assert torch.allclose(torch.tensor(state_set["budgets"]["0.3"]["fitness"]), expected.float(), atol=1e-5)
    assert -1 <= state_set["across_budgets"]["0.3,0.6"] <= 1
