"""The dense fitness, the proxy evaluator, NAMM's budget mode and default checkpoints, on tiny
random models (docs/algorithm.md §7-8)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import namm
import namm.evolve.proxy as proxy
from namm.evolve.fitness import (MARGIN_CLIP, AnswerScorer, answer_fitness, answer_statistic, teacher_forced_scores,
                                 tokenize_samples)
from namm.evolve.proxy import ProxyScorer, record_prompt, replay
from namm.evolve.threshold import calibrate_threshold, mean_fraction
from namm.evolve.trainer import EvolveConfig, Trainer
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.namm.checkpoint import load_namm_checkpoint
from namm.tasks.base import Sample
from namm.tasks.registry import get_task
from fixtures.byte_tokenizer import byte_tokenizer
from tiny_models import tiny_model

N_UP = 64


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama-gqa"), byte_tokenizer()


def prompts_of(tiny, length: int, n: int = 2, task: str = "passkey", seed: int = 3):
    model, tokenizer = tiny
    return tokenize_samples(tokenizer, model, [(0, s) for s in get_task(task).samples(tokenizer, length, n, seed=seed)])


def random_params(policy, n: int, seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(n, policy.num_params, generator=torch.Generator().manual_seed(seed)) * scale


def test_answer_fitness_on_a_hand_made_example():
    loglik = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -0.5]])
    full = torch.tensor([-1.0, -1.0, -1.0])
    tasks = torch.tensor([0, 0, 1])
    # member 0: task 0 gaps (0, -1) -> -0.5, task 1 gap 0.5 -> mean 0.0; member 1: (-2, 0) -> -1, 0.5 -> -0.25
    torch.testing.assert_close(answer_fitness(loglik, full, tasks), torch.tensor([0.0, -0.25], dtype=torch.float64))
    fraction = torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]])
    with_memory = answer_fitness(loglik, full, tasks, fraction, namm.evolve.fitness.MemoryTerm(0.3, 2.0))
    torch.testing.assert_close(with_memory, torch.tensor([-0.4, -0.25], dtype=torch.float64))
    assert answer_fitness(full[None], full, tasks).item() == 0.0  # the full cache scores exactly 0


def test_answer_statistics_on_a_hand_made_example():
    # two answer tokens over a vocabulary of 3; row 0: greedy emits both, row 1:
    # the second token loses to token 0 by 0.5, row 2: the first token is far behind (clipped)
    logp = torch.log(torch.tensor([
        [[0.1, 0.2, 0.7], [0.2, 0.6, 0.2]],
        [[0.2, 0.1, 0.7], [0.5, 0.3, 0.2]],
        [[0.999, 1e-9, 0.001 - 1e-9], [0.3, 0.4, 0.3]],
    ]))
    answer = torch.tensor([2, 1])
    torch.testing.assert_close(answer_statistic(logp, answer, "loglik"),
                               torch.stack([logp[r, [0, 1], [2, 1]].mean() for r in range(3)]))
    margin = answer_statistic(logp * 1.0, answer, "margin")
    expected = torch.tensor([min(math.log(0.7 / 0.2), math.log(0.6 / 0.2)), math.log(0.3 / 0.5), -MARGIN_CLIP])
    torch.testing.assert_close(margin, expected)
    assert (margin > 0).tolist() == [True, False, False]  # positive exactly when greedy emits the answer
    assert answer_statistic(10 * torch.eye(3)[[2, 1]], answer, "margin") == MARGIN_CLIP  # clipped above
    with pytest.raises(ValueError, match="unknown answer statistic 'mean'"):
        answer_statistic(logp, answer, "mean")


@pytest.mark.parametrize("prompt, answers, reference", [
    ("What is the pass key? The pass key is", ["12345"], " 12345"),
    ("The answer is: Paragraph", ["Paragraph 3"], " 3"),
    ('The value associated with the specified key is: "', ["ab12-cd"], "ab12-cd"),
    ("they are:", ["ABCDE", "FGHIJ"], " ABCDE, FGHIJ"),
])
def test_reference_continuation(prompt, answers, reference):
    assert Sample("s", prompt, answers, 8, "string_match_all").reference() == reference


def test_proxy_of_the_zero_namm_gives_the_full_cache_values(tiny):
    model, _ = tiny
    prompts = prompts_of(tiny, 300)
    policy = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=N_UP)
    scorer = ProxyScorer(model, policy, progress=False)
    real = teacher_forced_scores(model, namm.make_policy("full"), prompts)
    torch.testing.assert_close(scorer.full(prompts), torch.tensor([r[0] for r in real]), rtol=0, atol=1e-5)
    zero = scorer.members(torch.zeros(3, policy.num_params), prompts)
    torch.testing.assert_close(zero.scores, scorer.full(prompts).expand(3, -1), rtol=0, atol=1e-5)
    assert bool((zero.cache_fraction == 1).all())


@pytest.mark.parametrize("scorer, budget, statistic", [("mlp", None, "loglik"), ("bam", None, "loglik"),
                                                       ("mlp", 0.3, "loglik"), ("bam", 0.3, "margin")])
def test_proxy_is_exact_when_the_prompt_sees_one_update(tiny, scorer, budget, statistic):
    """Before the first update nothing was evicted, so recorded features and keys are the real ones."""
    model, _ = tiny
    prompts = prompts_of(tiny, 300)  # one update at 256 tokens, the continuation ends before 512
    policy = namm.make_policy("namm", checkpoint="zeros", scorer=scorer, n_up=256)
    policy.set_budget(budget)
    params = random_params(policy, 4)
    got = ProxyScorer(model, policy, progress=False, statistic=statistic).members(params, prompts)
    policy.set_population(params)
    for i, p in enumerate(prompts):
        real = teacher_forced_scores(model, policy, [p] * len(params), statistic=statistic)
        torch.testing.assert_close(got.scores[:, i], torch.tensor([r[0] for r in real]), rtol=0, atol=1e-5)
    policy.set_population(None)
    assert got.cache_fraction.unique().numel() > 1 or budget is not None  # members really differ


@pytest.mark.parametrize("statistic", ["loglik", "margin"])
def test_query_agnostic_proxy_matches_real_eviction(tiny, statistic):
    """Query-agnostic prompts: the context is compressed at its end, before the question is read;
    with one update (the forced one) the proxy gives real eviction's values exactly."""
    model, tokenizer = tiny
    samples = [(0, s) for s in get_task("passkey").samples(tokenizer, 250, 2, seed=3)]
    prompts = tokenize_samples(tokenizer, model, samples, query_agnostic=True)
    for p, (_, sample) in zip(prompts, samples):
        assert p.context_tokens == len(tokenizer(sample.context).input_ids) < len(p.token_ids)
    policy = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=256, budget=0.3)
    params = random_params(policy, 3)
    got = ProxyScorer(model, policy, progress=False, statistic=statistic).members(params, prompts)
    assert bool((got.cache_fraction < 0.35).all()), "the context was compressed although no n_up boundary was crossed"
    policy.set_population(params)
    for i, p in enumerate(prompts):
        real = teacher_forced_scores(model, policy, [p] * len(params), statistic=statistic)
        torch.testing.assert_close(got.scores[:, i], torch.tensor([r[0] for r in real]), rtol=0, atol=1e-5)
    policy.set_population(None)
    aware = tokenize_samples(tokenizer, model, samples)
    assert teacher_forced_scores(model, policy, aware[:1])[0][1] == 1.0  # query-aware: no update before 256
    with pytest.raises(ValueError, match="carries no separate question"):
        tokenize_samples(tokenizer, model, [(0, Sample("x", "no question here", ["a"], 4, "string_match_all"))],
                         query_agnostic=True)


@pytest.mark.parametrize("budget,query_agnostic,pool", [(0.3, True, 1), (None, True, 1), (0.3, False, 1),
                                                        (None, False, 1), (0.3, False, 5)])
def test_prompt_end_proxy_is_exact_past_many_update_points(tiny, budget, query_agnostic, pool):
    """On the prompt-end schedule the context (query-agnostic) or the whole prompt, question
    included (query-aware), compresses once, at its end, however many n_up boundaries it crossed:
    the proxy then gives real eviction's values exactly."""
    model, tokenizer = tiny
    samples = [(0, s) for s in get_task("passkey").samples(tokenizer, 300, 2, seed=5)]
    prompts = tokenize_samples(tokenizer, model, samples, query_agnostic=query_agnostic)
    policy = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=N_UP, budget=budget,
                              schedule="prompt-end", pool=pool)
    params = random_params(policy, 3, seed=1)
    scorer = ProxyScorer(model, policy, progress=False, statistic="margin")
    got = scorer.members(params, prompts)
    assert all(len(r.features) == 1 for r in scorer.records.values()), "prompt-end records one update"
    assert all((r.lead_logits is None) == query_agnostic for r in scorer.records.values())
    assert all(r.seen == (p.context_tokens or len(p.token_ids)) for r, p in zip(scorer.records.values(), prompts))
    policy.set_population(params)
    for i, p in enumerate(prompts):
        real = teacher_forced_scores(model, policy, [p] * len(params), statistic="margin")
        torch.testing.assert_close(got.scores[:, i], torch.tensor([r[0] for r in real]), rtol=0, atol=1e-5)
    policy.set_population(None)
    progressive = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=N_UP, budget=budget)
    assert len(ProxyScorer(model, progressive, progress=False).record(prompts[:1])[0].features) > 1


def test_replay_keeps_what_real_eviction_keeps_at_the_first_update(tiny):
    model, _ = tiny
    p = prompts_of(tiny, 300, n=1)[0]
    policy = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=256)
    params = random_params(policy, 3, seed=1)
    held = replay(record_prompt(model, policy, p.token_ids, p.answer_ids, "k", 0), policy, params)
    policy.set_population(params)
    runner = MemoryRunner(model, policy, len(params))
    with memory_attention_enabled(model), torch.inference_mode():
        runner.feed([p.token_ids[:256]] * len(params))
    policy.set_population(None)
    for l, layer in enumerate(runner.cache.layers):
        for b in range(len(params)):
            for h in range(held.shape[2]):
                kept = layer.positions[b, h][layer.positions[b, h] >= 0]
                assert torch.equal(kept, held[b, l, h].nonzero().flatten())


def test_budget_mode_holds_its_budget_in_bytes(tiny):
    model, _ = tiny
    policy = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=N_UP, budget=0.25)
    policy.params = random_params(policy, 1)[0]
    out = namm.generate(model, None, prompts_of(tiny, 300, n=1)[0].token_ids, policy=policy, max_new_tokens=40,
                        record_history=True)
    assert len(out.history) >= 4
    for record in out.history:
        assert record.kv_bytes <= 0.25 * record.kv_bytes_full
        assert set(record.tokens_per_layer) == {math.floor(0.25 * record.tokens_seen)}  # the budget is used in full
    with pytest.raises(ValueError, match="either a threshold"):
        namm.make_policy("namm", checkpoint="zeros", budget=0.25, threshold=0.0)
    with pytest.raises(ValueError, match="budget must be"):
        namm.make_policy("namm", checkpoint="zeros", budget=1.5)


def test_full_cache_references_are_computed_once(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts = prompts_of(tiny, 300)
    calls = []
    original = proxy.continuation_scores
    monkeypatch.setattr(proxy, "continuation_scores", lambda m, rec, held, **kw: calls.append(held) or original(
        m, rec, held, **kw))
    scorer = ProxyScorer(model, namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=N_UP), progress=False)
    first = scorer.full(prompts)
    assert torch.equal(scorer.full(prompts), first) and len(calls) == len(prompts)
    assert len(scorer.records) == len(prompts)
    real = AnswerScorer(model, tokenizer, namm.make_policy("namm", checkpoint="zeros", n_up=N_UP), progress=False)
    runs = []
    monkeypatch.setattr(real, "_run", lambda ps, pol: runs.append(len(ps)) or [(-1.0, 1.0)] * len(ps))
    real.full(prompts)
    real.full(prompts)
    assert sum(runs) == len(prompts)


def test_default_checkpoint_is_the_one_shipped_for_the_model(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="no NAMM is shipped for this model.*namm evolve.*namm calibrate"):
        namm.generate(model, None, [1, 2, 3], policy=namm.make_policy("namm"), max_new_tokens=1)
    policy = namm.make_policy("namm")
    assert policy.loaded_checkpoint is None  # nothing is loaded before a model is known
    registry_like = tiny_model("llama-gqa")
    registry_like.name_or_path = "/some/cache/models/smollm2-135m"  # what load_model("smollm2-135m") gives
    policy.bind(registry_like)
    assert policy.loaded_checkpoint.provenance["model"] == "smollm2-135m"
    assert namm.make_policy("namm", checkpoint="zeros").loaded_checkpoint.provenance == {"source": "zeros"}


def test_budget_mode_evolution_resumes_exactly_and_records_its_mode(tiny, tmp_path):
    model, tokenizer = tiny
    base = dict(model="tiny", tasks=["passkey", "kv_retrieval"], length=[300, 400], generations=3, prompts_per_task=1,
                train_prompts=2, population=4, separable=True, eval_every=2, n_up=128, scorer="mlp", hidden=[4],
                fitness="loglik", evaluator="proxy", budgets=[0.2, 0.6])
    straight = Trainer(EvolveConfig(**base), tmp_path / "a", model, tokenizer, progress=False)
    straight.start()
    straight.run()
    first = Trainer(EvolveConfig(**{**base, "generations": 1}), tmp_path / "b", model, tokenizer, progress=False)
    first.start()
    first.run()
    resumed = Trainer(EvolveConfig(**base), tmp_path / "b", model, tokenizer, progress=False)
    resumed.resume()
    resumed.run()
    assert torch.equal(resumed.cmaes.mean, straight.cmaes.mean)
    rows = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").open()]
    assert all(0.2 <= r["budget"] <= 0.6 for r in rows) and len({r["budget"] for r in rows}) == 3
    assert all(r["budget"] - 0.01 <= f <= r["budget"] + 0.01 for r in rows for f in r["member_cache_fraction"])
    best = load_namm_checkpoint(tmp_path / "a" / "best")
    assert best.config["selection"]["mode"] == "budget" and best.config["selection"]["budgets"] == [0.2, 0.6]
    assert best.provenance["fitness"] == "loglik" and best.provenance["evaluator"] == "proxy"


def test_record_store_gives_back_what_was_recorded(tiny, tmp_path, monkeypatch):
    """A second scorer (a resumed run) reads every prompt's recording from the store instead of recording it
    again, and scores members exactly as the first; another normalisation or a torn file records afresh."""
    from namm.evolve.record_store import RecordStore

    model, _ = tiny
    prompts = prompts_of(tiny, 300)
    policy = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=N_UP)
    params = random_params(policy, 3)
    store = RecordStore(tmp_path / "records")
    first = ProxyScorer(model, policy, progress=False, store=store).members(params, prompts)
    assert len(list((tmp_path / "records").glob("*.safetensors"))) == len(prompts)
    assert not list((tmp_path / "records").glob("*.partial")), "a temporary file was left behind"
    calls = []
    original = proxy.record_prompt
    monkeypatch.setattr(proxy, "record_prompt", lambda *a, **kw: calls.append(a[4]) or original(*a, **kw))
    again = ProxyScorer(model, policy, progress=False, store=store)
    second = again.members(params, prompts)
    assert calls == [] and torch.equal(second.scores, first.scores)
    assert torch.equal(second.cache_fraction, first.cache_fraction)
    assert all(torch.equal(a, b) for a, b in zip(again.records[prompts[0].key].keys,
                                                  ProxyScorer(model, policy, progress=False).record(prompts)[0].keys))
    other = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=N_UP)
    other.normalization = other.normalization._replace(std=other.normalization.std * 2)
    assert store.digest(model, other, prompts[0]) != store.digest(model, policy, prompts[0])
    torn = tmp_path / "records" / f"{store.digest(model, policy, prompts[1])}.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    calls.clear()
    ProxyScorer(model, policy, progress=False, store=store).record(prompts)
    assert calls == [prompts[1].key]


def test_query_agnostic_margin_evolution_records_its_protocol(tiny, tmp_path):
    model, tokenizer = tiny
    config = EvolveConfig(model="tiny", tasks=["passkey"], length=250, generations=1, prompts_per_task=1,
                          train_prompts=1, population=4, separable=True, eval_every=1, n_up=128, scorer="mlp",
                          fitness="margin", evaluator="proxy", budgets=[0.3, 0.3], question_after_compression=True,
                          schedule="prompt-end")
    trainer = Trainer(config, tmp_path / "run", model, tokenizer, progress=False)
    trainer.start()
    assert trainer.pool[0].context_tokens is not None
    trainer.run()
    best = load_namm_checkpoint(tmp_path / "run" / "best")
    assert best.provenance["protocol"] == "query-agnostic" and best.provenance["fitness"] == "margin"
    assert best.config["selection"]["schedule"] == "prompt-end" == best.provenance["schedule"]
    assert namm.make_policy("namm", checkpoint=str(tmp_path / "run" / "best")).schedule == "prompt-end"
    explicit = namm.make_policy("namm", checkpoint=str(tmp_path / "run" / "best"), schedule="progressive")
    assert explicit.schedule == "progressive"  # an explicit schedule wins over the checkpoint's
    assert -2 * MARGIN_CLIP <= best.provenance["mean_fitness"] <= 2 * MARGIN_CLIP


def test_bad_evolution_settings_are_refused():
    common = dict(model="tiny", tasks=["passkey"], length=600, generations=1)
    with pytest.raises(ValueError, match="use --fitness loglik or margin"):
        EvolveConfig(**common, fitness="task", evaluator="proxy")
    with pytest.raises(ValueError, match="--budgets must be"):
        EvolveConfig(**common, budgets=[0.6, 0.2])
    with pytest.raises(ValueError, match="drop --memory-target"):
        EvolveConfig(**common, budgets=[0.2, 0.6], memory_target=0.4)
    with pytest.raises(ValueError, match="unknown schedule 'once'"):
        EvolveConfig(**common, schedule="once")


def test_threshold_calibration_hits_its_target(tiny):
    model, _ = tiny
    policy = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=N_UP)
    records = ProxyScorer(model, policy, progress=False).record(prompts_of(tiny, 300, n=3))
    params = random_params(policy, 1, seed=2)[0]
    threshold, fraction = calibrate_threshold(records, policy, params, 0.5)
    assert abs(fraction - 0.5) < 0.05
    assert mean_fraction(records, policy, params, threshold) == fraction
    assert mean_fraction(records, policy, params, threshold + 10) < fraction < mean_fraction(
        records, policy, params, threshold - 10)


def test_cli_budget_evolution_then_finalize(tmp_path, capsys):
    from namm.cli import main
    from test_evolve_helpers import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    run = tmp_path / "run"
    code = main(["evolve", "--model", str(model_dir), "--tasks", "passkey", "--length", "300,400", "--train-prompts",
                 "2", "--prompts-per-task", "1", "--population", "4", "--generations", "1", "--eval-every", "1",
                 "--n-up", "128", "--separable", "--scorer", "mlp", "--hidden", "4", "--budgets", "0.2,0.6",
                 "--record-cache", str(tmp_path / "records"), "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "records").glob("*.safetensors"))) == 2  # the pool's two prompts, kept for a resume
    code = main(["evolve", "--model", str(model_dir), "--tasks", "passkey", "--length", "300", "--n-up", "128",
                 "--generations", "1", "--evaluator", "real", "--record-cache", str(tmp_path / "records"), "--out", str(tmp_path / "real")])
    assert code != 0 and "--record-cache keeps the proxy's recordings" in capsys.readouterr().err
    code = main(["finalize", "--run", str(run), "--target", "0.5", "--prompts", "2", "--out", str(tmp_path / "c.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "mean KV fraction" in out and "record prompts" not in err  # progress bars on a terminal only
    ckpt = load_namm_checkpoint(tmp_path / "c.json")
    selection = ckpt.config["selection"]
    assert selection["mode"] == "budget" and selection["threshold_target"] == 0.5
    assert 0.3 < selection["threshold_fraction_train"] < 0.7
    assert namm.make_policy("namm", checkpoint=str(tmp_path / "c.json")).threshold == selection["threshold"]
    assert ckpt.provenance["finalized_from"] == str(run / "best")
    mean = run / "means" / "gen-0001"
    code = main(["finalize", "--run", str(run), "--checkpoint", str(mean), "--target", "0.5", "--prompts", "2",
                 "--out", str(tmp_path / "m.json")])
    assert code == 0, capsys.readouterr().err
    picked = load_namm_checkpoint(tmp_path / "m.json")
    assert torch.equal(picked.params, load_namm_checkpoint(mean).params)
    assert picked.provenance["finalized_from"] == str(mean)
    code = main(["finalize", "--run", str(run), "--checkpoint", str(mean), "--target", "0.5", "--floor", "0.45",
                 "--prompts", "2", "--out", str(tmp_path / "f.json")])
    assert code == 0, capsys.readouterr().err
    floored = load_namm_checkpoint(tmp_path / "f.json").config["selection"]
    assert floored["floor"] == 0.45 and floored["threshold_fraction_train"] >= 0.45
    code = main(["finalize", "--run", str(run), "--checkpoint", str(mean), "--target", "0.5", "--pool", "5",
                 "--prompts", "2", "--out", str(tmp_path / "p.json")])
    assert code == 0, capsys.readouterr().err
    pooled = load_namm_checkpoint(tmp_path / "p.json").config["selection"]
    assert pooled["pool"] == 5 and namm.make_policy("namm", checkpoint=str(tmp_path / "p.json")).pool == 5
    assert pooled["threshold"] > picked.config["selection"]["threshold"]  # a wider pool needs a higher cut
    given = picked.config["selection"]["threshold"]
    code = main(["finalize", "--run", str(run), "--checkpoint", str(mean), "--threshold", str(given),
                 "--prompts", "2", "--out", str(tmp_path / "t.json")])
    assert code == 0 and "given cut" in capsys.readouterr().out
    chosen = load_namm_checkpoint(tmp_path / "t.json").config["selection"]
    assert chosen["threshold"] == given and "threshold_target" not in chosen
    assert chosen["threshold_fraction_train"] == pytest.approx(picked.config["selection"]["threshold_fraction_train"])
    with pytest.raises(SystemExit):
        main(["finalize", "--run", str(run), "--target", "0.5", "--threshold", "0.1", "--out", str(tmp_path / "x.json")])
    assert "not allowed with argument" in capsys.readouterr().err
    code = main(["finalize", "--run", str(run), "--target", "0.3", "--floor", "0.4", "--out", str(tmp_path / "x.json")])
    assert code != 0 and "exceeds --target" in capsys.readouterr().err
    code = main(["finalize", "--run", str(run), "--target", "0.3", "--pool", "4", "--out", str(tmp_path / "x.json")])
    assert code != 0 and "--pool must be an odd integer" in capsys.readouterr().err
    code = main(["evolve", "--model", str(model_dir), "--tasks", "passkey", "--length", "300,x", "--generations", "1",
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and "--length takes comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_a_checkpoint_runs_on_another_family(tmp_path, kind):
    """A NAMM from tiny Llama (4 query / 2 KV heads) on Qwen2 (4 / 1) and Gemma 3 (sliding layers)."""
    from namm.policies.namm.checkpoint import save_namm_checkpoint

    source = namm.make_policy("namm", checkpoint="zeros", scorer="mlp", n_up=N_UP)
    params = random_params(source, 1, seed=3)[0]
    path = save_namm_checkpoint(tmp_path / "llama.json", params, source.normalization.mean, source.normalization.std,
                                source.config(), {"model": "tiny-llama-gqa"})
    model = tiny_model(kind)
    policy = namm.make_policy("namm", checkpoint=str(path), budget=0.5)
    out = namm.generate(model, None, torch.randint(1, 200, (300,)), policy=policy, max_new_tokens=20,
                        record_history=True)
    assert out.cache_fraction < 0.6 and len(out.history) >= 4
    if kind == "gemma3":  # sliding layers (window 48) hold nothing older than their window after an update
        runner = MemoryRunner(model, namm.make_policy("namm", checkpoint=str(path)), 1)
        with memory_attention_enabled(model), torch.inference_mode():
            runner.feed([torch.randint(1, 200, (256,))])
        for layer in runner.cache.layers[:2]:
            assert layer.sliding_window == 48 and int(layer.positions.min()) > 256 - 48
    small = tiny_model(kind)
    small.config.max_position_embeddings = N_UP
    with pytest.raises(ValueError, match="from tiny-llama-gqa.*updates every 64 tokens.*context is 64"):
        namm.generate(small, None, [1, 2, 3], policy=namm.make_policy("namm", checkpoint=str(path)), max_new_tokens=1)
