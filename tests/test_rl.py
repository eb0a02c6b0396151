"""The Decision Transformer path (namm.rl): DT through namm's runtime, trajectories, rollouts, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import namm
from namm.cli import main
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.rl.model import DecisionTransformer, DTConfig, load_dt, save_dt


def tiny_dt(seed: int = 0) -> DecisionTransformer:
    torch.manual_seed(seed)
    return DecisionTransformer(DTConfig(hidden=32, layers=2, heads=2, kv_heads=1, max_steps=60)).eval()


def random_episode(steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rtg = torch.arange(steps, 0, -1, dtype=torch.float32)[None]
    return rtg, torch.randn(1, steps, 4, generator=gen) * 0.1, torch.randint(0, 2, (1, steps), generator=gen)


@torch.inference_mode()
def test_full_policy_through_runtime_equals_plain_forward():
    model = tiny_dt()
    rtg, states, actions = random_episode(50)
    plain = model(rtg, states, actions)[0]  # (T, actions) at the state tokens
    tokens = model.sequence(rtg, states, actions)[0]
    runner = MemoryRunner(model.decoder, namm.make_policy("full"), 1)
    stepwise = []
    with memory_attention_enabled(model.decoder):
        for t in range(50):  # as in a rollout: a_{t-1}, R_t, s_t, then read the action logits
            stepwise.append(runner.feed([tokens[max(3 * t - 1, 0):3 * t + 2]])[0])
        chunked = MemoryRunner(model.decoder, namm.make_policy("full"), 1, chunk_size=16)
        every = chunked.feed([tokens[:-1]], all_logits=True)[0]
    torch.testing.assert_close(torch.stack(stepwise), plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(every[1::3], plain, atol=1e-5, rtol=1e-5)


def test_plain_forward_ignores_right_padding():
    model = tiny_dt()
    rtg, states, actions = random_episode(20)
    pad = lambda t: torch.cat([t, torch.zeros_like(t[:, :5])], dim=1)  # noqa: E731
    mask = torch.arange(25)[None] < 20
    with torch.inference_mode():
        torch.testing.assert_close(model(pad(rtg), pad(states), pad(actions), mask)[0, :20],
                                   model(rtg, states, actions)[0], atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_dt(seed=3)
    tensors, config = save_dt(model, tmp_path / "dt")
    assert tensors.is_file() and json.loads(config.read_text())["config"]["hidden"] == 32
    loaded = load_dt(config)
    rtg, states, actions = random_episode(10)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(rtg, states, actions), model(rtg, states, actions))
    with pytest.raises(FileNotFoundError, match="no Decision Transformer"):
        load_dt(tmp_path / "missing")


def test_training_is_deterministic():
    pytest.importorskip("gymnasium")
    from namm.rl.train import train_dt

    a, b = (train_dt(episodes=3, steps=2, batch_size=2, max_epsilon=1.0, hidden=16, layers=1, heads=2, kv_heads=1,
                     log=None) for _ in range(2))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.config.observed == [0, 2] and a.embed_state.in_features == 2


def test_shipped_dt_loads():
    model = load_dt()
    assert model.config.env == "CartPole-v1" and model.config.max_steps == 500


def test_trajectories_are_deterministic_and_mixed():
    pytest.importorskip("gymnasium")
    from namm.rl.data import expert_actions, generate_trajectories

    a, b = generate_trajectories(6, seed=3), generate_trajectories(6, seed=3)
    for x, y in zip(a, b):
        assert x.epsilon == y.epsilon
        np.testing.assert_array_equal(x.states, y.states)
        np.testing.assert_array_equal(x.actions, y.actions)
    assert [x.epsilon for x in generate_trajectories(6, seed=4)] != [x.epsilon for x in a]
    for x in a:
        assert 0 <= x.epsilon <= 0.4 and x.returns_to_go()[0] == x.ret == len(x.actions)
        np.testing.assert_array_equal(x.actions != expert_actions(x.states), x.flipped)
    assert all(x.ret == 500 for x in generate_trajectories(2, seed=0, epsilon=0.0))


def test_rollout_with_namm_runs_and_evicts():
    pytest.importorskip("gymnasium")
    from namm.rl.rollout import rollout

    model = tiny_dt()
    full = rollout(model, namm.make_policy("full"), [1, 2, 3])
    assert (full.updates == 0).all() and np.allclose(full.kv_fraction_end, 1.0)
    threshold = rollout(model, namm.make_policy("namm", checkpoint="smollm2-135m", n_up=16, schedule="progressive"),
                        [1, 2, 3])
    assert (threshold.lengths >= 1).all() and (threshold.updates > 0).any()
    budget = rollout(model, namm.make_policy("namm", checkpoint="smollm2-135m", budget=0.5, n_up=16,
                                            schedule="progressive"), [1, 2, 3])
    assert (budget.updates > 0).any()
    assert np.nanmax(budget.kv_fraction) <= 0.5 + 1e-9 and (budget.kv_fraction_end < 1).any()
    assert (budget.returns == budget.lengths).all()  # CartPole: one reward per step


def test_cli_train_and_eval_tiny(tmp_path, capsys):
    pytest.importorskip("gymnasium")
    stem = tmp_path / "dt"
    assert main(["rl", "train", "--out", str(stem), "--episodes", "3", "--steps", "1", "--batch-size", "2",
                 "--max-epsilon", "1.0"]) == 0
    out = tmp_path / "results"
    assert main(["rl", "eval", "--dt", str(stem) + ".json", "--seeds", "0", "--episodes", "2", "--n-up", "32",
                 "--retention-episodes", "1", "--extra-budgets", "0.5", "--out", str(out)]) == 0
    record = json.loads((out / "rl.json").read_text())
    assert [r["policy"] for r in record["rows"]] == ["full", "namm (smollm2-135m)", "recency", "h2o", "recency", "h2o",
                                                     "namm (smollm2-135m) budget mode"]
    assert record["checkpoint_source"] == "smollm2-135m"
    paired = [(d["policy"], d["baseline"], d["budget"]) for d in record["paired"]]
    matched = record["matched_budget"]
    assert paired == [("namm (smollm2-135m)", "full", matched), ("namm (smollm2-135m)", "recency", matched),
                      ("namm (smollm2-135m)", "h2o", matched), ("namm (smollm2-135m) budget mode", "full", 0.5),
                      ("namm (smollm2-135m) budget mode", "recency", 0.5), ("namm (smollm2-135m) budget mode", "h2o", 0.5)]
    assert "return difference, paired" in (out / "rl.md").read_text()
    assert "evolved on smollm2-135m's text" in (out / "rl.md").read_text()
    assert (out / "rl_retention.png").is_file()
    assert main(["rl", "eval", "--seeds", "x"]) == 2
    assert "comma-separated list" in capsys.readouterr().err


def test_cli_rejects_a_flip_probability_outside_0_1(tmp_path, capsys):
    for action in (["train", "--out", str(tmp_path / "dt")], ["calibrate", "--checkpoint", "smollm2-135m",
                                                               "--out", str(tmp_path / "namm")]):
        assert main(["rl", *action, "--max-epsilon", "1.5"]) == 2
        assert "--max-epsilon must be in [0, 1]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_paired_rows_pair_each_namm_with_the_baselines_at_its_budget():
    from namm.rl.benchmark import paired_rows

    def row(policy, budget, returns):
        return {"policy": policy, "budget": budget, "returns": returns}

    rows = [row("full", None, [9.0, 9.0]), row("namm (x)", None, [5.0, 7.0]), row("recency", 0.3, [4.0, 4.0]),
            row("h2o", 0.3, [5.0, 7.0]), row("recency", 0.1, [1.0, 2.0]), row("namm (x) budget mode", 0.1, [3.0, 3.0])]
    paired = paired_rows(rows)
    assert [(d["policy"], d["baseline"], d["budget"], d["difference"]) for d in paired] == [
        ("namm (x)", "full", 0.3, -3.0), ("namm (x)", "recency", 0.3, 2.0), ("namm (x)", "h2o", 0.3, 0.0),
        ("namm (x) budget mode", "full", 0.1, -6.0), ("namm (x) budget mode", "recency", 0.1, 1.5)]
    assert paired[2]["lo"] == paired[2]["hi"] == 0.0 and paired[1]["lo"] > 0 and paired[0]["hi"] < 0


def test_cli_calibrate_gives_a_namm_the_dts_statistics(tmp_path, capsys):
    pytest.importorskip("gymnasium")
    from namm.rl.calibration import episode_statistics
    from namm.rl.data import generate_trajectories
    from namm.rl.rollout import rollout

    save_dt(tiny_dt(), tmp_path / "dt")
    source = namm.make_policy("namm", checkpoint="zeros", n_up=32)
    params = torch.randn(source.num_params, generator=torch.Generator().manual_seed(1))
    config = {**source.config(), "selection": {"threshold": 0.0, "pool": 1, "mode": "threshold"}}
    record = {"kind": "calibration", "model": "elsewhere", "statistics": "mean, std"}
    namm.policies.namm.save_namm_checkpoint(tmp_path / "src.json", params, torch.full((17,), 9.0),
                                            torch.full((17,), 3.0), config, {"model": "elsewhere",
                                                                             "normalization": record})
    out = tmp_path / "on-dt.json"
    assert main(["rl", "calibrate", "--checkpoint", str(tmp_path / "src.json"), "--dt", str(tmp_path / "dt.json"),
                 "--episodes", "2", "--out", str(out)]) == 0
    assert "bin   mean" in capsys.readouterr().out, "the source's kind of statistics is the default"
    adapted = namm.policies.namm.load_namm_checkpoint(out)
    assert torch.equal(adapted.params, params) and adapted.config == config
    assert adapted.provenance["model"] == "elsewhere"
    assert adapted.provenance["normalization"]["model"] == f"decision transformer {tmp_path / 'dt.json'}"
    episodes = generate_trajectories(2, seed=7, max_epsilon=0.4)  # the command's defaults
    mean, std = episode_statistics(load_dt(tmp_path / "dt.json"), episodes, adapted.features)
    assert torch.equal(adapted.mean, mean) and torch.equal(adapted.std, std) and (std > 0).all()
    assert not torch.allclose(mean, torch.full((17,), 9.0))
    run = rollout(load_dt(tmp_path / "dt.json"), namm.make_policy("namm", checkpoint=str(out), schedule="progressive"),
                  [1])
    assert (run.updates > 0).all()
    assert main(["rl", "calibrate", "--checkpoint", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "x").exists()
