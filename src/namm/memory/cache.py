"""MemoryCache: a transformers ``Cache`` whose layers can shrink.

Each layer holds keys and values of shape (batch, kv_heads, slots, head_dim), the absolute
position of every slot per head (-1 for an empty slot), per-token policy state, and the queries
buffered since the last memory update. Slots stay in temporal order per head. Layers may hold
different numbers of slots, and so may rows and heads (the shorter ones are right-padded with
empty slots, which attention never sees).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin


def compaction_index(keep: Tensor) -> tuple[Tensor, Tensor]:
    """For a (..., K) bool mask, the (..., K') indices of the kept slots in order, padded to the
    largest count K', and the (..., K') mask of which of those are real."""
    counts = keep.sum(-1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    real = torch.arange(width, device=keep.device) < counts.unsqueeze(-1)
    return order, real


def is_packed(valid: Tensor) -> bool:
    """True when every (row, head) holds its tokens in a prefix of the slots."""
    prefix = torch.arange(valid.shape[-1], device=valid.device) < valid.sum(-1, keepdim=True)
    return bool((valid == prefix).all())


def gather_slots(tensor: Tensor, index: Tensor, dim: int) -> Tensor:
    """Gather ``tensor`` along ``dim`` with ``index`` shaped like the leading dims up to ``dim``."""
    shape = list(index.shape) + list(tensor.shape[dim + 1:])
    expanded = index.reshape(*index.shape, *([1] * (tensor.dim() - dim - 1))).expand(shape)
    return torch.gather(tensor, dim, expanded)


HEADROOM = 256  # spare slots a layer's tensors grow by (bounded extra memory, amortised appends)


class MemoryLayer(CacheLayerMixin):
    """One layer of a :class:`MemoryCache`."""

    is_sliding = False

    def __init__(self, cache: "MemoryCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.positions: Tensor | None = None  # (B, H, K) int64
        self.state: dict[str, Tensor] = {}  # (B, H, Ks, ...) with Ks <= K; missing slots are zero
        self.queries: Tensor | None = None  # (B, Hq, N, D)
        self.query_positions: Tensor | None = None  # (B, N)
        self.scaling: float = 1.0
        self.sliding_window: int | None = None
        self._stores: dict[str, Tensor] = {}  # backing stores of appended tensors (see _append)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.positions = torch.zeros(B, H, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append a chunk's keys/values at the positions the driver set for this step."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_positions = self.cache.step_positions  # (B, Q), -1 for padding
        B, H = key_states.shape[:2]
        self.keys = self._append("keys", key_states)
        self.values = self._append("values", value_states)
        self.positions = self._append("positions", new_positions[:, None, :].expand(B, H, -1))
        return self.keys, self.values

    def assign(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Replace the layer's contents with (B, H, K, D) keys and values at (B, H, K) positions
        (-1 = empty slot, packed per head in temporal order); state and buffered queries are cleared."""
        self._stores.clear()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values, self.positions = keys, values, positions
        self.state, self.queries, self.query_positions = {}, None, None
        self.is_initialized = True

    def _append(self, name: str, new: Tensor, dim: int = 2) -> Tensor:
        """``getattr(self, name)`` with ``new`` appended along ``dim`` (the slot or query axis).

        Tensors grow inside a backing store with ``HEADROOM`` spare slots, so a decode step writes
        one slot instead of copying the whole layer; the attribute stays a view of exactly the
        slots in use. A tensor replaced by a gather (an update) simply starts a new store."""
        current = getattr(self, name)
        store = self._stores.get(name)
        used, extra = current.shape[dim], new.shape[dim]
        if (store is None or store.data_ptr() != current.data_ptr() or store.shape[dim] < used + extra
                or store.shape[:dim] + store.shape[dim + 1:] != current.shape[:dim] + current.shape[dim + 1:]):
            shape = list(current.shape)
            shape[dim] = used + extra + HEADROOM
            store = current.new_empty(shape)
            store.narrow(dim, 0, used).copy_(current)
            self._stores[name] = store
        store.narrow(dim, used, extra).copy_(new)
        return store.narrow(dim, 0, used + extra)

    def _drop_stores(self, *names: str) -> None:
        """Forget the backing stores of tensors about to be replaced, so their memory is freed now
        rather than at the next append."""
        for name in names:
            self._stores.pop(name, None)

    def buffer_queries(self, queries: Tensor, window: int | None) -> None:
        """Keep the queries of this step (after RoPE) for the policy, at most ``window`` per row."""
        positions = self.cache.step_positions
        if self.queries is None:
            self.queries, self.query_positions = queries, positions
        else:
            self.queries = self._append("queries", queries)
            self.query_positions = self._append("query_positions", positions, dim=1)
        valid = self.query_positions >= 0
        if window is not None and bool(valid.all()):
            self.queries = self.queries[:, :, -window:]
            self.query_positions = self.query_positions[:, -window:]
            return
        if window is not None:
            from_end = valid.flip(-1).cumsum(-1).flip(-1)  # valid queries at or after each one
            valid = valid & (from_end <= window)
        if not bool(valid.all()):
            self._compact_queries(valid)

    def clear_queries(self, rows: Tensor) -> None:
        """Forget the buffered queries of ``rows`` (their update has consumed them)."""
        if self.query_positions is None:
            return
        valid = self.query_positions >= 0
        valid[rows] = False
        self._compact_queries(valid)

    def _compact_queries(self, valid: Tensor) -> None:
        self._drop_stores("queries", "query_positions")
        order, real = compaction_index(valid)
        self.queries = gather_slots(self.queries, order.unsqueeze(1).expand(-1, self.queries.shape[1], -1), 2)
        self.query_positions = torch.where(real, torch.gather(self.query_positions, 1, order), -1)

    def aligned_state(self) -> dict[str, Tensor]:
        """Per-token state padded with zeros up to the current number of slots."""
        K = self.positions.shape[-1]
        out = {}
        for name, value in self.state.items():
            missing = K - value.shape[2]
            if missing > 0:
                pad = value.new_zeros(*value.shape[:2], missing, *value.shape[3:])
                value = torch.cat([value, pad], dim=2)
            out[name] = value
        return out

    def compact(self, keep: Tensor, state: dict[str, Tensor] | None = None) -> None:
        """Keep only the slots where ``keep`` (B, H, K) is true; shrinks the tensors for real."""
        state = self.aligned_state() if state is None else state
        self._drop_stores("keys", "values", "positions")
        order, real = compaction_index(keep)
        self.keys = gather_slots(self.keys, order, 2)
        self.values = gather_slots(self.values, order, 2)
        self.positions = torch.where(real, torch.gather(self.positions, 2, order), -1)
        self.state = {
            name: gather_slots(value, order, 2) * real.reshape(*real.shape, *([1] * (value.dim() - 3))).to(value.dtype)
            for name, value in state.items()
        }

    def token_counts(self) -> Tensor:
        """(B,) tokens held per head (the max over heads) for each row."""
        if self.positions is None:
            return torch.zeros(0, dtype=torch.long)
        return (self.positions >= 0).sum(-1).amax(-1)

    def nbytes(self) -> Tensor:
        """(B,) bytes of keys and values held by the real slots of each row."""
        if self.positions is None:
            return torch.zeros(0, dtype=torch.long)
        per_slot = (self.keys.shape[-1] + self.values.shape[-1]) * self.keys.element_size()
        return (self.positions >= 0).sum((-1, -2)) * per_slot

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.positions is None else int(self.positions.shape[-1])

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.cache, self.layer_idx)

    def repeat_rows(self, n: int) -> None:
        """Repeat every row ``n`` times (row b becomes rows b*n .. b*n+n-1), with its state and queries."""
        if self.positions is None:
            return
        self._stores.clear()
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        self.keys, self.values, self.positions = rep(self.keys), rep(self.values), rep(self.positions)
        self.state = {name: rep(value) for name, value in self.state.items()}
        if self.queries is not None:
            self.queries, self.query_positions = rep(self.queries), rep(self.query_positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("MemoryCache does not support beam search")


class MemoryCache(Cache):
    """A KV cache for the memory runtime. The driver sets ``step_positions`` (B, Q) before every
    forward: the absolute position of each input token, -1 for padding."""

    def __init__(self, num_layers: int, batch_size: int, device: torch.device | str = "cpu"):
        self.step_positions: Tensor = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.query_window: int | None = 0  # queries the policy needs buffered (see MemoryPolicy)
        self.policy = None  # the MemoryPolicy managing this cache; the attention calls its ``attend`` hook
        super().__init__(layers=[MemoryLayer(self, i) for i in range(num_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def token_counts(self) -> Tensor:
        """(layers, B) tokens held per layer (max over heads) for each row."""
        return torch.stack([layer.token_counts() for layer in self.layers])

    def nbytes(self) -> Tensor:
        """(B,) bytes of keys and values held, summed over layers."""
        return torch.stack([layer.nbytes() for layer in self.layers]).sum(0)

    def repeat_rows(self, n: int) -> None:
        """Repeat every row of every layer ``n`` times (see :meth:`MemoryLayer.repeat_rows`)."""
        for layer in self.layers:
            layer.repeat_rows(n)
        self.step_positions = self.step_positions.repeat_interleave(n, dim=0)

    def drop_padding(self, force: bool = False) -> None:
        """Remove empty slots (left by padded inputs or unequal rows) once they make up more than
        a quarter of a layer, or always with ``force``. Attention never sees them either way."""
        for layer in self.layers:
            if layer.positions is None or layer.positions.shape[-1] == 0:
                continue
            valid = layer.positions >= 0
            empty = layer.positions.shape[-1] - int(valid.sum(-1).max())
            if empty > 0 and (force or empty * 4 > layer.positions.shape[-1]) or (force and not is_packed(valid)):
                layer.compact(valid)
