"""The attention function the memory runtime registers in transformers' ``AttentionInterface``.

With a :class:`~namm.memory.cache.MemoryCache`, each layer's call completes the forward step the
cache began: the step's plan (absolute positions, padding, the memory updates due inside it) comes
from the ``position_ids`` and the 4-D mask transformers passes to every attention call; the new
keys get their positions; the queries are attended in segments split at the update points, each
layer running its update between segments. The mask over keys is built from absolute positions (a
key is visible to a query when it is a real token, not newer than the query and inside the
layer's sliding window), because after eviction the cache index of a key no longer says how old
it is. The output always goes through ``scaled_dot_product_attention``; the queries a policy needs
are buffered in the cache, and their attention probabilities are computed lazily at update time
by :func:`~namm.memory.masks.buffered_attention`.

With any other cache the function is plain SDPA, so a model switched to it keeps working as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from namm.memory.cache import MemoryLayer, claim_layer
from namm.memory.masks import attention_with_probs, visibility
from namm.memory.schedule import StepPlan, UpdatePoint

ATTENTION_NAME = "namm_memory"


def handed_queries(layer: MemoryLayer, step: StepPlan, n: int, update: UpdatePoint | None) -> int:
    """How many of the last queries of a segment of ``n`` the update right after it reads, when the
    segment can hand it their attention probabilities (every row updates there, nothing is padded
    and the queries the update reads are all in the segment); 0 when it cannot."""
    memory = layer.cache
    window = memory.query_window
    if update is None or window == 0 or step.padded or len(update.rows) != memory.num_rows:
        return 0
    if window is None:  # every query since the previous update: the segment must hold them all
        return n if layer.queries is None or layer.queries.shape[2] == 0 else 0
    return window if n >= window else 0


def attend_segment(layer: MemoryLayer, step: StepPlan, query: Tensor, start: int, end: int,
                   update: UpdatePoint | None = None) -> Tensor:
    """(B, Hq, end - start, D) attention output of the step's queries ``start:end`` over the
    layer's current slots (the step's keys are the last ``Q - start`` of them; those after ``end``
    are newer than every query of the segment and left out). ``update``: the memory update right
    after the segment, if any.

    A layer whose slots all hold tokens, with no sliding window, needs no mask when the segment is
    one query (it sees every key) or a fresh causal block (no older slot): SDPA then runs its
    unmasked (causal) kernel, as a plain transformers forward does. A segment whose queries are
    the ones the next update reads (see :func:`handed_queries`) is attended written out, and its
    probabilities are kept on the layer for the update (docs/algorithm.md §3)."""
    memory = layer.cache
    q = query[:, :, start:end]
    q_pos = step.positions[:, start:end]
    later = query.shape[2] - end
    keys, values, k_pos = (t if later == 0 else t.narrow(2, 0, t.shape[2] - later)
                           for t in (layer.keys, layer.values, layer.positions))
    (Hq, n), (H, K) = q.shape[1:3], keys.shape[1:3]
    attend = getattr(memory.policy, "attend", None)  # optional policy hook (e.g. LESS), see MemoryPolicy
    out = None
    handed = handed_queries(layer, step, n, update) if attend is None else 0  # a hook changes the attention
    if handed:
        out, layer.update_attention = attention_with_probs(
            q, q_pos, keys, values, k_pos, layer.scaling, layer.sliding_window, handed)
    elif attend is None and layer.dense and layer.sliding_window is None and (n == 1 or K == n):
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=n > 1, scale=layer.scaling,
                                             enable_gqa=H != Hq)
    else:
        visible = visibility(q_pos, k_pos[:, :1] if layer.heads_aligned else k_pos, layer.sliding_window)
        if step.padded:  # a padding query sees only its own slot, so it stays finite
            own = torch.zeros_like(visible[:, :1])
            own[:, 0, :, K - n:] = torch.diag_embed(q_pos < 0)
            visible = visible | own
        if not layer.heads_aligned:
            visible = visible.repeat_interleave(Hq // H, dim=1)
        if attend is not None:
            out = attend(layer.layer_idx, q, keys, values, visible, layer.scaling)
        if out is None:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=layer.scaling,
                                                 enable_gqa=H != Hq)
    if memory.query_window != 0:
        layer.buffer_queries(q, q_pos, memory.query_window, step.padded)
    return out


def memory_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Attention over a :class:`~namm.memory.cache.MemoryCache` layer (its ``update`` has just
    appended the step's keys), running the memory updates due in the step; SDPA otherwise."""
    layer = claim_layer(key)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    memory = layer.cache
    B, _, Q, _ = query.shape
    step = memory.step_plan(layer.layer_idx, B, Q, attention_mask, kwargs.get("position_ids"))
    layer.scaling = module.scaling if scaling is None else scaling
    layer.sliding_window = sliding_window
    layer.append_positions(step.positions, step.padded)
    parts, start = [], 0
    for point in step.points:
        if point.column > start:
            parts.append(attend_segment(layer, step, query, start, point.column, point))
            start = point.column
        memory.update_layer(layer, point, tail=Q - point.column)
    if start < Q:
        parts.append(attend_segment(layer, step, query, start, Q))
    memory.layer_done(layer.layer_idx)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, memory_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # standard masks; a MemoryCache sizes them to the step
