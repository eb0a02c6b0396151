"""LESS on tiny random models: untrained ≡ policy, recurrent ≡ chunked, one fold per evicted
token, GQA and non-GQA, batch ≡ single, checkpoints and training."""

from __future__ import annotations

import pytest
import torch

import namm
from namm.less import KernelConfig, LessKernels, LessPolicy, load_less_kernels, save_less_kernels
from namm.less.kernels import mix_low_rank, sparse_attention
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.base import LayerView
from namm.policies.wrapped import WrappedPolicy
from tiny_models import random_prompt, tiny_model

KINDS = ["llama-gqa", "llama-mha", "qwen2", "gemma3"]


def active_kernels(model, seed: int = 1, log_scale: float = 2.0) -> LessKernels:
    """Random kernels with a scale large enough that LESS visibly changes the output."""
    kernels = LessKernels(KernelConfig.for_model(model, hidden=16), seed=seed)
    with torch.no_grad():
        for layer in kernels.layers:
            layer.log_scale.fill_(log_scale)
    return kernels


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return tiny_model(request.param)


@torch.inference_mode()
def run_logits(model, prompts: list[torch.Tensor], policy, chunk: int = 128) -> list[torch.Tensor]:
    runner = MemoryRunner(model, policy, len(prompts), chunk_size=chunk)
    with memory_attention_enabled(model):
        return runner.feed(prompts, all_logits=True)


def test_untrained_less_equals_its_policy(model):
    prompt = random_prompt(300)
    base = namm.make_policy("h2o", budget=0.2, n_up=64)
    less = LessPolicy(namm.make_policy("h2o", budget=0.2, n_up=64), LessKernels(KernelConfig.for_model(model, 16)))
    a = namm.generate(model, None, prompt, policy=base, max_new_tokens=12)
    b = namm.generate(model, None, prompt, policy=less, max_new_tokens=12)
    assert b.token_ids == a.token_ids
    assert b.cache_tokens_per_layer == a.cache_tokens_per_layer


def test_trained_like_less_changes_output_and_keeps_budget(model):
    prompt = random_prompt(300)
    base = run_logits(model, [prompt], namm.make_policy("h2o", budget=0.2, n_up=64))[0]
    policy = LessPolicy(namm.make_policy("h2o", budget=0.2, n_up=64), active_kernels(model))
    with_less = run_logits(model, [prompt], policy)[0]
    assert torch.isfinite(with_less).all()
    torch.testing.assert_close(with_less[:64], base[:64], atol=1e-4, rtol=1e-4)  # nothing evicted yet
    assert (with_less[64:] - base[64:]).abs().max() > 1e-3
    assert policy.state_nbytes() > 0


def test_recurrent_decode_matches_parallel_chunks(model):
    prompt = random_prompt(260, seed=3)
    make = lambda: LessPolicy(namm.make_policy("h2o", budget=0.25, n_up=64), active_kernels(model))
    parallel = run_logits(model, [prompt], make(), chunk=128)[0]
    recurrent = run_logits(model, [prompt], make(), chunk=1)[0]
    torch.testing.assert_close(recurrent, parallel, atol=1e-4, rtol=1e-4)


def test_batch_matches_single(model):
    prompts = [random_prompt(n, seed=n) for n in (200, 90, 150)]
    make = lambda: LessPolicy(namm.make_policy("h2o", budget=0.3, n_up=64), active_kernels(model))
    batch = run_logits(model, prompts, make())
    for prompt, got in zip(prompts, batch):
        torch.testing.assert_close(got, run_logits(model, [prompt], make())[0], atol=1e-4, rtol=1e-4)


def test_every_evicted_token_is_folded_exactly_once(model):
    policy = LessPolicy(namm.make_policy("recency", budget=20, n_up=32), active_kernels(model))
    prompt = random_prompt(150, seed=5)
    run_logits(model, [prompt], policy, chunk=16)
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    for layer, kind in enumerate(layer_types):
        if kind != "full_attention":
            assert policy.state.h[layer] is None
            continue
        # updates at 32, 64, 96, 128 tokens seen; each keeps the newest 20, so 128 - 20 tokens were evicted
        assert (policy.state.folded[layer] == 128 - 20).all()


class EvictionCounter(WrappedPolicy):
    """Counts, per layer, row, KV head and position, how often ``inner`` evicted a token."""

    def __init__(self, inner, num_layers: int, batch: int, heads: int, length: int):
        super().__init__(inner)
        self.counts = torch.zeros(num_layers, batch, heads, length, dtype=torch.long)

    def select(self, view):
        keep = super().select(view)
        rows, heads, slots = (view.valid & ~keep).nonzero(as_tuple=True)
        positions = view.positions[rows, heads, slots]
        self.counts[view.layer_idx].index_put_((view.rows[rows], heads, positions), torch.ones_like(positions),
                                               accumulate=True)
        return keep


@pytest.mark.parametrize("options", [{"budget": 0.3}, {"max_fraction": 0.4}], ids=["budget", "threshold-capped"])
def test_namm_with_less_folds_every_evicted_token_exactly_once(options):
    model = tiny_model("llama-gqa")
    shipped = namm.make_policy("namm", checkpoint="smollm2-135m", n_up=32, schedule="progressive", **options)
    less = LessPolicy(shipped, active_kernels(model))
    prompts = [random_prompt(150, seed=5), random_prompt(97, seed=6)]
    counter = EvictionCounter(less, 3, 2, 2, 150)
    runner = MemoryRunner(model, counter, 2, chunk_size=16)
    with torch.inference_mode(), memory_attention_enabled(model):
        runner.feed(prompts)
    assert less.inner.loaded_checkpoint is not None and less.name == "namm+less"
    for layer in range(3):
        counts = counter.counts[layer]
        assert counts.max() == 1  # no token evicted (so folded) twice
        assert (less.state.folded[layer] == counts.sum(-1)).all()
        held = runner.cache.layers[layer].positions >= 0
        for row, length in enumerate((150, 97)):
            # every token seen is either still in the cache or was evicted (and folded) once
            assert (held[row].sum(-1) + counts[row].sum(-1) == length).all()
    assert less.state_nbytes() == 3 * 2 * 8 * (16 + 1) * 4 and counter.state_nbytes() == less.state_nbytes()


def hand_view(keys, values, positions, seen, previous):
    B = keys.shape[0]
    return LayerView(layer_idx=0, num_layers=1, keys=keys, values=values, positions=positions, queries=None,
                     query_positions=None, tokens_seen=torch.tensor([seen] * B),
                     previous_tokens_seen=torch.tensor([previous] * B), scaling=0.25, sliding_window=None,
                     state={}, rows=torch.arange(B))


def test_state_is_the_sum_over_evicted_tokens_hand_made():
    config = KernelConfig(num_layers=1, q_heads=2, kv_heads=1, head_dim=4, hidden=8, rank=3)
    kernels = LessKernels(config, seed=2)
    policy = LessPolicy(namm.make_policy("recency", budget=3, n_up=4), kernels)
    policy.reset(1)
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 1, 8, 4, generator=gen), torch.randn(1, 1, 8, 4, generator=gen)
    # update 1: tokens 0..3 in cache, recency keeps 1..3 -> token 0 evicted
    keep = policy.select(hand_view(keys[:, :, :4], values[:, :, :4], torch.arange(4).view(1, 1, 4), 4, 0))
    assert keep.tolist() == [[[False, True, True, True]]]
    # update 2: kept 1..3 plus new 4..7; keeps 5..7 -> tokens 1..4 evicted
    idx = torch.arange(1, 8)
    keep = policy.select(hand_view(keys[:, :, idx], values[:, :, idx], idx.view(1, 1, 7), 8, 4))
    assert keep.tolist() == [[[False, False, False, False, True, True, True]]]
    evicted = torch.arange(5)
    psi = kernels.layers[0].psi(keys[:, :, evicted])[0, 0]  # (5, R)
    torch.testing.assert_close(policy.state.h[0][0, 0], psi.T @ values[0, 0, evicted])
    torch.testing.assert_close(policy.state.z[0][0, 0], psi.sum(0))
    assert policy.state.folded[0].tolist() == [[5]]


def test_mix_equals_direct_formula():
    gen = torch.Generator().manual_seed(0)
    B, H, G, Q, K, D, R = 2, 2, 3, 5, 7, 4, 3
    q, k, v = torch.randn(B, H * G, Q, D, generator=gen), torch.randn(B, H, K, D, generator=gen), torch.randn(
        B, H, K, D, generator=gen)
    visible = torch.rand(B, 1, Q, K, generator=gen) > 0.3
    visible[..., 0] = True
    phi = torch.rand(B, H, G, Q, R, generator=gen)
    h, z, log_scale = torch.randn(B, H, R, D, generator=gen), torch.rand(B, H, R, generator=gen), torch.randn(H, G)
    out, lse = sparse_attention(q, k, v, visible, 0.5)
    got = mix_low_rank(out, lse, phi, log_scale, h, z)
    logits = (q.view(B, H, G, Q, D) @ k.unsqueeze(2).transpose(-1, -2)) * 0.5
    weights = torch.exp(logits) * visible.view(B, 1, 1, Q, K)
    low = log_scale.exp().view(1, H, G, 1, 1) * phi
    num = weights @ v.unsqueeze(2) + low @ h.unsqueeze(2)
    den = weights.sum(-1) + (low * z.view(B, H, 1, 1, R)).sum(-1)
    torch.testing.assert_close(got, num / den.unsqueeze(-1))


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = tiny_model("llama-gqa")
    kernels = active_kernels(model)
    path = save_less_kernels(tmp_path / "k", kernels, {"note": "test"})
    loaded = load_less_kernels(tmp_path / "k")
    for a, b in zip(kernels.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert path.with_suffix(".json").is_file()
    half = load_less_kernels(save_less_kernels(tmp_path / "half", kernels, dtype=torch.float16))
    assert (tmp_path / "half" / "less.safetensors").stat().st_size < 0.6 * path.stat().st_size
    for a, b in zip(kernels.state_dict().values(), half.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(b, a.half().float())  # stored rounded, loaded as float32
    with pytest.raises(FileNotFoundError, match="no LESS kernels"):
        load_less_kernels(tmp_path / "missing")
    path.with_suffix(".json").write_text("{}")
    with pytest.raises(ValueError, match="not a LESS checkpoint"):
        load_less_kernels(path)
    other = tiny_model("qwen2")
    policy = namm.make_policy("h2o", budget=0.2, n_up=64, less=kernels)
    with pytest.raises(ValueError, match="LESS kernels were made for"):
        namm.generate(other, None, random_prompt(200), policy=policy, max_new_tokens=2)


@pytest.mark.parametrize("damage", ["garbage", "shape", "missing", "nan", "config"])
def test_bad_kernel_files_give_one_line_errors(tmp_path, damage, capsys):
    from safetensors.torch import load_file, save_file

    from namm.cli import main

    model = tiny_model("llama-gqa")
    path = save_less_kernels(tmp_path / "k", active_kernels(model))
    tensors = load_file(str(path))
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif damage == "config":
        meta = path.with_suffix(".json")
        meta.write_text(meta.read_text().replace('"rank"', '"rank_typo"'))
    else:
        name = "layers.0.psi.w1"
        if damage == "shape":
            tensors[name] = tensors[name][:, :-1].contiguous()
        elif damage == "missing":
            del tensors[name]
        else:
            tensors[name][0, 0, 0] = float("nan")
        save_file(tensors, str(path))
    with pytest.raises(ValueError, match="malformed LESS checkpoint") as err:
        load_less_kernels(path)
    assert "\n" not in str(err.value)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    assert main(["generate", "--policy", "h2o", "--less", str(path), "--prompt-file", str(prompt)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "malformed LESS checkpoint" in lines[0]


class ByteTokenizer:
    """Stand-in tokenizer for the tiny models: one token per UTF-8 byte (ids 1..255)."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[b % 255 + 1 for b in text.encode("utf-8")])


def test_training_reduces_the_layer_error_and_resumes(tmp_path, monkeypatch):
    from namm.less.training import TrainConfig, train_less

    model = tiny_model("llama-gqa")
    config = TrainConfig(sequences=2, seq_len=160, queries_per_seq=32, steps=12, batch_sequences=2, lr=1e-2,
                         hidden=16, rank=4, validation=2, eval_every=4)
    policy = namm.make_policy("h2o", budget=0.2, n_up=64)
    path = train_less(model, ByteTokenizer(), policy, tmp_path, config, {"model": "tiny"}, progress=False)
    from namm.less.checkpoint import read_metadata

    layers = read_metadata(path)["provenance"]["layers"]
    assert len(layers) == 3 and len(list((tmp_path / "data").glob("*.safetensors"))) == 4  # 2 fitted + 2 held out
    for report in layers.values():  # measured on the two sequences never fitted
        assert report["measured_on"] == "validation" and report["less_mse"] < report["policy_mse"]
        assert report["best_step"] in (4, 8, 12) and report["last_step"] == 12
    kernels = load_less_kernels(path)
    assert kernels.config.rank == 4
    # resuming reuses the captured data and the finished layers: nothing is recomputed
    import namm.less.training as training

    monkeypatch.setattr(training, "fit_group", lambda *a, **k: pytest.fail("a finished layer was refitted"))
    monkeypatch.setattr(training, "capture_sequence", lambda *a, **k: pytest.fail("data was captured again"))
    again = load_less_kernels(train_less(model, ByteTokenizer(), policy, tmp_path, config, {"model": "tiny"},
                                         progress=False))
    for a, b in zip(kernels.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="other settings"):
        train_less(model, ByteTokenizer(), policy, tmp_path, TrainConfig(sequences=3, seq_len=160), progress=False)
    out = namm.generate(model, None, random_prompt(200), policy=namm.make_policy("h2o", budget=0.2, n_up=64,
                                                                                 less=path), max_new_tokens=3)
    assert len(out.token_ids) == 3


def test_interrupted_training_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import namm.less.training as training
    from namm.less.training import TrainConfig, train_less

    model = tiny_model("llama-gqa")
    config = TrainConfig(sequences=2, seq_len=160, queries_per_seq=16, steps=4, batch_sequences=2, lr=1e-2,
                         hidden=8, rank=4, layers_per_pass=2, validation=1, eval_every=2)
    policy = lambda: namm.make_policy("h2o", budget=0.2, n_up=64)
    whole = load_less_kernels(train_less(model, ByteTokenizer(), policy(), tmp_path / "whole", config, progress=False))
    fit, passes = training.fit_group, []

    def fit_once(params, *args, **kwargs):
        if passes:
            raise KeyboardInterrupt  # stopped during the second pass (layer 2)
        passes.append(params["log_scale"].shape[0])
        return fit(params, *args, **kwargs)

    monkeypatch.setattr(training, "fit_group", fit_once)
    with pytest.raises(KeyboardInterrupt):
        train_less(model, ByteTokenizer(), policy(), tmp_path / "cut", config, progress=False)
    assert passes == [2] and sorted(p.name for p in (tmp_path / "cut" / "layers").glob("*.safetensors")) == [
        "layer_000.safetensors", "layer_001.safetensors"]
    monkeypatch.setattr(training, "fit_group", fit)
    resumed = load_less_kernels(train_less(model, ByteTokenizer(), policy(), tmp_path / "cut", config,
                                           progress=False))
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_training_continues_from_trained_kernels(tmp_path, capsys):
    from namm.cli import main
    from namm.less.checkpoint import read_metadata
    from test_evolve_helpers import save_tiny_model

    model_dir = str(save_tiny_model(tmp_path / "tiny"))
    common = ["less-train", "--model", model_dir, "--device", "cpu", "--policy", "h2o", "--budget", "0.2", "--n-up",
              "64", "--sequences", "2", "--seq-len", "160", "--queries", "16", "--batch", "2", "--validation", "2",
              "--eval-every", "2", "--steps", "4"]
    first = str(tmp_path / "first")
    assert main([*common, "--hidden", "8", "--rank", "4", "--lr", "1e-2", "--out", first]) == 0
    # a step too small to improve any layer leaves every weight as loaded (no log-scale search either)
    assert main([*common, "--lr", "1e-12", "--init-from", first, "--out", str(tmp_path / "frozen")]) == 0
    trained, frozen = load_less_kernels(first), load_less_kernels(tmp_path / "frozen")
    assert frozen.config == trained.config and frozen.config.hidden == 8  # the shapes come from --init-from
    for a, b in zip(trained.state_dict().values(), frozen.state_dict().values()):
        assert torch.equal(a, b)
    assert main([*common, "--lr", "1e-2", "--init-from", first, "--out", str(tmp_path / "more")]) == 0
    before, after = (read_metadata(d)["provenance"] for d in (first, tmp_path / "more"))
    assert after["init_from"] == first and "init_from" not in before
    for i, report in after["layers"].items():  # same validation sequences: never worse than the start
        assert report["less_mse"] <= before["layers"][i]["less_mse"] * (1 + 1e-5)
    capsys.readouterr()
    assert main([*common, "--hidden", "16", "--init-from", first, "--out", str(tmp_path / "wide")]) == 2
    assert "continue from" in capsys.readouterr().err


def test_training_on_mixed_lengths_pads_without_changing_any_loss(tmp_path, capsys):
    import namm.less.training as training
    from namm.cli import main
    from namm.less.checkpoint import read_metadata
    from test_evolve_helpers import save_tiny_model

    model_dir = str(save_tiny_model(tmp_path / "tiny"))
    out = tmp_path / "mixed"
    assert main(["less-train", "--model", model_dir, "--device", "cpu", "--policy", "h2o", "--budget", "0.2",
                 "--n-up", "64", "--sequences", "2", "--seq-len", "160,288", "--queries", "16", "--batch", "2",
                 "--validation", "2", "--eval-every", "2", "--steps", "4", "--hidden", "8", "--rank", "4",
                 "--lr", "1e-2", "--out", str(out)]) == 0
    settings = read_metadata(out)["provenance"]
    assert settings["train"]["seq_len"] == [160, 288]
    files = sorted((out / "data").glob("seq_*.safetensors"))
    keys = [training.load_group([f], [0], torch.device("cpu"))["k"].shape[-2] for f in files]
    assert keys == [128, 256, 128, 256]  # tokens before the last update, lengths alternating
    kernels = load_less_kernels(out)
    layers = [0, 1]
    params = training.stack_layers([kernels.layers[i] for i in layers], torch.device("cpu"))
    o_proj = torch.stack([m.o_proj.weight.detach().float() for m in training.attention_modules(tiny_model())[:2]])
    padded = training.load_group(files, layers, torch.device("cpu"))
    assert padded["k"].shape[-2] == 256 and [n for _, n in training.length_groups(padded)] == [128, 256]
    alone = [training.group_loss(params, training.load_group([f], layers, torch.device("cpu")), o_proj) for f in files]
    torch.testing.assert_close(training._mean_loss(params, padded, o_proj, batch=2), torch.stack(alone).mean(0))
    # a batch of mixed lengths, padded, gives each sequence its own loss: padding folds nothing
    mixed = {k: v[:2] for k, v in padded.items()}
    torch.testing.assert_close(training.group_loss(params, mixed, o_proj), (alone[0] + alone[1]) / 2)
    capsys.readouterr()
    assert main(["less-train", "--model", model_dir, "--seq-len", "160,x", "--out", str(tmp_path / "bad")]) == 2
    assert "--seq-len takes comma-separated integers" in capsys.readouterr().err


def test_training_on_a_bfloat16_model_gives_float32_kernels_that_follow_the_model(tmp_path):
    from namm.less.training import TrainConfig, train_less

    model = tiny_model("qwen2").to(torch.bfloat16)
    config = TrainConfig(sequences=2, seq_len=160, queries_per_seq=16, steps=3, batch_sequences=2, hidden=8, rank=4,
                         validation=1)
    path = train_less(model, ByteTokenizer(), namm.make_policy("h2o", budget=0.2, n_up=64), tmp_path, config,
                      progress=False)
    kernels = load_less_kernels(path)
    assert {p.dtype for p in kernels.parameters()} == {torch.float32}
    policy = namm.make_policy("h2o", budget=0.2, n_up=64, less=kernels)
    out = namm.generate(model, None, random_prompt(200), policy=policy, max_new_tokens=3)
    assert len(out.token_ids) == 3 and out.less_state_bytes == policy.state_nbytes() > 0
    assert {p.dtype for p in policy.kernels.parameters()} == {torch.bfloat16}  # kernels in the model's dtype
    state = [h for h in policy.state.h if h is not None]
    assert state and all(h.dtype == torch.float32 and h.device == model.device for h in state)  # float32 state


def test_training_on_the_shipped_namm_evictions(tmp_path):
    from namm.less.checkpoint import read_metadata
    from namm.less.training import TrainConfig, train_less

    model = tiny_model("llama-gqa")
    policy = namm.make_policy("namm", checkpoint="smollm2-135m", budget=0.3,
                              schedule="progressive")  # the shipped NAMM, its n_up
    assert policy.n_up == 512
    config = TrainConfig(sequences=2, seq_len=640, queries_per_seq=16, steps=3, batch_sequences=2, hidden=8, rank=4,
                         validation=0)
    path = train_less(model, ByteTokenizer(), policy, tmp_path, config, {"policy": "namm"}, progress=False)
    layers = read_metadata(path)["provenance"]["layers"]
    assert all(report["policy_mse"] > 0 for report in layers.values())
    with pytest.raises(ValueError, match="must exceed"):
        train_less(model, ByteTokenizer(), namm.make_policy("namm", checkpoint="smollm2-135m"), tmp_path / "short",
                   TrainConfig(seq_len=400), progress=False)


def test_early_stopping_keeps_each_layers_best_weights():
    from namm.less.training import EarlyStopping

    weight = torch.zeros(2, 3, requires_grad=True)
    losses = iter([torch.tensor([2.0, 2.0]), torch.tensor([1.0, 3.0]), torch.tensor([1.5, 2.5])])
    stopper = EarlyStopping({"w": weight}, lambda: next(losses))
    with torch.no_grad():
        weight.fill_(1.0)
    assert stopper.check(step=10) == 0  # layer 0 improved: its weights are kept, layer 1's are not
    with torch.no_grad():
        weight.fill_(2.0)
    assert stopper.check(step=20) == 1  # nothing improved
    stopper.restore()
    assert weight.tolist() == [[1.0] * 3, [0.0] * 3] and stopper.best_step.tolist() == [10, 0]


def test_training_stops_when_no_layer_improves(tmp_path, monkeypatch):
    import namm.less.training as training
    from namm.less.checkpoint import read_metadata

    monkeypatch.setattr(training, "_mean_loss", lambda params, *a, **k: torch.ones(params["log_scale"].shape[0]))
    config = training.TrainConfig(sequences=2, seq_len=160, queries_per_seq=16, steps=100, batch_sequences=2,
                                  hidden=8, rank=4, validation=1, eval_every=3, patience=2)
    path = training.train_less(tiny_model("llama-gqa"), ByteTokenizer(), namm.make_policy("h2o", budget=0.2, n_up=64),
                               tmp_path, config, progress=False)
    for report in read_metadata(path)["provenance"]["layers"].values():
        assert report["last_step"] == 6 and report["best_step"] == 0


def test_training_config_errors():
    from namm.less.training import TrainConfig

    with pytest.raises(ValueError, match="must exceed"):
        TrainConfig(seq_len=512).check(512)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0).check(64)
    with pytest.raises(ValueError, match="validation"):
        TrainConfig(validation=-1).check(64)


def test_perplexity_full_cache_matches_plain_forward():
    from namm.eval.perplexity import evaluate_perplexity

    model = tiny_model("qwen2")
    tokens = random_prompt(1100, seed=4)
    got = evaluate_perplexity(model, tokens, namm.make_policy("full"))
    with torch.inference_mode():
        logits = model(tokens[None]).logits[0].float()
    nll = float(torch.nn.functional.cross_entropy(logits[:-1], tokens[1:]))
    assert got["tokens"] == 1099 and got["cache_fraction"] == 1.0
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["kv_bytes_peak"] == got["kv_bytes_full_peak"]
    evicting = evaluate_perplexity(model, tokens, namm.make_policy("h2o", budget=0.1, n_up=128,
                                                                   less=active_kernels(model)))
    assert evicting["cache_fraction"] < 0.2 and evicting["kv_bytes_peak"] < got["kv_bytes_full_peak"]
    assert evicting["less_state_bytes"] == 3 * 1 * 8 * (16 + 1) * 4  # layers * KV heads * R * (d + 1) * float32
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_perplexity(model, tokens[:1], namm.make_policy("full"))


def test_cli_errors(capsys):
    from namm.cli import main

    assert main(["generate", "--policy", "h2o", "--budget", "0.1", "--less", "no-such-kernels",
                 "--prompt-file", __file__, "--max-new-tokens", "1"]) == 2
    assert "no LESS kernels" in capsys.readouterr().err
    assert main(["less-train", "--out", "/tmp/x", "--seq-len", "100"]) == 2
    assert "must exceed" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_smollm2_kernels_lower_heldout_perplexity_of_h2o():
    from namm.eval.perplexity import evaluate_perplexity
    from namm.tasks.corpus import corpus_tokens

    model, tokenizer = namm.load_model("smollm2-135m")
    tokens = corpus_tokens(tokenizer, 1280, split="heldout", seed=7)
    h2o = evaluate_perplexity(model, tokens, namm.make_policy("h2o", budget=0.1))
    less = evaluate_perplexity(model, tokens, namm.make_policy("h2o", budget=0.1, less="smollm2-135m-h2o"))
    assert less["cache_fraction"] == h2o["cache_fraction"] and less["kv_bytes_peak"] == h2o["kv_bytes_peak"]
    assert less["less_state_bytes"] == 30 * 3 * 8 * (64 + 1) * 4  # layers * KV heads * R * (d + 1) * float32
    assert less["perplexity"] < h2o["perplexity"]


@pytest.mark.slow
def test_shipped_namm_kernels_lower_heldout_perplexity_of_the_shipped_namm():
    from namm.eval.perplexity import evaluate_perplexity
    from namm.tasks.corpus import corpus_tokens

    model, tokenizer = namm.load_model("smollm2-135m")
    tokens = corpus_tokens(tokenizer, 1280, split="heldout", seed=7)
    alone = evaluate_perplexity(model, tokens, namm.make_policy("namm"))
    less = evaluate_perplexity(model, tokens, namm.make_policy("namm", less="smollm2-135m-namm"))
    assert less["less_state_bytes"] == 30 * 3 * 8 * (64 + 1) * 4
    assert alone["cache_fraction"] < 1.0
    assert less["perplexity"] < alone["perplexity"]
