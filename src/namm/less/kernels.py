"""LESS feature maps φ (queries) and ψ (keys) and the low-rank attention arithmetic.

Per layer, φ is one small MLP per query head and ψ one per KV head: ``d → hidden → R``, GELU,
then ``abs`` so features are non-negative. φ also carries a learnable log-scale per query head,
initialised very negative (``INIT_LOG_SCALE``) so an untrained LESS contributes ~e⁻³⁰ of the
attention mass: it behaves like its eviction policy alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_LOG_SCALE = -30.0


@dataclass(frozen=True)
class KernelConfig:
    """Shapes of a set of LESS kernels (they must match the model they run on)."""

    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int = 512
    rank: int = 8

    @classmethod
    def for_model(cls, model, hidden: int = 512, rank: int = 8) -> "KernelConfig":
        """The kernel shapes of a Hugging Face decoder model."""
        config = model.config.get_text_config()
        q_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
        return cls(config.num_hidden_layers, q_heads, kv_heads, head_dim, hidden, rank)

    def to_dict(self) -> dict:
        return asdict(self)


class HeadMLP(nn.Module):
    """One ``d → hidden → R`` MLP per head, applied to (..., heads, N, d) → (..., heads, N, R), ≥ 0."""

    def __init__(self, heads: int, dim: int, hidden: int, rank: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(heads, dim, hidden) / dim ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(heads, 1, hidden))
        self.w2 = nn.Parameter(torch.randn(heads, hidden, rank) / hidden ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(heads, 1, rank))

    def forward(self, x: Tensor) -> Tensor:
        return head_mlp(x, self.w1, self.b1, self.w2, self.b2)


def head_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The per-head MLP of :class:`HeadMLP` from its weights; leading dims of ``x`` and of the weights
    broadcast (training stacks the weights of several layers: (L, heads, d, hidden))."""
    return (F.gelu(x @ w1 + b1) @ w2 + b2).abs()


class LayerKernels(nn.Module):
    """φ (per query head), ψ (per KV head) and φ's log-scale for one layer."""

    def __init__(self, config: KernelConfig):
        super().__init__()
        self.phi = HeadMLP(config.q_heads, config.head_dim, config.hidden, config.rank)
        self.psi = HeadMLP(config.kv_heads, config.head_dim, config.hidden, config.rank)
        self.log_scale = nn.Parameter(torch.full((config.q_heads,), INIT_LOG_SCALE))


class LessKernels(nn.Module):
    """The LESS kernels of every layer of a model."""

    def __init__(self, config: KernelConfig, seed: int = 0):
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(LayerKernels(config) for _ in range(config.num_layers))


def sparse_attention(query: Tensor, key: Tensor, value: Tensor, visible: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Exact float32 softmax attention and its log-sum-exp, grouped by KV head.

    ``query`` (B, H*G, Q, D), ``key``/``value`` (B, H, K, D), ``visible`` (B, 1 or H*G, Q, K) bool.
    Returns the output (B, H, G, Q, D) and the log-sum-exp of the visible logits (B, H, G, Q)."""
    B, Hq, Q, D = query.shape
    H = key.shape[1]
    G = Hq // H
    q = query.float().reshape(B, H, G * Q, D)
    logits = torch.matmul(q, key.float().transpose(-1, -2)).mul_(scaling).view(B, H, G, Q, -1)
    mask = visible.view(B, 1, 1, Q, -1) if visible.shape[1] == 1 else visible.view(B, H, G, Q, -1)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return torch.matmul(probs, value.float().unsqueeze(2)), lse


def mix_low_rank(sparse_out: Tensor, lse: Tensor, phi: Tensor, log_scale: Tensor, state_h: Tensor,
                 state_z: Tensor) -> Tensor:
    """Combine exact attention over kept keys with the low-rank memory of evicted ones.

    Computes ``(e^s φ(q)H + Σ exp(q·k)v) / (e^s φ(q)z + Σ exp(q·k))`` in log space as a convex mix
    ``o + w (φH/φz − o)`` with ``w = sigmoid(s + log φz − lse)``. Shapes: ``sparse_out``
    (..., H, G, Q, D), ``lse`` (..., H, G, Q), ``phi`` (..., H, G, Q, R) ≥ 0 (unscaled), ``log_scale``
    (H, G), ``state_h`` (..., H, R, D), ``state_z`` (..., H, R). Where nothing was evicted (z = 0)
    the output is the sparse one exactly."""
    den = (phi * state_z.unsqueeze(-2).unsqueeze(-2)).sum(-1)
    num = torch.matmul(phi, state_h.unsqueeze(-3))
    tiny = torch.finfo(den.dtype).tiny
    weight = torch.sigmoid(log_scale.unsqueeze(-1) + torch.log(den.clamp_min(tiny)) - lse)
    weight = torch.where(den > 0, weight, torch.zeros_like(weight))
    low = num / den.clamp_min(tiny).unsqueeze(-1)
    return sparse_out + weight.unsqueeze(-1) * (low - sparse_out)


def states_by_interval(psi: Tensor, values: Tensor, evict_at: Tensor, interval: Tensor) -> tuple[Tensor, Tensor]:
    """The LESS state each query sees: every token evicted at or before the query's last update.

    ``psi`` (..., H, T, R) key features, ``values`` (..., H, T, D), ``evict_at`` (..., H, T) the update
    that evicted each token, ``interval`` (..., Q) each query's last update (−1: none yet, empty
    state). Returns ``H`` (..., Q, H, R, D) and ``z`` (..., Q, H, R)."""
    U = max(int(interval.max()) + 1, 1)
    steps = torch.arange(U, device=evict_at.device).view(U, 1, 1)
    evicted = (evict_at.unsqueeze(-3) <= steps).to(psi.dtype)  # (..., U, H, T)
    state_h = torch.einsum("...uht,...htr,...htd->...uhrd", evicted, psi, values.to(psi.dtype))
    state_z = torch.einsum("...uht,...htr->...uhr", evicted, psi)
    *lead, _, H, R, D = state_h.shape
    Q = interval.shape[-1]
    at = interval.long().clamp_min(0)[..., None, None]  # (..., Q, 1, 1)
    state_h = state_h.gather(-4, at[..., None].expand(*lead, Q, H, R, D))
    state_z = state_z.gather(-3, at.expand(*lead, Q, H, R))
    seen = (interval >= 0).to(psi.dtype)[..., None, None]
    return state_h * seen[..., None], state_z * seen


def mix_per_query(sparse_out: Tensor, lse: Tensor, phi: Tensor, log_scale: Tensor, state_h: Tensor,
                  state_z: Tensor) -> Tensor:
    """:func:`mix_low_rank` with one state per query (from :func:`states_by_interval`): ``sparse_out``
    (..., H, G, Q, D), ``lse`` (..., H, G, Q), ``phi`` (..., H, G, Q, R), ``log_scale`` (..., H, G),
    ``state_h`` (..., Q, H, R, D), ``state_z`` (..., Q, H, R). Returns (..., H, G, Q, D)."""
    mixed = mix_low_rank(sparse_out.movedim(-2, -4).unsqueeze(-2), lse.movedim(-1, -3).unsqueeze(-1),
                         phi.movedim(-2, -4).unsqueeze(-2), log_scale.unsqueeze(-3), state_h, state_z)
    return mixed.squeeze(-2).movedim(-4, -2)  # (..., Q, H, G, 1, D) → (..., H, G, Q, D)
