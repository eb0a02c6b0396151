"""Train LESS kernels layer by layer by gradient descent on a frozen model.

1. **Capture** (once per training sequence, cached on disk): run the model with the eviction
   policy and record every layer's queries, keys and values (after RoPE) through the runtime's
   attention hook, and, per layer and KV head, which tokens each memory update evicted. For a
   random subset of the query positions past the first update, store the exact attention over
   the kept keys (output and log-sum-exp) and over all keys (the target: the full-cache output
   for the same layer input).
2. **Fit** each layer alone: the loss is the MSE, after ``o_proj``, between the LESS output
   (kept keys + low-rank memory of the evicted ones) and the full-cache output. Minibatches of
   sequences, Adam; each finished layer is saved, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from namm.less.checkpoint import save_less_kernels
from namm.less.kernels import KernelConfig, LayerKernels, LessKernels, mix_low_rank, sparse_attention
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.wrapped import WrappedPolicy


@dataclass
class TrainConfig:
    """Sizes of a LESS training run (defaults: 16 sequences of 2048 tokens)."""

    sequences: int = 16
    seq_len: int = 2048
    queries_per_seq: int = 256
    steps: int = 300
    batch_sequences: int = 4
    lr: float = 1e-3
    hidden: int = 512
    rank: int = 8
    seed: int = 0

    def check(self, n_up: int) -> None:
        if self.seq_len <= n_up:
            raise ValueError(f"seq_len ({self.seq_len}) must exceed the policy's n_up ({n_up}) so that tokens are evicted")
        for name in ("sequences", "queries_per_seq", "steps", "batch_sequences", "hidden", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")


class _Recorder(WrappedPolicy):
    """Run ``inner`` and record, per layer, every query, key and value (after RoPE) through the
    attention hook and, at every update, the (H, T) mask of the tokens evicted so far."""

    def __init__(self, inner: MemoryPolicy, num_layers: int, length: int):
        super().__init__(inner)
        self.length = length
        self.qkv: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(num_layers)]
        self.updates: list[list[int]] = [[] for _ in range(num_layers)]
        self.evicted: list[list[Tensor]] = [[] for _ in range(num_layers)]

    def attend(self, layer_idx, query, key, value, visible, scaling):
        Q = query.shape[2]  # one row, no padding: the step's keys are the last Q slots
        self.qkv[layer_idx].append((query[0].cpu(), key[0, :, -Q:].cpu(), value[0, :, -Q:].cpu()))  # trained on the CPU
        return None

    def select(self, view: LayerView) -> Tensor:
        keep = super().select(view)
        layer = view.layer_idx
        gone = self.evicted[layer][-1].clone() if self.evicted[layer] else torch.zeros(
            view.keys.shape[1], self.length, dtype=torch.bool)
        heads, slots = (view.valid & ~keep)[0].nonzero(as_tuple=True)
        gone[heads.cpu(), view.positions[0, heads, slots].cpu()] = True
        self.updates[layer].append(int(view.tokens_seen[0]))
        self.evicted[layer].append(gone)
        return keep


def attention_modules(model) -> list[torch.nn.Module]:
    """The attention module of every layer (the ones holding ``o_proj``), in layer order."""
    found = sorted((m for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "layer_idx")),
                   key=lambda m: m.layer_idx)
    if len(found) != model.config.get_text_config().num_hidden_layers:
        raise ValueError("LESS training needs attention modules with an `o_proj` and a `layer_idx` in every layer")
    return found


@torch.inference_mode()
def capture_sequence(model, tokens: Tensor, policy: MemoryPolicy, queries_per_seq: int,
                     gen: torch.Generator) -> dict[str, Tensor]:
    """Training tensors of one sequence for every full-attention layer (see the module docstring)."""
    num_layers = model.config.get_text_config().num_hidden_layers
    T = len(tokens)
    record = _Recorder(policy, num_layers, T)
    with memory_attention_enabled(model):
        runner = MemoryRunner(model, record, 1)
        runner.feed([tokens])
    out: dict[str, Tensor] = {}
    for layer_idx, cache_layer in enumerate(runner.cache.layers):
        updates = [u for u in record.updates[layer_idx] if u < T]
        if cache_layer.sliding_window is not None or not updates:
            continue
        q, k, v = (torch.cat(parts, dim=1).float() for parts in zip(*record.qkv[layer_idx]))  # (H or Hq, T, D)
        evicted = torch.stack(record.evicted[layer_idx][:len(updates)])  # (U, H, T)
        pool = torch.arange(updates[0], T)
        t = pool[torch.randperm(len(pool), generator=gen)[:queries_per_seq]].sort().values
        interval = torch.searchsorted(torch.tensor(updates), t, right=True) - 1
        Hq, H = q.shape[0], k.shape[0]
        causal = torch.arange(T)[None, :] <= t[:, None]  # (Nq, T)
        qs = q[:, t][None]
        target, _ = sparse_attention(qs, k[None], v[None], causal[None, None], cache_layer.scaling)
        kept = causal[:, None, :] & ~evicted[interval]  # (Nq, H, T)
        visible = kept.permute(1, 0, 2).repeat_interleave(Hq // H, dim=0)[None]
        sparse, lse = sparse_attention(qs, k[None], v[None], visible, cache_layer.scaling)
        cut = updates[-1]
        out.update({
            f"{layer_idx}.q": qs[0].contiguous(), f"{layer_idx}.k": k[:, :cut].contiguous(),
            f"{layer_idx}.v": v[:, :cut].contiguous(), f"{layer_idx}.evicted": evicted[:, :, :cut].contiguous(),
            f"{layer_idx}.interval": interval, f"{layer_idx}.sparse": sparse[0].contiguous(),
            f"{layer_idx}.lse": lse[0].contiguous(), f"{layer_idx}.target": target[0].contiguous(),
        })
    return out


def layer_loss(kernels: LayerKernels, ex: dict[str, Tensor], o_proj: Tensor, use_less: bool = True) -> Tensor:
    """MSE after ``o_proj`` between LESS (or, without ``use_less``, the policy alone) and the full cache."""
    sparse, target = ex["sparse"], ex["target"]  # (H, G, Nq, D)
    H, G, Nq, D = sparse.shape
    out = sparse
    if use_less:
        evicted = ex["evicted"].float()  # (U, H, T)
        psi = kernels.psi(ex["k"])  # (H, T, R)
        state_h = torch.einsum("uht,htr,htd->uhrd", evicted, psi, ex["v"])[ex["interval"]]  # (Nq, H, R, D)
        state_z = torch.einsum("uht,htr->uhr", evicted, psi)[ex["interval"]]
        phi = kernels.phi(ex["q"]).view(H, G, Nq, 1, -1).permute(2, 0, 1, 3, 4)  # (Nq, H, G, 1, R)
        mixed = mix_low_rank(sparse.permute(2, 0, 1, 3).unsqueeze(3), ex["lse"].permute(2, 0, 1).unsqueeze(3), phi,
                             kernels.log_scale.view(H, G), state_h, state_z)
        out = mixed.squeeze(3).permute(1, 2, 0, 3)
    diff = (out - target).permute(2, 0, 1, 3).reshape(Nq, H * G * D) @ o_proj.T
    return diff.pow(2).mean()


def _examples(files: list[Path], layer_idx: int) -> list[dict[str, Tensor]]:
    out = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if f"{layer_idx}.q" not in f.keys():
                return []
            ex = {name: f.get_tensor(f"{layer_idx}.{name}")
                  for name in ("q", "k", "v", "evicted", "interval", "sparse", "lse", "target")}
        Hq, Nq, D = ex["q"].shape
        H = ex["k"].shape[0]
        ex["sparse"] = ex["sparse"].view(H, Hq // H, Nq, D)
        ex["lse"] = ex["lse"].view(H, Hq // H, Nq)
        ex["target"] = ex["target"].view(H, Hq // H, Nq, D)
        out.append(ex)
    return out


def _mean_loss(kernels: LayerKernels, examples, o_proj: Tensor, use_less: bool = True) -> float:
    with torch.no_grad():
        return sum(float(layer_loss(kernels, ex, o_proj, use_less)) for ex in examples) / len(examples)


def fit_layer(kernels: LayerKernels, examples: list[dict[str, Tensor]], o_proj: Tensor, config: TrainConfig,
              progress: bool = True, desc: str = "") -> dict:
    """Fit one layer's kernels: a coarse search of φ's log-scale, then Adam. Returns the losses."""
    gen = torch.Generator().manual_seed(config.seed)
    policy_loss = _mean_loss(kernels, examples, o_proj, use_less=False)
    probe = examples[:2]
    best = (math.inf, 0.0)
    for s in range(-21, 10, 3):
        with torch.no_grad():
            kernels.log_scale.fill_(float(s))
        best = min(best, (_mean_loss(kernels, probe, o_proj), float(s)))
    with torch.no_grad():
        kernels.log_scale.fill_(best[1])
    optimizer = torch.optim.Adam(kernels.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    bar = tqdm(range(config.steps), desc=desc, leave=False, disable=not progress)
    for _ in bar:
        pick = torch.randperm(len(examples), generator=gen)[: config.batch_sequences]
        loss = sum(layer_loss(kernels, examples[i], o_proj) for i in pick.tolist()) / len(pick)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3g}", policy=f"{policy_loss:.3g}")
    less_loss = _mean_loss(kernels, examples, o_proj)
    return {"policy_mse": policy_loss, "less_mse": less_loss,
            "gap_closed": 1 - less_loss / policy_loss if policy_loss > 0 else 0.0}


def train_less(model, tokenizer, policy: MemoryPolicy, out_dir: str | Path, config: TrainConfig,
               provenance: dict | None = None, progress: bool = True) -> Path:
    """Capture (or reuse) training data in ``out_dir/data``, fit every layer (resuming from
    ``out_dir/layers``) and write ``out_dir/less.safetensors`` + ``less.json``. Training text is the
    offline corpus's ``train`` split, never the held-out one."""
    from namm.tasks.corpus import corpus_tokens

    config.check(policy.n_up)
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    (out_dir / "layers").mkdir(parents=True, exist_ok=True)
    model.requires_grad_(False)
    kernels = LessKernels(KernelConfig.for_model(model, config.hidden, config.rank), seed=config.seed)
    settings = {"train": asdict(config), "kernels": kernels.config.to_dict(), **(provenance or {})}
    settings_file = out_dir / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise ValueError(f"{out_dir} holds a run with other settings; use a new --out directory")
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")

    tokens = corpus_tokens(tokenizer, config.sequences * config.seq_len, split="train", seed=config.seed)
    files = []
    start = time.perf_counter()
    for i in tqdm(range(config.sequences), desc="capture", disable=not progress):
        file = out_dir / "data" / f"seq_{i:04d}.safetensors"
        files.append(file)
        if file.is_file():
            continue
        seq = tokens[i * config.seq_len:(i + 1) * config.seq_len]
        gen = torch.Generator().manual_seed(config.seed * 100_003 + i)
        tensors = capture_sequence(model, seq, policy, config.queries_per_seq, gen)
        save_file(tensors, str(file.with_suffix(".partial")))
        file.with_suffix(".partial").replace(file)

    modules = attention_modules(model)
    report = {}
    for layer_idx in tqdm(range(kernels.config.num_layers), desc="layers", disable=not progress):
        file = out_dir / "layers" / f"layer_{layer_idx:03d}.safetensors"
        layer = kernels.layers[layer_idx]
        if file.is_file():
            layer.load_state_dict(load_file(str(file)))
            report[layer_idx] = json.loads(file.with_suffix(".json").read_text())
            continue
        examples = _examples(files, layer_idx)
        if examples:
            o_proj = modules[layer_idx].o_proj.weight.detach().float().cpu()
            report[layer_idx] = fit_layer(layer, examples, o_proj, config, progress, desc=f"layer {layer_idx}")
        else:
            report[layer_idx] = {"skipped": "sliding-window layer or no eviction"}
        save_file({k: v.detach().contiguous() for k, v in layer.state_dict().items()}, str(file))
        file.with_suffix(".json").write_text(json.dumps(report[layer_idx]) + "\n")
    provenance = {**settings, "layers": report, "train_seconds_this_run": round(time.perf_counter() - start, 1)}
    return save_less_kernels(out_dir, kernels, provenance)
