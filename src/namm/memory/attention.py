"""The attention function the memory runtime registers in transformers' ``AttentionInterface``.

The model's output always goes through ``scaled_dot_product_attention``. The mask is built here
from absolute positions (a key is visible to a query when it is a real token, not newer than the
query and inside the layer's sliding window), because after eviction the cache index of a key no
longer says how old it is. The queries a policy needs are buffered in the cache, and their
attention probabilities are computed lazily at update time by :func:`buffered_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface

ATTENTION_NAME = "namm_memory"


def visibility(query_positions: Tensor, key_positions: Tensor, sliding_window: int | None) -> Tensor:
    """(B, H, Q, K) bool: which keys each query may attend to.

    ``query_positions`` is (B, Q), ``key_positions`` (B, H, K); -1 marks padding / empty slots."""
    q = query_positions[:, None, :, None]
    k = key_positions[:, :, None, :]
    visible = (k >= 0) & (k <= q)
    if sliding_window is not None:
        visible &= (q - k) < sliding_window
    return visible


def buffered_attention(
    queries: Tensor,
    query_positions: Tensor,
    keys: Tensor,
    key_positions: Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> Tensor:
    """(B, H, N, K) float32 softmax attention of buffered queries (B, H*G, N, D) over keys
    (B, H, K, D), averaged over the G query heads of each KV head; zero where not visible.

    Slots are packed and in temporal order (the runtime compacts before an update), so without a
    sliding window the leading slots older than every buffered query are visible to all of them:
    the mask is applied only to the slots after those."""
    B, Hq, N, D = queries.shape
    H, K = keys.shape[1], keys.shape[2]
    G = Hq // H
    q = queries.float().reshape(B, H, G * N, D) * scaling
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).view(B, H, G, N, K)
    real_query = query_positions >= 0
    start = 0
    if sliding_window is None and bool(real_query.any()):
        oldest_query = int(query_positions[real_query].min())
        start = int(((key_positions >= 0) & (key_positions < oldest_query)).sum(-1).min())
    visible = visibility(query_positions, key_positions[..., start:], sliding_window)[:, :, None]
    logits[..., start:].masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if not bool(real_query.all()):  # padded query rows: no attention at all (and no NaN)
        probs.masked_fill_(~real_query[:, None, None, :, None], 0.0)
    return probs.mean(2)


def memory_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    namm_memory=None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention over a :class:`~namm.memory.cache.MemoryCache` layer (keys already appended)."""
    memory = namm_memory
    if memory is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention runs only inside namm's driver (namm.generate)")
    layer = memory.layers[module.layer_idx]
    scaling = module.scaling if scaling is None else scaling
    layer.scaling, layer.sliding_window = scaling, sliding_window
    q_pos = memory.step_positions
    k_pos = layer.positions
    B, Hq, Q, _ = query.shape
    H = key.shape[1]
    heads_aligned = H == 1 or bool((k_pos == k_pos[:, :1]).all())
    visible = visibility(q_pos, k_pos[:, :1] if heads_aligned else k_pos, sliding_window)
    padded = q_pos < 0
    if bool(padded.any()):  # a padding query sees only its own slot, so it stays finite
        K = k_pos.shape[-1]
        own = torch.zeros(B, 1, Q, K, dtype=torch.bool, device=visible.device)
        own[:, 0, :, K - Q:] = torch.diag_embed(padded)
        visible = visible | own
    if not heads_aligned:
        visible = visible.repeat_interleave(Hq // H, dim=1)
    attend = getattr(memory.policy, "attend", None)  # optional policy hook (e.g. LESS), see MemoryPolicy
    out = None if attend is None else attend(module.layer_idx, query, key, value, visible, scaling)
    if out is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scaling, enable_gqa=H != Hq)
    if memory.query_window != 0:
        layer.buffer_queries(query, memory.query_window)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, memory_attention)
