"""NAMM scoring networks: map every token's feature vector to one score (docs/algorithm.md §5).

A scorer is a parameter layout over one flat vector. ``score`` takes one parameter vector per
batch row (B, num_params), so P population members run on P rows in one batched call; one
vector is shared by all layers and heads of a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


def split_params(params: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Cut (B, n) flat parameters into (B, *shape) tensors, row-major, in the order given."""
    sizes = [math.prod(s) for s in shapes]
    return [p.reshape(params.shape[0], *s) for p, s in zip(params.split(sizes, dim=1), shapes)]


def batched_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x (B, ..., in) @ weight (B, in, out) + bias (B, out), one weight per batch row."""
    B = x.shape[0]
    out = torch.baddbmm(bias[:, None, :], x.reshape(B, -1, x.shape[-1]), weight)
    return out.reshape(*x.shape[:-1], weight.shape[-1])


def backward_order(valid: Tensor) -> Tensor:
    """(B, H, K) permutation putting each head's valid slots (a packed prefix) newest first and
    leaving empty slots at the end. It is its own inverse."""
    held = valid.sum(-1, keepdim=True)
    idx = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    return torch.where(idx < held, held - 1 - idx, idx)


def permute_slots(x: Tensor, order: Tensor) -> Tensor:
    """Gather (B, H, K, ...) along the slot dimension with a (B, H, K) permutation."""
    index = order.reshape(*order.shape, *([1] * (x.dim() - 3))).expand_as(x)
    return torch.gather(x, 2, index)


@dataclass
class BAMScorer:
    """Backward Attention Memory: one attention head where each token attends to itself and
    NEWER tokens of its (layer, head), then a multiplicative + additive residual and a linear
    read-out. Flat layout: W_qkv (in x 3h, row-major), b_qkv, W_o (h x 2 in), b_o, w (in), b."""

    in_dim: int = 25
    hidden: int = 32
    kind: str = field(default="bam", init=False)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        d, h = self.in_dim, self.hidden
        return [(d, 3 * h), (3 * h,), (h, 2 * d), (2 * d,), (d, 1), (1,)]

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def config(self) -> dict:
        return {"kind": self.kind, "hidden": self.hidden}

    def score(self, x: Tensor, valid: Tensor, params: Tensor) -> Tensor:
        """(B, H, K) scores of features ``x`` (B, H, K, in) with ``params`` (B, num_params).
        Valid slots are a packed prefix of each head in temporal order."""
        w_qkv, b_qkv, w_o, b_o, w, b = split_params(params.to(x.device, torch.float32), self.shapes)
        order = backward_order(valid)
        xr = permute_slots(x, order)  # newest first: the backward mask becomes a causal one
        q, k, v = batched_linear(xr, w_qkv, b_qkv).split(self.hidden, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = batched_linear(h, w_o, b_o)
        d = self.in_dim
        mixed = xr * (1 + o[..., d:]) + o[..., :d]
        scores = batched_linear(mixed, w, b).squeeze(-1)
        return permute_slots(scores, order)


@dataclass
class MLPScorer:
    """Per-token MLP on the features (no interaction between tokens): a linear map to one score
    when ``hidden`` is empty (in + 1 parameters), else tanh hidden layers of the given sizes.
    Flat layout per layer: W (in x out, row-major), then b."""

    in_dim: int = 25
    hidden: tuple[int, ...] = ()
    kind: str = field(default="mlp", init=False)

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"MLP hidden sizes must be >= 1, got {list(self.hidden)}")

    @property
    def widths(self) -> list[int]:
        return [self.in_dim, *self.hidden, 1]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for a, b in zip(self.widths[:-1], self.widths[1:]):
            out += [(a, b), (b,)]
        return out

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def config(self) -> dict:
        return {"kind": self.kind, "hidden": list(self.hidden)}

    def score_shared(self, x: Tensor, params: Tensor) -> Tensor:
        """(P, ...) scores of the same features ``x`` (..., in) under each of the P parameter rows
        of ``params`` (P, num_params): the first layer is one matrix product for all rows."""
        parts = split_params(params.to(x.device, torch.float32), self.shapes)
        P, lead = params.shape[0], x.shape[:-1]
        first, bias = parts[0], parts[1]  # (P, in, out), (P, out)
        h = (x.reshape(-1, x.shape[-1]) @ first.permute(1, 0, 2).reshape(x.shape[-1], -1))  # (N, P * out)
        h = h.view(-1, P, first.shape[-1]).transpose(0, 1) + bias[:, None, :]  # (P, N, out)
        for i in range(2, len(parts), 2):
            h = torch.baddbmm(parts[i + 1][:, None, :], torch.tanh(h), parts[i])
        return h.squeeze(-1).reshape(P, *lead)

    def score(self, x: Tensor, valid: Tensor, params: Tensor) -> Tensor:
        """(B, H, K) scores of features ``x`` (B, H, K, in) with ``params`` (B, num_params)."""
        parts = split_params(params.to(x.device, torch.float32), self.shapes)
        h = x
        for i in range(0, len(parts), 2):
            h = batched_linear(h, parts[i], parts[i + 1])
            if i + 2 < len(parts):
                h = torch.tanh(h)
        return h.squeeze(-1)


Scorer = BAMScorer | MLPScorer

LIFT_GAIN = 0.25  # the lifted unit sees a quarter of the linear score: |scores| < 36 stay clear of tanh's float32 saturation


def lift_linear(params: Tensor, target: MLPScorer, seed: int = 0) -> Tensor:
    """Parameters of ``target`` (one tanh hidden layer) that rank and sign every token exactly as the
    linear scorer ``params`` (in + 1,) does (docs/algorithm.md §5): hidden unit 0 computes
    tanh(LIFT_GAIN * linear score) and is read out with weight 1 / LIFT_GAIN, so the score is a strictly
    increasing, sign-keeping function of the linear one (exact while |linear score| < 36, where tanh
    does not round to +-1 in float32); the other units get random input weights
    (std 1 / sqrt(in), from ``seed``) and zero read-out weights, ready for the search to use."""
    d = target.in_dim
    if len(target.hidden) != 1:
        raise ValueError(f"a linear scorer lifts to one hidden layer, not {list(target.hidden)}")
    if params.numel() != d + 1:
        raise ValueError(f"expected a linear scorer's {d + 1} parameters, got {params.numel()}")
    h = target.hidden[0]
    weight = torch.randn(d, h, generator=torch.Generator().manual_seed(seed)) / math.sqrt(d)
    weight[:, 0] = LIFT_GAIN * params[:d].float()
    bias = torch.zeros(h)
    bias[0] = LIFT_GAIN * float(params[d])
    readout = torch.zeros(h)
    readout[0] = 1 / LIFT_GAIN
    return torch.cat([weight.reshape(-1), bias, readout, torch.zeros(1)])


def make_scorer(spec: str | dict, in_dim: int) -> Scorer:
    """A scorer from a name ("bam", "mlp") or a config dict {"kind": ..., "hidden": ...}."""
    config = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = config.pop("kind", None)
    if kind == "bam":
        hidden = config.pop("hidden", 32)
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"BAM hidden size must be an integer >= 1, got {hidden!r}")
        scorer: Scorer = BAMScorer(in_dim=in_dim, hidden=hidden)
    elif kind == "mlp":
        hidden = config.pop("hidden", [])
        if not isinstance(hidden, (list, tuple)):
            raise ValueError(f"MLP hidden must be a list of layer sizes, got {hidden!r}")
        scorer = MLPScorer(in_dim=in_dim, hidden=tuple(hidden))
    else:
        raise ValueError(f"unknown NAMM scorer {kind!r}; choose 'bam' or 'mlp'")
    if config:
        raise ValueError(f"unknown scorer option(s) for {kind!r}: {', '.join(sorted(config))}")
    return scorer
