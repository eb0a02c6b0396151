"""The acceptance table's logic (benchmarks/namm_acceptance.py): best schedule per baseline, the
verdicts, and the markdown. No model runs."""

from __future__ import annotations

import argparse

import pytest
from benchmark_modules import load_benchmark

@pytest.fixture(scope="module")
def acc():
    return load_benchmark("namm_acceptance")


def row(policy, score, budget=None, schedule="progressive", kv=0.25, task="niah_single"):
    hits = round(score / 100 * 20)  # 20 samples: the first `hits` right
    return {"task": task, "policy": policy, "score": score, "score_ci": [score - 10, score + 10], "budget": budget,
            "schedule": schedule, "kv_fraction": kv, "n": 32, "sample_scores": [100.0] * hits + [0.0] * (20 - hits)}


def test_each_baseline_on_its_best_schedule_and_the_verdict(acc):
    runs = [
        ("budget", [row("full", 80.0, kv=1.0), row("namm", 50.0, "0.25"), row("streaming", 40.0, "0.25"),
                    row("h2o", 30.0, "0.25")]),
        ("budget", [row("streaming", 20.0, "0.25", "prompt-end"), row("h2o", 55.0, "0.25", "prompt-end")]),
        ("threshold", [row("namm", 78.0, kv=0.4), row("streaming", 60.0, "0.4000"), row("h2o", 70.0, "0.4000")]),
        ("threshold", [row("streaming", 65.0, "0.4000", "prompt-end"), row("h2o", 77.0, "0.4000", "prompt-end")]),
    ]
    budget, threshold = acc.verdicts(runs, 2048, ["streaming", "h2o"])
    assert budget["mode"] == "budget" and budget["budget"] == "0.25"
    assert budget["baselines"]["streaming"]["schedule"] == "progressive"
    h2o = budget["baselines"]["h2o"]
    assert {k: h2o[k] for k in ("score", "ci", "schedule", "kv_fraction")} == \
        {"score": 55.0, "ci": [45.0, 65.0], "schedule": "prompt-end", "kv_fraction": 0.25}
    # paired over the same prompts: 10 right against 11 right, the NAMM's hits a subset of h2o's
    assert h2o["namm_minus"] == pytest.approx(-5.0) and h2o["namm_minus_ci"] == [-15.0, 0.0]
    assert not budget["above_every_baseline"], "h2o compressed once beats the NAMM"
    assert threshold["above_every_baseline"] and threshold["keeps_95_at_half"]
    assert not threshold["significantly_above_every_baseline"], "h2o prompt-end trails by one prompt of 20"
    assert budget["baselines"]["streaming"]["namm_minus"] == pytest.approx(10.0)
    assert threshold["normalised"] == pytest.approx(97.5)
    args = argparse.Namespace(checkpoint="c", threshold_checkpoint="t", tasks="niah_single", seed=100, samples=32,
                              model="smollm2-135m", namm_protocol="query-aware", baselines_from=None)
    text = acc.markdown([budget, threshold], ["streaming", "h2o"], args)
    assert "| budget | niah_single | 2048 | 0.25 | 32 | 80.0 | 50.0 [40.0, 60.0] | 0.250 | 40.0 [30.0, 50.0] " \
           "(progressive) | 55.0 [45.0, 65.0] (prompt-end) | no |" in text
    assert "≥95% of full at ≤0.5 KV: yes" in text
    assert "| budget | niah_single | 2048 | 0.25 | +10.0 [+0.0, +25.0] | −5.0 [−15.0, +0.0] | no |" in text.replace("-", "−")
    assert "the NAMM runs query-aware" in text


@pytest.mark.parametrize("schedule,protocol", [("progressive", "query-agnostic"), ("prompt-end", "query-agnostic"),
                                               ("prompt-end", "query-aware")])
def test_the_namm_runs_on_its_checkpoints_schedule_and_protocol(acc, monkeypatch, tmp_path, schedule, protocol):
    """The NAMM runs alone, on its checkpoint's schedule and protocol (in threshold mode too); every
    baseline runs query-agnostic on both schedules, in threshold mode at the NAMM's measured fraction."""
    from namm.policies.namm.checkpoint import save_namm_checkpoint, zeros_checkpoint

    zeros = zeros_checkpoint("mlp")
    config = {**zeros.config, "selection": {"threshold": 0.0, "schedule": schedule}}
    save_namm_checkpoint(tmp_path / "ckpt", zeros.params, zeros.mean, zeros.std, config, {"protocol": protocol})
    calls = []

    def fake_compare(out, length, args, policies, tasks, sched, budget_args, checkpoint, query_agnostic=True):
        calls.append((policies, sched, budget_args, query_agnostic))
        return {"rows": [{"policy": "namm", "task": "passkey", "kv_fraction": 0.31}] if policies == "namm" else []}

    monkeypatch.setattr(acc, "compare", fake_compare)
    args = argparse.Namespace(out=str(tmp_path / "out"), checkpoint=str(tmp_path / "ckpt"), baselines="streaming",
                              tasks="passkey", budgets="0.25", threshold_checkpoint=str(tmp_path / "ckpt"),
                              namm_protocol=None, baselines_from=None)
    acc.runs_of(args, 2048)
    agnostic = protocol == "query-agnostic"
    assert calls == [("full,namm", schedule, ["--budgets", "0.25"], agnostic),
                     ("streaming", "progressive", ["--budgets", "0.25"], True),
                     ("streaming", "prompt-end", ["--budgets", "0.25"], True),
                     ("namm", schedule, ["--match-cache", "namm"], agnostic),  # its own threshold, no budget
                     ("streaming", "progressive", ["--budgets", "0.3100"], True),
                     ("streaming", "prompt-end", ["--budgets", "0.3100"], True)]


def test_the_threshold_call_plans_the_namm_without_a_budget(acc, monkeypatch, tmp_path):
    """The threshold-mode NAMM run, parsed by the real `namm compare` parser, runs on its own
    threshold: one run with no budget (a budget would switch it to budget mode)."""
    from namm.cli import build_parser
    from namm.commands.compare import plan

    seen = []
    monkeypatch.setattr(acc.subprocess, "run", lambda command, **kw: seen.append(command[3:]))
    (tmp_path / "results.json").write_text('{"rows": []}')
    args = argparse.Namespace(model="m", samples=32, seed=100, batch_size=4, threads=1)
    acc.compare(tmp_path, 2048, args, "namm", "passkey", "prompt-end", ["--match-cache", "namm"], "ckpt")
    assert plan(build_parser().parse_args(seen[0])) == [("passkey", "namm", None)]
    acc.compare(tmp_path, 2048, args, "namm", "passkey", "prompt-end", [], "ckpt")
    assert plan(build_parser().parse_args(seen[1])) == [("passkey", "namm", "0.25"), ("passkey", "namm", "0.5")], \
        "without --match-cache compare falls back to its default budgets (the bug this guards against)"


def test_baselines_read_from_an_earlier_folder(acc, monkeypatch, tmp_path):
    """--baselines-from: the NAMM runs, the baselines are read (not run); a missing run is left out;
    rows say whether every baseline holds at least the NAMM's KV; --budgets '' skips budget mode."""
    import json

    calls = []

    def fake_compare(out, length, args, policies, tasks, sched, budget_args, checkpoint, query_agnostic=True):
        calls.append(policies)
        return {"rows": [{**row("namm", 78.0, kv=0.45), "reference_score": 80.0}]}

    monkeypatch.setattr(acc, "compare", fake_compare)
    monkeypatch.setattr(acc, "make_policy", lambda *a, **k: argparse.Namespace(schedule="prompt-end"))
    earlier = tmp_path / "earlier" / "L2048" / "threshold-progressive-niah_single"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text(json.dumps({"rows": [row("streaming", 60.0, "0.4900", kv=0.49)]}))
    args = argparse.Namespace(out=str(tmp_path / "out"), checkpoint="c", baselines="streaming", tasks="niah_single",
                              budgets="", threshold_checkpoint="t", namm_protocol="query-aware",
                              baselines_from=str(tmp_path / "earlier"))
    runs = acc.runs_of(args, 2048)
    assert calls == ["namm"], "only the threshold NAMM runs; no budget mode, no baseline runs"
    (line,) = acc.verdicts(runs, 2048, ["streaming"])
    assert line["baselines"]["streaming"]["kv_fraction"] == 0.49 and line["baselines_hold_at_least_namm_kv"]
    assert line["full"] == 80.0 and line["normalised"] == pytest.approx(97.5), "the full score from compare's reference"
    (earlier / "results.json").write_text(json.dumps({"rows": [row("streaming", 60.0, "0.4000", kv=0.40)]}))
    (line,) = acc.verdicts(acc.runs_of(args, 2048), 2048, ["streaming"])
    assert not line["baselines_hold_at_least_namm_kv"]
    text = acc.markdown([line], ["streaming"], argparse.Namespace(**vars(args), seed=100, samples=32, model="m"))
    assert "a baseline holds less KV than the NAMM" in text and "read from" in text


def test_report_names_the_table_and_its_data(acc, tmp_path):
    """--report NAME writes NAME.md and NAME.json, so a budget table can sit beside a threshold one."""
    assert acc.report_paths(tmp_path, None) == (tmp_path / "README.md", tmp_path / "summary.json")
    assert acc.report_paths(tmp_path, "budget") == (tmp_path / "budget.md", tmp_path / "budget.json")
    for bad in ("", "a/b", "summary"):
        with pytest.raises(SystemExit, match="--report"):
            acc.report_paths(tmp_path, bad)
