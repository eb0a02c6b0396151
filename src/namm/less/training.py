"""Train LESS kernels by gradient descent on a frozen model, many layers at once.

1. **Capture** (once per training sequence, cached on disk, see :mod:`namm.less.capture`): the
   queries, keys, values and eviction times of every layer under the eviction policy, and the
   full-cache targets of a sample of query positions.
2. **Fit**: the loss of a layer is the MSE, after ``o_proj``, between the LESS output (kept keys +
   low-rank memory of the evicted ones) and the full-cache output. The layers of a pass (all of
   them unless ``layers_per_pass`` says otherwise) are fitted together: their weights are stacked
   along a layer axis and one batched forward computes every layer's loss, so a step costs a few
   large tensor operations instead of one small loop per layer and sequence. Layers do not share
   parameters, so the summed loss trains each exactly as alone. Minibatches of sequences, Adam,
   on the model's device; each finished pass is saved, so an interrupted run resumes there.
3. **Early stopping**: a few more sequences of the training split are captured but never fitted.
   Every ``eval_every`` steps each layer's loss on them is measured and the layer keeps the weights
   of its best evaluation; the pass stops once no layer has improved for ``patience`` evaluations.
   The reported losses are those of this validation split.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from namm.less.capture import attention_modules, capture_sequence
from namm.less.checkpoint import save_less_kernels
from namm.less.kernels import KernelConfig, LayerKernels, LessKernels, head_mlp, mix_per_query, states_by_interval
from namm.policies.base import MemoryPolicy
from namm.tensor_files import save_tensors

DATA_FORMAT = 2  # version of the captured data in OUT/data (2: eviction times instead of masks)
FIELDS = ("q", "k", "v", "evict_at", "interval", "sparse", "lse", "target")
LOG_SCALE_GRID = range(-21, 10, 3)  # coarse search of φ's log-scale before Adam
PADDING = torch.iinfo(torch.int32).max  # ``evict_at`` of the keys that pad a shorter sequence: never evicted


def sequence_lengths(seq_len: int | list[int], count: int) -> list[int]:
    """The token count of each of ``count`` sequences: the lengths of ``seq_len`` in turn."""
    cycle = seq_len if isinstance(seq_len, list) else [seq_len]
    return [cycle[i % len(cycle)] for i in range(count)]


@dataclass
class TrainConfig:
    """Sizes of a LESS training run (defaults: 16 sequences of 2048 tokens + 4 for early stopping,
    all layers per pass). ``seq_len`` may list several lengths: sequence i (training, then
    validation) has ``seq_len[i % len(seq_len)]`` tokens, so the state learns to hold as many folded
    tokens as each length evicts."""

    sequences: int = 16
    seq_len: int | list[int] = 2048
    queries_per_seq: int = 256
    steps: int = 300
    batch_sequences: int = 4
    lr: float = 1e-3
    hidden: int = 512
    rank: int = 8
    seed: int = 0
    layers_per_pass: int | None = None
    validation: int = 4
    eval_every: int = 20
    patience: int = 5

    def lengths(self) -> list[int]:
        """The token count of every captured sequence, training ones first, then validation ones."""
        return sequence_lengths(self.seq_len, self.sequences + self.validation)

    def check(self, n_up: int | None) -> None:
        """ValueError on impossible sizes (``n_up`` None: not known before the policy is bound)."""
        shortest = min(self.lengths())
        if n_up is not None and shortest <= n_up:
            raise ValueError(f"seq_len ({shortest}) must exceed the policy's n_up ({n_up}) so that tokens are evicted")
        for name in ("sequences", "queries_per_seq", "steps", "batch_sequences", "hidden", "rank", "eval_every",
                     "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.validation < 0:
            raise ValueError("validation must be >= 0")
        if self.layers_per_pass is not None and self.layers_per_pass < 1:
            raise ValueError("layers_per_pass must be >= 1")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")


def stack_layers(layers: list[LayerKernels], device: torch.device) -> dict[str, Tensor]:
    """The float32 weights of ``layers`` stacked along a new first (layer) axis, as trainable leaves."""
    states = [layer.state_dict() for layer in layers]
    return {name: torch.stack([s[name] for s in states]).float().to(device).requires_grad_(True) for name in states[0]}


def unstack_layers(params: dict[str, Tensor], layers: list[LayerKernels]) -> None:
    """Copy stacked weights back into ``layers`` (on the CPU)."""
    for i, layer in enumerate(layers):
        layer.load_state_dict({name: p[i].detach().cpu() for name, p in params.items()})


def _mlp(params: dict[str, Tensor], which: str, x: Tensor) -> Tensor:
    return head_mlp(x, *(params[f"{which}.{w}"] for w in ("w1", "b1", "w2", "b2")))


def group_loss(params: dict[str, Tensor], batch: dict[str, Tensor], o_proj: Tensor, use_less: bool = True) -> Tensor:
    """(L,) per-layer MSE after ``o_proj`` (L, hidden, Hq·D) between LESS (or, without ``use_less``,
    the policy alone) and the full cache, over a batch of S sequences and L layers: ``q`` (S, L, Hq,
    Nq, D), ``k``/``v`` (S, L, H, T, D), ``evict_at`` (S, L, H, T), ``interval`` (S, L, Nq), ``sparse``
    and ``target`` (S, L, H, G, Nq, D), ``lse`` (S, L, H, G, Nq)."""
    sparse, target = batch["sparse"], batch["target"]
    S, L, H, G, Nq, D = sparse.shape
    out = sparse
    if use_less:
        psi = _mlp(params, "psi", batch["k"])  # (S, L, H, T, R)
        state_h, state_z = states_by_interval(psi, batch["v"], batch["evict_at"], batch["interval"])
        phi = _mlp(params, "phi", batch["q"]).view(S, L, H, G, Nq, -1)
        out = mix_per_query(sparse, batch["lse"], phi, params["log_scale"].view(L, H, G), state_h, state_z)
    diff = (out - target).permute(0, 1, 4, 2, 3, 5).reshape(S, L, Nq, H * G * D)
    return torch.einsum("slnk,lmk->slnm", diff, o_proj).pow(2).mean(dim=(0, 2, 3))


def load_group(files: list[Path], layers: list[int], device: torch.device) -> dict[str, Tensor]:
    """The captured tensors of ``layers`` from every sequence file, stacked (S, L, ...) on ``device``.
    Sequences of other lengths are padded to the longest with tokens that are never evicted (zero
    keys and values, ``evict_at`` = ``PADDING``), which add nothing to the state."""
    per_file = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            per_file.append({name: torch.stack([f.get_tensor(f"{layer}.{name}") for layer in layers])
                             for name in FIELDS})
    longest = max(d["k"].shape[-2] for d in per_file)
    for d in per_file:
        pad = longest - d["k"].shape[-2]
        d["k"], d["v"] = (F.pad(d[name], (0, 0, 0, pad)) for name in ("k", "v"))
        d["evict_at"] = F.pad(d["evict_at"], (0, pad), value=PADDING)
    try:
        return {name: torch.stack([d[name] for d in per_file]).to(device) for name in FIELDS}
    except RuntimeError as err:
        raise ValueError(f"captured sequences differ in shape (the policy must update at the same points in "
                         f"every sequence of one length): {err}") from None


def length_groups(data: dict[str, Tensor]) -> list[tuple[Tensor, int]]:
    """(indices, tokens) of each set of sequences of one length in ``data``: a batch drawn from one
    set is cut to its own tokens, so no step pays for another length's padding."""
    tokens = (data["evict_at"][:, 0, 0] != PADDING).sum(-1).cpu()  # (S,): one sync per call, never per Adam step
    return [((tokens == n).nonzero().flatten(), int(n)) for n in tokens.unique().tolist()]


def take(data: dict[str, Tensor], pick: Tensor, tokens: int) -> dict[str, Tensor]:
    """The sequences ``pick`` of ``data``, cut to their first ``tokens`` keys."""
    batch = {k: v.index_select(0, pick.to(v.device)) for k, v in data.items()}
    batch["k"], batch["v"] = batch["k"][..., :tokens, :], batch["v"][..., :tokens, :]
    batch["evict_at"] = batch["evict_at"][..., :tokens]
    return batch


def _mean_loss(params: dict[str, Tensor], data: dict[str, Tensor], o_proj: Tensor, batch: int,
               use_less: bool = True) -> Tensor:
    """(L,) per-layer loss averaged over every sequence of ``data``, ``batch`` sequences of one length
    at a time."""
    with torch.no_grad():
        parts = [group_loss(params, take(data, index[i:i + batch], tokens), o_proj, use_less) * len(index[i:i + batch])
                 for index, tokens in length_groups(data) for i in range(0, len(index), batch)]
    return torch.stack(parts).sum(0) / data["q"].shape[0]


def _search_log_scale(params: dict[str, Tensor], probe: dict[str, Tensor], o_proj: Tensor, batch: int) -> None:
    """Set each layer's log-scale to the best of a coarse grid on the ``probe`` sequences."""
    grid = torch.tensor(list(LOG_SCALE_GRID), dtype=torch.float32)
    with torch.no_grad():
        scores = []
        for s in grid.tolist():
            params["log_scale"].fill_(s)
            scores.append(_mean_loss(params, probe, o_proj, batch))
        best = grid.to(o_proj.device)[torch.stack(scores).argmin(0)]  # (L,)
        params["log_scale"].copy_(best[:, None].expand_as(params["log_scale"]))


def fit_group(params: dict[str, Tensor], data: dict[str, Tensor], o_proj: Tensor, config: TrainConfig,
              progress: bool = True, desc: str = "", validation: dict[str, Tensor] | None = None,
              search_scale: bool = True) -> list[dict]:
    """Fit a stack of layers: a coarse search of each layer's log-scale (skipped for ``search_scale``
    False: weights already trained), then Adam on the summed loss, each layer keeping its weights of
    lowest ``validation`` loss (early stopping; without validation data, the last weights). Returns
    each layer's losses (policy alone, LESS, share of the error removed) on the validation data, or
    on the training data when there is none."""
    gen = torch.Generator().manual_seed(config.seed)
    S = data["q"].shape[0]
    groups = length_groups(data)
    group_of = {int(i): g for g, (index, _) in enumerate(groups) for i in index}
    if search_scale:
        _search_log_scale(params, {k: v[:2] for k, v in data.items()}, o_proj, config.batch_sequences)
    judge = validation if validation is not None else data
    stopper = (EarlyStopping(params, lambda: _mean_loss(params, validation, o_proj, config.batch_sequences))
               if validation is not None else None)
    optimizer = torch.optim.Adam(params.values(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    bar = tqdm(range(1, config.steps + 1), desc=desc, leave=False, disable=not progress)
    for step in bar:
        # a length drawn by its share of the sequences, then a batch of that length
        index, tokens = groups[group_of[int(torch.randint(S, (1,), generator=gen))] if len(groups) > 1 else 0]
        pick = index[torch.randperm(len(index), generator=gen)[: config.batch_sequences]]
        loss = group_loss(params, take(data, pick, tokens), o_proj).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3g}")
        if stopper is not None and (step % config.eval_every == 0 or step == config.steps):
            if stopper.check(step) >= config.patience:
                break
    if stopper is not None:
        stopper.restore()
    policy_loss = _mean_loss(params, judge, o_proj, config.batch_sequences, use_less=False)
    less_loss = _mean_loss(params, judge, o_proj, config.batch_sequences)
    reports = [{"policy_mse": float(p), "less_mse": float(q), "gap_closed": float(1 - q / p) if p > 0 else 0.0}
               for p, q in zip(policy_loss, less_loss)]
    if stopper is not None:
        for report, best_step in zip(reports, stopper.best_step.tolist()):
            report.update(measured_on="validation", best_step=best_step, last_step=step)
    return reports


class EarlyStopping:
    """Per-layer best weights of a stack of layers (first axis of every parameter) by a loss."""

    def __init__(self, params: dict[str, Tensor], layer_losses) -> None:
        self.params, self.layer_losses = params, layer_losses
        self.best_loss = layer_losses()  # (L,) before any step: a layer never ends worse than it started
        self.best = {name: p.detach().clone() for name, p in params.items()}
        self.best_step = torch.zeros_like(self.best_loss, dtype=torch.long)
        self.stale = 0

    def check(self, step: int) -> int:
        """Measure now, keep improved layers' weights; returns evaluations since any layer improved."""
        loss = self.layer_losses()
        better = loss < self.best_loss
        for name, p in self.params.items():
            mask = better.view(-1, *[1] * (p.dim() - 1))
            self.best[name] = torch.where(mask, p.detach(), self.best[name])
        self.best_loss = torch.where(better, loss, self.best_loss)
        self.best_step[better] = step
        self.stale = 0 if bool(better.any()) else self.stale + 1
        return self.stale

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.best[name])


def capture_all(model, tokenizer, policy: MemoryPolicy, data_dir: Path, config: TrainConfig,
                progress: bool = True) -> tuple[list[Path], list[Path], int]:
    """Capture every training and validation sequence into ``data_dir`` (sequences already there are
    reused). Returns the training files, the validation files and how many were captured now. All
    of it is the offline corpus's ``train`` split, never the held-out one; the validation sequences
    follow the training ones."""
    from namm.tasks.corpus import corpus_tokens

    lengths = config.lengths()
    tokens = corpus_tokens(tokenizer, sum(lengths), split="train", seed=config.seed)
    starts = [0, *itertools.accumulate(lengths)]
    files, fresh = [], 0
    for i in tqdm(range(len(lengths)), desc="capture", disable=not progress):
        file = data_dir / f"seq_{i:04d}.safetensors"
        files.append(file)
        if file.is_file():
            continue
        seq = tokens[starts[i]:starts[i + 1]].to(model.device)
        gen = torch.Generator().manual_seed(config.seed * 100_003 + i)
        tensors = capture_sequence(model, seq, policy, config.queries_per_seq, gen)
        save_tensors(file, tensors)
        fresh += 1
    return files[:config.sequences], files[config.sequences:], fresh


def claim_run_dir(out_dir: Path, settings: dict) -> None:
    """Write ``settings`` to ``out_dir/settings.json``, or check that a run already there has the
    same ones (ValueError otherwise: resuming must not mix two runs)."""
    settings_file = out_dir / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise ValueError(f"{out_dir} holds a run with other settings; use a new --out directory")
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")


def train_less(model, tokenizer, policy: MemoryPolicy, out_dir: str | Path, config: TrainConfig,
               provenance: dict | None = None, progress: bool = True, init: LessKernels | None = None) -> Path:
    """Capture (or reuse) training data in ``out_dir/data``, fit the layers pass by pass (resuming
    from ``out_dir/layers``) on the model's device and write ``out_dir/less.safetensors`` +
    ``less.json``. ``init``: trained kernels of the same shape to continue from (a warm restart of
    the learning-rate schedule; each layer ends no worse on the validation sequences than it
    began). The provenance records the time taken and the sequences per minute of this run."""
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    (out_dir / "layers").mkdir(parents=True, exist_ok=True)
    model.requires_grad_(False)
    policy.bind(model)  # resolves defaults that depend on the model (e.g. the shipped NAMM's n_up)
    config.check(policy.n_up)
    kernels = LessKernels(KernelConfig.for_model(model, config.hidden, config.rank), seed=config.seed)
    if init is not None:
        if init.config != kernels.config:
            raise ValueError(f"the kernels to continue from have config {init.config.to_dict()}; this model and "
                             f"--hidden/--rank need {kernels.config.to_dict()}")
        kernels.load_state_dict(init.state_dict())
    settings = {"train": asdict(config), "kernels": kernels.config.to_dict(), "data_format": DATA_FORMAT,
                **(provenance or {})}
    claim_run_dir(out_dir, settings)

    start = time.perf_counter()
    files, held, fresh = capture_all(model, tokenizer, policy, out_dir / "data", config, progress)
    captured = time.perf_counter()
    with safe_open(str(files[0]), framework="pt") as f:
        trained = sorted({int(key.split(".")[0]) for key in f.keys()})
    layer_file = lambda i: out_dir / "layers" / f"layer_{i:03d}.safetensors"
    pending = [i for i in trained if not layer_file(i).is_file()]
    size = config.layers_per_pass or len(pending) or 1
    modules = attention_modules(model)
    for first in tqdm(range(0, len(pending), size), desc="passes", disable=not progress):
        group = pending[first:first + size]
        layers = [kernels.layers[i] for i in group]
        params = stack_layers(layers, model.device)
        o_proj = torch.stack([modules[i].o_proj.weight.detach().float() for i in group])
        data = load_group(files, group, model.device)
        validation = load_group(held, group, model.device) if held else None
        reports = fit_group(params, data, o_proj, config, progress, desc=f"layers {group[0]}-{group[-1]}",
                            validation=validation, search_scale=init is None)
        unstack_layers(params, layers)
        for i, report in zip(group, reports):
            save_file({k: v.contiguous() for k, v in kernels.layers[i].state_dict().items()}, str(layer_file(i)))
            layer_file(i).with_suffix(".json").write_text(json.dumps(report) + "\n")
    report = {}
    for i, layer in enumerate(kernels.layers):
        if i in trained:
            layer.load_state_dict(load_file(str(layer_file(i))))
            report[i] = json.loads(layer_file(i).with_suffix(".json").read_text())
        else:
            report[i] = {"skipped": "sliding-window layer or no eviction"}
    done = time.perf_counter()
    timing = {"capture_seconds_this_run": round(captured - start, 1), "fit_seconds_this_run": round(done - captured, 1),
              "train_seconds_this_run": round(done - start, 1)}
    if fresh == len(files) + len(held) and len(pending) == len(trained):  # a whole run, nothing reused
        timing["sequences_per_minute"] = round((len(files) + len(held)) / ((done - start) / 60), 3)
    provenance = {**settings, "layers": report, **timing}
    return save_less_kernels(out_dir, kernels, provenance)
