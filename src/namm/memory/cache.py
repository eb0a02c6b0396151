"""MemoryCache: a transformers ``Cache`` whose layers shrink, managed by a memory policy.

Each layer holds keys and values of shape (batch, kv_heads, slots, head_dim), the absolute
position of every slot per head (-1 for an empty slot), per-token policy state, and the queries
buffered since the last memory update. Slots stay in temporal order per head. Layers may hold
different numbers of slots, and so may rows and heads (the shorter ones are right-padded with
empty slots, which attention never sees).

The cache is also the memory: it counts the tokens each row has seen and runs the policy's
updates on schedule (see :mod:`namm.memory.schedule`), inside the forward pass, from the memory
attention function. So the same cache works under namm's driver and under transformers' own
``generate``. transformers hands a cache the new keys before the attention runs; the step's
positions and padding reach the attention function, which completes the step (see
:mod:`namm.memory.attention`).
"""

from __future__ import annotations

import copy
import threading
import time
import weakref

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from namm.memory.schedule import StepPlan, UpdatePoint, UpdateRecord, progressive_points
from namm.policies.base import LayerView, MemoryPolicy


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


def heads_agree(positions: Tensor) -> bool:
    """Whether every KV head of every row holds the same positions."""
    return positions.shape[1] == 1 or bool((positions == positions[:, :1]).all())


HEADROOM = 256  # spare slots a layer's tensors grow by (bounded extra memory, amortised appends)

_handoff = threading.local()  # the layer whose update produced the keys the next attention call gets


def claim_layer(keys: Tensor) -> "MemoryLayer | None":
    """The :class:`MemoryLayer` whose ``update`` just returned ``keys``, or None when the keys come
    from another cache. Each hand-over is claimed once."""
    layer, handed = getattr(_handoff, "value", (None, None))
    if handed is not keys:
        return None
    _handoff.value = (None, None)
    return layer


class MemoryLayer(CacheLayerMixin):
    """One layer of a :class:`MemoryCache`."""

    is_sliding = False

    def __init__(self, cache: "MemoryCache", layer_idx: int):
        super().__init__()
        self._cache = weakref.ref(cache)  # the cache owns its layers; a weak link back frees both without a gc pass
        self.layer_idx = layer_idx
        self.positions: Tensor | None = None  # (B, H, K) int64
        self.state: dict[str, Tensor] = {}  # (B, H, Ks, ...) with Ks <= K; missing slots are zero
        self.queries: Tensor | None = None  # (B, Hq, N, D)
        self.query_positions: Tensor | None = None  # (B, N)
        self.queries_padded = False  # some buffered query slot is padding (-1)
        self.update_attention: Tensor | None = None  # (B, H, N, K) probabilities the step handed the next update
        self.heads_aligned = True  # every head holds the same positions (one mask serves all heads)
        self.dense = True  # every slot holds a token (no empty slot), known without reading the positions
        self.empty_bound = 0  # at least as many slots as are empty in every row and head (host count)
        self.scaling: float = 1.0
        self.sliding_window: int | None = None
        self._stores: dict[str, Tensor] = {}  # backing stores of appended tensors (see _append)

    @property
    def cache(self) -> "MemoryCache":
        """The cache this layer belongs to."""
        cache = self._cache()
        if cache is None:
            raise RuntimeError("this layer's MemoryCache no longer exists")
        return cache

    def __deepcopy__(self, memo: dict) -> "MemoryLayer":
        """A deep copy linked to the copy of its cache when the copy started from the cache
        (``copy.deepcopy(cache)``, transformers' way to reuse a prefilled cache), else to the same cache."""
        twin = object.__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__dict__.items():
            if name != "_cache":
                twin.__dict__[name] = copy.deepcopy(value, memo)
        cache = self.cache
        twin._cache = weakref.ref(memo.get(id(cache), cache))
        return twin

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, H, 0, value_states.shape[-1])
        self.positions = torch.zeros(B, H, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append a step's keys and values; their positions come with the attention call that
        follows, to which the layer hands itself over (see :func:`claim_layer`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = self._append("keys", key_states)
        self.values = self._append("values", value_states)
        _handoff.value = (self, self.keys)
        return self.keys, self.values

    def append_positions(self, positions: Tensor, padded: bool) -> None:
        """Record the (B, Q) absolute positions (-1: padding) of the keys the step appended;
        ``padded``: some of them are padding."""
        B, H = self.keys.shape[:2]
        self.positions = self._append("positions", positions[:, None, :].expand(B, H, -1))
        self.dense = self.dense and not padded

    def assign(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Replace the layer's contents with (B, H, K, D) keys and values at (B, H, K) positions
        (-1 = empty slot, packed per head in temporal order); state and buffered queries are cleared."""
        self._stores.clear()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values, self.positions = keys, values, positions
        self.state, self.queries, self.query_positions, self.queries_padded = {}, None, None, False
        self.update_attention = None
        self.heads_aligned = heads_agree(positions)
        self.dense, self.empty_bound = False, positions.shape[-1]  # unknown without reading the positions
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

    def split_tail(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Take the last ``n`` slots (keys, values, positions) off the layer, to be put back with
        :meth:`join_tail` (an update in the middle of a step must not see the step's later keys)."""
        K = self.keys.shape[2]
        tail = tuple(t.narrow(2, K - n, n).clone() for t in (self.keys, self.values, self.positions))
        self.keys, self.values, self.positions = (t.narrow(2, 0, K - n) for t in (self.keys, self.values, self.positions))
        return tail

    def join_tail(self, tail: tuple[Tensor, Tensor, Tensor]) -> None:
        """Put back the slots :meth:`split_tail` took off."""
        keys, values, positions = tail
        self.keys = self._append("keys", keys)
        self.values = self._append("values", values)
        self.positions = self._append("positions", positions)

    def buffer_queries(self, queries: Tensor, positions: Tensor, window: int | None, padded: bool) -> None:
        """Keep queries (after RoPE) at their (B, Q) positions for the policy, at most ``window``
        per row. ``padded``: some of them are padding (-1)."""
        if self.queries is None:
            self.queries, self.query_positions = queries, positions
        else:
            self.queries = self._append("queries", queries)
            self.query_positions = self._append("query_positions", positions, dim=1)
        self.queries_padded = self.queries_padded or padded
        self.keep_last_queries(window)

    def keep_last_queries(self, window: int | None) -> None:
        """Keep at most the last ``window`` real buffered queries of each row (None: all of them,
        padding dropped; 0: none)."""
        if self.queries is None:
            return
        if window == 0:
            self._drop_stores("queries", "query_positions")
            self.queries, self.query_positions, self.queries_padded = None, None, False
            return
        if not self.queries_padded:
            if window is not None and self.queries.shape[2] > window:
                self.queries = self.queries[:, :, -window:]
                self.query_positions = self.query_positions[:, -window:]
            return
        valid = self.query_positions >= 0
        if window is not None:
            from_end = valid.flip(-1).cumsum(-1).flip(-1)  # valid queries at or after each one
            valid = valid & (from_end <= window)
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
        self.queries_padded = not bool(real.all())

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
        self.heads_aligned = heads_agree(self.positions)
        self.dense = bool(real.all())
        self.empty_bound = 0
        self.state = {
            name: gather_slots(value, order, 2) * real.reshape(*real.shape, *([1] * (value.dim() - 3))).to(value.dtype)
            for name, value in state.items()
        }

    def token_counts(self) -> Tensor:
        """(B,) tokens held per head (the max over heads) for each row."""
        if self.positions is None:
            return torch.zeros(self.cache.num_rows, dtype=torch.long, device=self.cache.device)
        return (self.positions >= 0).sum(-1).amax(-1)

    def nbytes(self) -> Tensor:
        """(B,) bytes of keys and values held by the real slots of each row."""
        if self.positions is None:
            return torch.zeros(self.cache.num_rows, dtype=torch.long, device=self.cache.device)
        per_slot = (self.keys.shape[-1] + self.values.shape[-1]) * self.keys.element_size()
        return (self.positions >= 0).sum((-1, -2)) * per_slot

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks built by transformers cover only the step's own inputs (their causal order and
        padding); the memory attention places older keys by their absolute positions."""
        return query_length, self.cache.columns

    def get_seq_length(self) -> int:
        return self.cache.columns

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

    def copy_into(self, other: "MemoryLayer", query_window: int | None) -> None:
        """Give ``other`` (a layer of a forked cache) this layer's contents, sharing its tensors
        (nothing writes into a tensor in place: appends start a new store, updates gather), with
        the buffered queries cut to ``query_window``."""
        for name in ("keys", "values", "positions", "queries", "query_positions", "queries_padded", "heads_aligned",
                     "dense", "empty_bound", "scaling", "sliding_window", "is_initialized"):
            setattr(other, name, getattr(self, name))
        if self.is_initialized:
            other.dtype, other.device = self.dtype, self.device
        other.state = dict(self.state)
        if query_window is not None:  # None: all of them, shared as the base compacted them
            other.keep_last_queries(query_window)


def step_inputs(attention_mask: Tensor | None, width: int) -> Tensor | None:
    """(B, width) bool: which of a step's inputs are real, read off the diagonal of the step's
    4-D mask (an input sees itself unless it is padding); None when there is no mask."""
    if attention_mask is None:
        return None
    own = attention_mask[:, 0, :, -width:].diagonal(dim1=-2, dim2=-1)
    return own if own.dtype == torch.bool else own == 0  # additive float masks: 0 where visible


class MemoryCache(Cache):
    """The KV cache of the memory runtime: a transformers ``Cache`` that runs ``policy`` on its
    schedule. Pass it as the model's cache (``namm.cache`` builds one for ``model.generate``) or
    let :class:`~namm.memory.driver.MemoryRunner` drive it.

    Counters are per row, on the host: ``seen`` (tokens fed), ``previous_update`` (tokens seen at
    the row's last update) and ``kv_bytes_peak`` (KV bytes held right before an update, at most).
    ``columns`` counts the inputs of every step, padding included (the sequence length transformers
    sees). The rows are counted at the first step unless ``batch_size`` is given. With
    ``auto_prompt_end`` a policy on the prompt-end schedule compresses before the first one-token
    step (generation's first); otherwise the owner calls :meth:`end_prompt`."""

    def __init__(self, policy: MemoryPolicy, num_layers: int, batch_size: int | None = None,
                 device: torch.device | str = "cpu", record_history: bool = False, auto_prompt_end: bool = False):
        self.policy = policy
        self.device = torch.device(device)
        self.record_history = record_history
        self.auto_prompt_end = auto_prompt_end
        self.query_window: int | None = policy.query_window if policy.evicts else 0  # queries the policy needs
        self.holding = False  # feeding never compresses (see MemoryRunner.updates_held)
        self.prompt_compressed = False
        self.step: StepPlan | None = None
        self.history: list[UpdateRecord] = []
        self.policy_seconds = 0.0
        self.columns = 0
        self.num_rows = 0
        self.seen = self.previous_update = self.kv_bytes_peak = torch.zeros(0, dtype=torch.long)
        super().__init__(layers=[MemoryLayer(self, i) for i in range(num_layers)])
        if batch_size is not None:
            self.start(batch_size)

    def start(self, batch_size: int) -> None:
        """Count ``batch_size`` fresh rows and reset the policy for them."""
        self.set_rows(batch_size)
        self.policy.reset(batch_size)

    def set_rows(self, batch_size: int) -> None:
        """Zero the counters for ``batch_size`` rows (the policy is left as it is)."""
        self.num_rows = batch_size
        self.seen = torch.zeros(batch_size, dtype=torch.long)
        self.previous_update = torch.zeros(batch_size, dtype=torch.long)
        self.kv_bytes_peak = torch.zeros(batch_size, dtype=torch.long)

    @property
    def progressive(self) -> bool:
        """Whether feeding tokens triggers memory updates (every ``n_up`` tokens seen)."""
        return self.policy.evicts and self.policy.schedule == "progressive"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def token_counts(self) -> Tensor:
        """(layers, B) tokens held per layer (max over heads) for each row."""
        return torch.stack([layer.token_counts() for layer in self.layers])

    def nbytes(self) -> Tensor:
        """(B,) bytes of keys and values held, summed over layers."""
        return torch.stack([layer.nbytes() for layer in self.layers]).sum(0)

    def bytes_per_token(self) -> int:
        """KV bytes one token takes in a full cache (all layers and heads); 0 before any step."""
        layer = next((l for l in self.layers if l.positions is not None), None)
        if layer is None:
            return 0
        return layer.keys.shape[1] * (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size() \
            * len(self.layers)

    def repeat_rows(self, n: int) -> None:
        """Repeat every row of every layer, and its counters, ``n`` times (see :meth:`MemoryLayer.repeat_rows`)."""
        for layer in self.layers:
            layer.repeat_rows(n)
        self.num_rows *= n
        self.seen, self.previous_update, self.kv_bytes_peak = (
            t.repeat_interleave(n) for t in (self.seen, self.previous_update, self.kv_bytes_peak))

    def drop_padding(self, force: bool = False) -> None:
        """Remove empty slots (left by padded inputs or unequal rows) once they make up more than
        a quarter of a layer, or always with ``force``. Attention never sees them either way. The
        positions are read (a device sync) only when a layer's ``empty_bound`` allows that many."""
        for layer in self.layers:
            if layer.positions is None or layer.positions.shape[-1] == 0:
                continue
            if not force and layer.empty_bound * 4 <= layer.positions.shape[-1]:
                continue
            valid = layer.positions >= 0
            empty = layer.positions.shape[-1] - int(valid.sum(-1).max())
            layer.empty_bound = empty
            if empty > 0 and (force or empty * 4 > layer.positions.shape[-1]) or (force and not is_packed(valid)):
                layer.compact(valid)

    # -- one forward step, as the memory attention sees it ------------------------------------

    def step_plan(self, layer_idx: int, batch_size: int, width: int, attention_mask: Tensor | None,
                  position_ids: Tensor | None) -> StepPlan:
        """The plan of the current step, made at its first layer: positions, padding, updates."""
        if self.step is not None and layer_idx not in self.step.done:
            return self.step
        if position_ids is None:
            raise ValueError("the namm memory attention needs the model to pass position_ids to its attention")
        if self.num_rows == 0:
            self.start(batch_size)
        device = position_ids.device
        positions = position_ids.reshape(-1, width).expand(batch_size, width).long()
        real = step_inputs(attention_mask, width)
        padded = real is not None and not bool(real.all())
        real_host = real.expand(batch_size, width).cpu() if padded else None
        if padded:
            positions = torch.where(real.expand(batch_size, width), positions, -1)
        fed = real_host.sum(-1) if padded else torch.full((batch_size,), width, dtype=torch.long)
        points: list[UpdatePoint] = []
        if self.policy.evicts and not self.holding:
            if self.progressive:
                points = progressive_points(self.seen, self.previous_update, real_host, width, self.policy.n_up, device)
            elif self.auto_prompt_end and not self.prompt_compressed and width == 1 and bool(self.seen.all()):
                rows = torch.arange(batch_size)
                points = [UpdatePoint(0, rows, self.seen.clone(), self.previous_update.clone(), device)]
                self.prompt_compressed, self.query_window = True, 0
        self.step = StepPlan(positions, padded, fed, points)
        return self.step

    def layer_done(self, layer_idx: int) -> None:
        """A layer has attended the step; after the last one, the step's counts are committed."""
        step = self.step
        step.done.add(layer_idx)
        if len(step.done) < len(self.layers):
            return
        self.step = None
        self.seen += step.fed
        self.columns += step.positions.shape[1]
        for point in step.points:
            self._commit(point)
        if step.padded:  # each row's padding adds empty slots; at most this many are empty in every row
            added = step.positions.shape[1] - int(step.fed.min())
            for layer in self.layers:
                layer.empty_bound += added
            self.drop_padding()

    # -- memory updates --------------------------------------------------------------------------

    def update_layer(self, layer: MemoryLayer, point: UpdatePoint, tail: int = 0) -> None:
        """Run the policy on one layer for ``point.rows`` and shrink the layer; the last ``tail``
        slots (inputs of the step after the update point) are kept out of it."""
        held = layer.split_tail(tail) if tail else None
        start = time.perf_counter()
        attention, layer.update_attention = layer.update_attention, None
        if not is_packed(layer.positions >= 0):
            layer.compact(layer.positions >= 0)
            attention = None  # computed over the slots before compaction
        all_rows = len(point.rows) == self.num_rows
        rows = point.rows_dev
        pick = (lambda t: t) if all_rows else (lambda t: t.index_select(0, rows))  # noqa: E731
        before = pick(layer.nbytes())
        state = layer.aligned_state()
        view = LayerView(
            layer_idx=layer.layer_idx, num_layers=len(self.layers),
            keys=pick(layer.keys), values=pick(layer.values), positions=pick(layer.positions),
            queries=None if layer.queries is None else pick(layer.queries),
            query_positions=None if layer.query_positions is None else pick(layer.query_positions),
            tokens_seen=point.tokens_seen_dev, previous_tokens_seen=point.previous_dev,
            scaling=layer.scaling, sliding_window=layer.sliding_window,
            state={k: pick(v) for k, v in state.items()}, rows=rows,
            _attention=attention if all_rows else None,
        )
        keep = self.policy.select(view)
        if all_rows:
            full_keep, state = keep, view.state
        else:
            full_keep = layer.positions >= 0
            full_keep[rows] = keep
            for name, value in view.state.items():
                if name not in state:
                    state[name] = value.new_zeros(self.num_rows, *value.shape[1:])
                state[name][rows] = value
        layer.compact(full_keep, state)
        layer.clear_queries(rows)
        point.add_layer(before, pick(layer.nbytes()), pick(layer.token_counts()))
        self.policy_seconds += time.perf_counter() - start
        if held is not None:
            layer.join_tail(held)

    def update_rows(self, rows: Tensor) -> None:
        """Run the policy on every layer for ``rows`` (host indices) now, between steps."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        point = UpdatePoint(0, rows, self.seen[rows], self.previous_update[rows], self.device)
        for layer in self.layers:
            if layer.positions is not None:
                self.update_layer(layer, point)
        self._commit(point)

    def fork(self, policy: MemoryPolicy) -> "MemoryCache":
        """A cache holding what this one holds, run by ``policy`` from here on: how a prefill that
        compressed nothing serves several policies on the prompt-end schedule
        (:func:`namm.memory.generation.generate_shared`). This cache must have buffered at least the
        queries ``policy`` reads (its ``query_window``); the fork keeps exactly those."""
        if self.step is not None or self.prompt_compressed or bool(self.previous_update.any()):
            raise ValueError("only a cache between steps that has never compressed can be forked")
        window = policy.query_window if policy.evicts else 0
        if self.query_window is not None and (window is None or window > self.query_window):
            raise ValueError(f"this cache buffered {self.query_window} queries per layer; the policy reads {window}")
        fork = MemoryCache(policy, len(self.layers), None, self.device, self.record_history, self.auto_prompt_end)
        fork.set_rows(self.num_rows)
        policy.reset(self.num_rows)
        fork.seen, fork.previous_update, fork.kv_bytes_peak = (
            t.clone() for t in (self.seen, self.previous_update, self.kv_bytes_peak))
        fork.columns = self.columns
        for mine, theirs in zip(self.layers, fork.layers):
            mine.copy_into(theirs, window)
        return fork

    def end_prompt(self) -> None:
        """Every row's whole prompt has been fed: a policy on the prompt-end schedule compresses
        every row now, once (other policies: nothing happens)."""
        if self.policy.evicts and self.policy.schedule == "prompt-end":
            self.update_rows(torch.arange(self.num_rows))
            self.prompt_compressed, self.query_window = True, 0  # no later update reads buffered queries

    def _commit(self, point: UpdatePoint) -> None:
        """Record a finished update of ``point.rows``: counters, peak memory and history."""
        rows = point.rows
        self.previous_update[rows] = point.tokens_seen
        if point.bytes_before is None:
            return
        self.kv_bytes_peak[rows] = torch.maximum(self.kv_bytes_peak[rows], point.bytes_before.cpu())
        if self.record_history:
            counts, held = torch.stack(point.counts_after).cpu(), point.bytes_after.cpu()
            full = point.tokens_seen * self.bytes_per_token()
            for i, row in enumerate(rows.tolist()):
                self.history.append(UpdateRecord(row, int(point.tokens_seen[i]), counts[:, i].tolist(), int(held[i]),
                                                 int(full[i])))
