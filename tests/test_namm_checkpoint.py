"""NAMM checkpoints: round trips, shipped names, and clear errors for malformed files."""

from __future__ import annotations

import json

import pytest
import torch

import namm
from namm.policies.namm import NAMMCheckpoint, load_namm_checkpoint, save_namm_checkpoint, shipped_checkpoints
from namm.policies.namm.checkpoint import namm_config
from namm.policies.namm.features import FeatureConfig


def save_random(path, scorer="bam", n_up=256):
    policy = namm.make_policy("namm", checkpoint="zeros", scorer=scorer)
    params = torch.randn(policy.num_params)
    mean, std = torch.rand(17), torch.rand(17) + 0.1
    where = save_namm_checkpoint(path, params, mean, std, namm_config(FeatureConfig(n_up=n_up), scorer, threshold=0.5),
                                 {"generation": 7})
    return where, params, mean, std


@pytest.mark.parametrize("name", ["ckpt.json", "ckpt.safetensors", "folder"])
def test_round_trip_and_policy_from_path(tmp_path, name):
    where, params, mean, std = save_random(tmp_path / name)
    for path in (tmp_path / name, where):
        ckpt = load_namm_checkpoint(path)
        torch.testing.assert_close(ckpt.params, params)
        torch.testing.assert_close(ckpt.normalization.mean, mean)
        torch.testing.assert_close(ckpt.normalization.std, std)
        assert ckpt.provenance == {"generation": 7}
    policy = namm.make_policy("namm", checkpoint=str(tmp_path / name))
    assert policy.n_up == 256 and policy.threshold == 0.5 and policy.num_params == 4172
    torch.testing.assert_close(policy.params, params)
    assert namm.make_policy("namm", checkpoint=str(where), n_up=512, threshold=0.0).n_up == 512
    assert json.loads(where.read_text())["config"]["scorer"] == {"kind": "bam", "hidden": 32}


def test_policy_takes_a_loaded_checkpoint_and_scorer_must_match(tmp_path):
    where, *_ = save_random(tmp_path / "mlp.json", scorer="mlp")
    ckpt = load_namm_checkpoint(where)
    assert isinstance(ckpt, NAMMCheckpoint)
    assert namm.make_policy("namm", checkpoint=ckpt).num_params == 26
    with pytest.raises(ValueError, match="does not match the checkpoint's scorer"):
        namm.make_policy("namm", checkpoint=str(where), scorer="bam")


def test_zeros_and_shipped_names():
    names = shipped_checkpoints()
    assert names[0] == "zeros"
    for name in names:
        policy = namm.make_policy("namm", checkpoint=name)
        assert policy.normalization.std.shape == (17,) and policy.params.shape == (policy.num_params,)
    with pytest.raises(FileNotFoundError, match="neither a file or directory nor a shipped checkpoint"):
        namm.make_policy("namm", checkpoint="no-such-checkpoint")


def corrupt(path, **changes):
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("damage, error, message", [
    (lambda p: p.write_text("{not json"), ValueError, "not valid JSON"),
    (lambda p: corrupt(p, format="something-else"), ValueError, "not a namm-checkpoint file"),
    (lambda p: corrupt(p, version=99), ValueError, "version 99"),
    (lambda p: corrupt(p, config={"features": {"n_up": 512}, "scorer": {"kind": "bam", "hidden": 16}}), ValueError,
     "scorer needs"),
    (lambda p: corrupt(p, config={"features": {"n_up": 512, "colour": 3}, "scorer": {"kind": "bam"}}), ValueError,
     "bad feature config"),
    (lambda p: corrupt(p, config={"features": {}, "scorer": {"kind": "lstm"}}), ValueError, "unknown NAMM scorer"),
    (lambda p: corrupt(p, config={"features": {"window": 16}, "scorer": {"kind": "bam"}}), ValueError, "scorer needs"),
    (lambda p: corrupt(p, config={**json.loads(p.read_text())["config"], "selection": {"pool": 4}}), ValueError,
     "selection pool must be an odd integer"),
    (lambda p: p.with_suffix(".safetensors").write_bytes(b"garbage"), ValueError, "cannot read tensors"),
    (lambda p: p.with_suffix(".safetensors").unlink(), FileNotFoundError, "missing"),
])
def test_malformed_checkpoints_give_clear_errors(tmp_path, damage, error, message):
    where, *_ = save_random(tmp_path / "c.json")
    damage(where)
    with pytest.raises(error, match=message):
        namm.make_policy("namm", checkpoint=str(where))


def test_non_finite_or_mismatched_tensors_are_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_namm_checkpoint(tmp_path / "x.json", torch.full((4172,), float("nan")), torch.zeros(17), torch.ones(17),
                             namm_config(), {})
    with pytest.raises(ValueError, match="norm_std has shape"):
        save_namm_checkpoint(tmp_path / "x.json", torch.zeros(4172), torch.zeros(17), torch.ones(16), namm_config(), {})
    with pytest.raises(ValueError, match=r"holds \(26,\) parameters"):
        save_namm_checkpoint(tmp_path / "x.json", torch.zeros(26), torch.zeros(17), torch.ones(17), namm_config(), {})
