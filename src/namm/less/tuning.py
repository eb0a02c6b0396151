"""Fine-tune LESS kernels end to end: the model's next-token distribution under eviction + LESS is
pulled towards the full cache's (docs/algorithm.md §12).

Layer-wise training (:mod:`namm.less.training`) fits each layer's attention output alone; what a
layer still gets wrong then reaches every layer above it. Here all layers are trained together on
the model's own output:

1. **Record** (once per sequence, cached on disk): the wrapped policy reads the sequence through
   the memory runtime with the starting kernels active; every layer's eviction times are kept
   (:class:`~namm.less.capture.EvictionRecorder`), with the full cache's last hidden states.
2. **Replay**: one parallel forward of the frozen model over the whole sequence whose attention
   (:func:`replay_attention`, registered as :data:`REPLAY_ATTENTION`) gives every query exactly
   what the runtime gave it: exact attention over the keys still held at its last update, mixed
   with the LESS state of the keys evicted by then. The recorded evictions stay fixed, so the
   forward is differentiable in the kernels; each layer's attention is recomputed in the backward
   pass rather than stored.
3. **Loss**: the mean KL divergence from the full cache's next-token distribution to the replay's,
   over the positions after the first eviction. Adam on every layer's kernels at once; every
   ``eval_every`` steps the loss on held-out training-split sequences is measured and the kernels
   of lowest validation loss are kept; the run's state is saved then, so it resumes there.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from namm.less.capture import EvictionRecorder, last_update
from namm.less.checkpoint import save_less_kernels
from namm.less.kernels import KernelConfig, LessKernels, mix_per_query, sparse_attention, states_by_interval
from namm.less.policy import LessPolicy
from namm.less.training import claim_run_dir, sequence_lengths
from namm.memory.driver import MemoryRunner, attention_implementation, memory_attention_enabled
from namm.policies.base import MemoryPolicy
from namm.tensor_files import save_tensors

REPLAY_ATTENTION = "namm_less_replay"
LOSS_CHUNK = 256  # positions whose logits are materialised at once
DATA_FORMAT = 1


@dataclass
class TuneConfig:
    """Sizes of an end-to-end fine-tuning run (defaults: 16 sequences of 2048 tokens + 2 held out)."""

    sequences: int = 16
    seq_len: int | list[int] = 2048
    steps: int = 100
    batch_sequences: int = 1
    lr: float = 3e-4
    seed: int = 0
    validation: int = 2
    eval_every: int = 10
    patience: int = 3

    def lengths(self) -> list[int]:
        """The token count of every sequence, training ones first, then validation ones."""
        return sequence_lengths(self.seq_len, self.sequences + self.validation)

    def check(self, n_up: int | None) -> None:
        """ValueError on impossible sizes (``n_up`` None: not known before the policy is bound)."""
        if n_up is not None and min(self.lengths()) <= n_up:
            raise ValueError(f"seq_len ({min(self.lengths())}) must exceed the policy's n_up ({n_up}) so that "
                             "tokens are evicted")
        for name in ("sequences", "steps", "batch_sequences", "validation", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_sequences > self.sequences:
            raise ValueError(f"batch_sequences ({self.batch_sequences}) must not exceed sequences ({self.sequences})")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")


@dataclass
class Replay:
    """What :func:`replay_attention` needs for one sequence: per layer, the update that evicted each
    token (H, T) (None: the layer evicted nothing, plain causal attention) and each position's last
    update (T,) (−1 before the first), the first position that misses an evicted token, and the
    kernels (None: no LESS, the kept keys alone)."""

    evict_at: list[Tensor | None]
    interval: list[Tensor | None]
    first_eviction: int
    kernels: LessKernels | None

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        """(B, Hq, T, D) attention output of ``layer`` for one row (B = 1)."""
        if query.shape[0] != 1:
            raise ValueError("the LESS replay runs one sequence at a time")
        if self.evict_at[layer] is None:
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                  enable_gqa=key.shape[1] != query.shape[1])
        if self.kernels is None or not torch.is_grad_enabled():
            return self._layer(layer, query, key, value, scaling)
        return checkpoint(self._layer, layer, query, key, value, scaling, use_reentrant=False)

    def _layer(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        _, Hq, T, D = query.shape
        H = key.shape[1]
        evict_at, interval = self.evict_at[layer], self.interval[layer]
        positions = torch.arange(T, device=query.device)
        held = (positions[None, :] <= positions[:, None]) & (evict_at[:, None, :] > interval[None, :, None])
        visible = held.repeat_interleave(Hq // H, dim=0)[None]  # (1, Hq, T, T)
        out, lse = sparse_attention(query, key, value, visible, scaling)  # (1, H, G, T, D)
        if self.kernels is not None:
            kernels = self.kernels.layers[layer]
            dtype = kernels.log_scale.dtype
            psi = kernels.psi(key.to(dtype)).float()
            phi = kernels.phi(query.to(dtype)).float().view(1, H, Hq // H, T, -1)
            state_h, state_z = states_by_interval(psi, value.float(), evict_at[None], interval[None])
            out = mix_per_query(out, lse, phi, kernels.log_scale.float().view(H, Hq // H), state_h, state_z)
        return out.reshape(1, Hq, T, D).to(query.dtype)


def replay_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, less_replay: Replay | None = None,
                     **kwargs) -> tuple[Tensor, None]:
    """Attention function of a replayed forward (the model's ``less_replay`` argument, see :class:`Replay`)."""
    if less_replay is None:
        raise ValueError(f"the {REPLAY_ATTENTION!r} attention needs the forward argument less_replay")
    if sliding_window is not None:
        raise ValueError("end-to-end LESS tuning supports models whose layers all attend globally")
    out = less_replay.attend(module.layer_idx, query, key, value, module.scaling if scaling is None else scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REPLAY_ATTENTION, replay_attention)
AttentionMaskInterface.register(REPLAY_ATTENTION, sdpa_mask)  # the replay builds its own visibility


def record_sequence(model, tokens: Tensor, policy: MemoryPolicy, kernels: LessKernels | None) -> dict[str, Tensor]:
    """The eviction times of ``policy`` (with LESS ``kernels``, if any) on ``tokens`` and the full
    cache's last hidden states, keyed ``"tokens"``, ``"teacher"`` (T, hidden) and, per layer that
    evicted a token, ``"{layer}.evict_at"`` (H, T) and ``"{layer}.updates"`` (U,), on the CPU
    (ordinary tensors, usable in autograd)."""
    return {k: v.clone() for k, v in _record(model, tokens, policy, kernels).items()}


@torch.inference_mode()
def _record(model, tokens: Tensor, policy: MemoryPolicy, kernels: LessKernels | None) -> dict[str, Tensor]:
    num_layers = model.config.get_text_config().num_hidden_layers
    active = policy if kernels is None else LessPolicy(policy, copy.deepcopy(kernels))
    recorder = EvictionRecorder(active, num_layers, len(tokens))
    with memory_attention_enabled(model):
        MemoryRunner(model, recorder, 1).feed([tokens])
    out = {"tokens": tokens.cpu(), "teacher": model.get_decoder()(input_ids=tokens[None], use_cache=False).last_hidden_state[0].float()}
    for layer in range(num_layers):
        if recorder.evicted_at[layer] is not None:
            updates, evict_at = recorder.intervals(layer)
            if bool((evict_at < len(updates)).any()):
                out[f"{layer}.updates"], out[f"{layer}.evict_at"] = updates, evict_at
    return {k: v.cpu().contiguous() for k, v in out.items()}


def replay_of(data: dict[str, Tensor], num_layers: int, kernels: LessKernels | None,
              device: torch.device) -> Replay:
    """The :class:`Replay` of one recorded sequence, on ``device``."""
    T = len(data["tokens"])
    positions = torch.arange(T)
    evict_at, interval, first = [], [], T
    for layer in range(num_layers):
        if f"{layer}.evict_at" in data:
            updates, times = data[f"{layer}.updates"], data[f"{layer}.evict_at"]
            first = min(first, int(updates[int(times.min())]))
            evict_at.append(times.to(device))
            interval.append(last_update(updates, positions).to(device))
        else:
            evict_at.append(None)
            interval.append(None)
    return Replay(evict_at, interval, first, kernels)


def _chunk_losses(lm_head: torch.nn.Module, student: Tensor, log_teacher: Tensor, targets: Tensor) -> Tensor:
    """(2,) summed KL(teacher ‖ student) and summed NLL of ``targets`` over a chunk of positions."""
    log_s = F.log_softmax(lm_head(student).float(), dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_s)).sum()
    return torch.stack([kl, F.nll_loss(log_s, targets, reduction="sum")])


def sequence_losses(model, data: dict[str, Tensor], replay: Replay) -> Tensor:
    """(2,) mean KL from the full cache to the replay and mean NLL of the next tokens, over the
    positions after the first eviction (differentiable in the replay's kernels under grad; the
    student's logits are recomputed in the backward pass rather than stored)."""
    device = model.device
    tokens = data["tokens"].to(device)
    with attention_implementation(model, REPLAY_ATTENTION):
        hidden = model.get_decoder()(input_ids=tokens[None], use_cache=False, less_replay=replay).last_hidden_state[0]
    teacher = data["teacher"].to(device=device, dtype=hidden.dtype)
    lm_head = model.get_output_embeddings()
    start, end = replay.first_eviction, len(tokens) - 1
    total = hidden.new_zeros(2, dtype=torch.float32)
    for a in range(start, end, LOSS_CHUNK):
        b = min(a + LOSS_CHUNK, end)
        with torch.no_grad():
            log_teacher = F.log_softmax(lm_head(teacher[a:b]).float(), dim=-1)
        args = (lm_head, hidden[a:b], log_teacher, tokens[a + 1:b + 1])
        total = total + (checkpoint(_chunk_losses, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_losses(*args))
    return total / max(end - start, 1)


def mean_losses(model, files: list[Path], kernels: LessKernels | None) -> Tensor:
    """(2,) mean KL and NLL over the sequences in ``files`` (``kernels`` None: the recorded kept keys
    alone)."""
    num_layers = model.config.get_text_config().num_hidden_layers
    with torch.no_grad():
        parts = []
        for file in files:
            data = load_file(str(file))
            parts.append(sequence_losses(model, data, replay_of(data, num_layers, kernels, model.device)))
    return torch.stack(parts).mean(0).cpu()


def check_model(model) -> None:
    """ValueError for a model the replay cannot run (sliding-window layers, soft-capped logits)."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        windowed = any(t != "full_attention" for t in layer_types)
    else:
        windowed = bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)
    if windowed:
        raise ValueError("end-to-end LESS tuning supports models whose layers all attend globally")
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError("end-to-end LESS tuning does not support soft-capped logits")


def record_all(model, tokenizer, policy: MemoryPolicy, kernels: LessKernels, data_dir: Path, config: TuneConfig,
               progress: bool = True) -> tuple[list[Path], list[Path], list[Path]]:
    """Record every training and validation sequence of the corpus's train split into ``data_dir``
    with the starting kernels active, and the validation ones once more with the policy alone (its
    own evictions, the baseline of the report); sequences already there are reused. Returns the
    training, the validation and the policy-alone files."""
    from safetensors import safe_open

    from namm.tasks.corpus import corpus_tokens

    lengths = config.lengths()
    tokens = corpus_tokens(tokenizer, sum(lengths), split="train", seed=config.seed)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    jobs = [(f"seq_{i:04d}", i, kernels) for i in range(len(lengths))]
    jobs += [(f"alone_{i:04d}", i, None) for i in range(config.sequences, len(lengths))]
    files = []
    for name, i, active in tqdm(jobs, desc="record", disable=not progress):
        file = data_dir / f"{name}.safetensors"
        files.append(file)
        if not file.is_file():
            seq = tokens[starts[i]:starts[i] + lengths[i]].to(model.device)
            save_tensors(file, record_sequence(model, seq, policy, active))
        with safe_open(str(file), framework="pt") as f:
            if not any(key.endswith(".evict_at") for key in f.keys()):
                raise ValueError(f"the policy evicted no token of {lengths[i]}-token sequence {i}: nothing to "
                                 "tune; use a smaller --budget or a longer --seq-len")
    n = len(lengths)
    return files[:config.sequences], files[config.sequences:n], files[n:]


def tune_less(model, tokenizer, policy: MemoryPolicy, kernels: LessKernels, out_dir: str | Path, config: TuneConfig,
              provenance: dict | None = None, progress: bool = True) -> Path:
    """Fine-tune ``kernels`` (trained layer-wise first) end to end for ``policy``; writes
    ``out_dir/less.safetensors`` + ``less.json`` (the kernels of lowest validation KL so far, rewritten
    at every validation that improves on them, so an interrupted run leaves usable kernels) and
    ``out_dir/tune_log.jsonl`` (one line per validation). Resumes from ``out_dir/tune_state.pt``."""
    check_model(model)
    if not policy.evicts or policy.schedule != "progressive":
        raise ValueError(f"less-tune replays progressive eviction; policy {policy.name!r} "
                         + ("evicts nothing" if not policy.evicts else "is on the prompt-end schedule")
                         + " (use --schedule progressive with an evicting policy)")
    expected = KernelConfig.for_model(model, kernels.config.hidden, kernels.config.rank)
    if kernels.config != expected:
        raise ValueError(f"the kernels to tune have config {kernels.config.to_dict()}; this model needs "
                         f"{expected.to_dict()}")
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    model.requires_grad_(False)
    policy.bind(model)
    config.check(policy.n_up)
    kernels = copy.deepcopy(kernels).float().to(model.device).train().requires_grad_(True)
    settings = {"tune": asdict(config), "kernels": kernels.config.to_dict(), "data_format": DATA_FORMAT,
                **(provenance or {})}
    claim_run_dir(out_dir, settings)

    files, held, alone = record_all(model, tokenizer, policy, kernels, out_dir / "data", config, progress)
    num_layers = model.config.get_text_config().num_hidden_layers
    optimizer = torch.optim.Adam(kernels.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    state_file, log_file = out_dir / "tune_state.pt", out_dir / "tune_log.jsonl"
    if state_file.is_file():
        state = torch.load(state_file, map_location=model.device)
        kernels.load_state_dict(state["kernels"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    else:
        policy_alone = mean_losses(model, alone, None)
        before = mean_losses(model, held, kernels)
        state = {"step": 0, "stale": 0, "best": copy.deepcopy(kernels.state_dict()), "best_loss": float(before[0]),
                 "best_step": 0, "policy_alone": policy_alone.tolist(), "start": before.tolist(), "train_seconds": 0.0}
        log_file.write_text(json.dumps({"step": 0, "validation_kl": float(before[0]), "validation_nll": float(before[1]),
                                        "policy_alone_kl": float(policy_alone[0]),
                                        "policy_alone_nll": float(policy_alone[1])}) + "\n")
    bar = tqdm(range(state["step"] + 1, config.steps + 1), desc="tune", disable=not progress)
    running, step_seconds = [], 0.0
    for step in bar:
        if state["stale"] >= config.patience:
            break
        step_start = time.perf_counter()
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        optimizer.zero_grad()
        for i in torch.randperm(len(files), generator=gen)[:config.batch_sequences].tolist():
            data = load_file(str(files[i]))
            loss = sequence_losses(model, data, replay_of(data, num_layers, kernels, model.device))[0]
            (loss / config.batch_sequences).backward()
            running.append(float(loss.detach()))
        optimizer.step()
        schedule.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()  # once per step, for the timing only
        step_seconds += time.perf_counter() - step_start
        bar.set_postfix(kl=f"{running[-1]:.4g}")
        if step % config.eval_every == 0 or step == config.steps:
            validation = mean_losses(model, held, kernels)
            better = float(validation[0]) < state["best_loss"]
            if better:
                state.update(best=copy.deepcopy(kernels.state_dict()), best_loss=float(validation[0]), best_step=step)
            state.update(step=step, stale=0 if better else state["stale"] + 1,
                         kernels=kernels.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict(),
                         train_seconds=state["train_seconds"] + step_seconds)
            step_seconds = 0.0
            torch.save(state, state_file.with_suffix(".partial"))
            state_file.with_suffix(".partial").replace(state_file)
            if better:
                save_best(out_dir, state, settings)
            with log_file.open("a") as log:  # after the state: a resumed run never logs a step twice
                log.write(json.dumps({"step": step, "train_kl": sum(running) / len(running),
                                      "validation_kl": float(validation[0]), "validation_nll": float(validation[1]),
                                      "step_seconds_total": round(state["train_seconds"], 1)}) + "\n")
            running = []
    return save_best(out_dir, state, settings)


def save_best(out_dir: Path, state: dict, settings: dict) -> Path:
    """Write the run's best kernels so far (``settings`` as claimed for the run) with their report
    (``less.json``'s ``end_to_end``)."""
    best = LessKernels(KernelConfig(**settings["kernels"]))
    best.load_state_dict(state["best"])
    policy_kl, start_kl = state["policy_alone"][0], state["start"][0]
    report = {"validation_kl_policy_alone": policy_kl, "validation_kl_start": start_kl,
              "validation_kl_best": state["best_loss"], "best_step": state["best_step"], "last_step": state["step"],
              "kl_removed_vs_policy_start": 1 - start_kl / policy_kl if policy_kl > 0 else 0.0,
              "kl_removed_vs_policy_best": 1 - state["best_loss"] / policy_kl if policy_kl > 0 else 0.0,
              "step_seconds_total": round(state["train_seconds"], 1)}
    if state["train_seconds"] > 0 and state["step"] > 0:
        report["sequences_per_minute"] = round(state["step"] * settings["tune"]["batch_sequences"]
                                               / (state["train_seconds"] / 60), 3)
    return save_less_kernels(out_dir, best.eval(), {**settings, "end_to_end": report})
