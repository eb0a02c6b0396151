"""The driver: chunked prefill, memory updates on schedule, and the decode loop.

Every row of a batch keeps its own count of tokens seen. A step feeds each row the tokens up to
its next boundary (a multiple of the chunk size or, on the progressive schedule, of the policy's
``n_up``); rows with fewer tokens are left-padded inside the step, and the padding is masked out
and later dropped. On the progressive schedule a row is updated when its count of tokens seen
reaches a multiple of ``n_up``, in prefill and in decoding alike, so a batch gives each row
exactly what it would get alone. On the prompt-end schedule feeding never updates: the caller
runs :meth:`MemoryRunner.end_prompt` once, after every row's whole prompt.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor
from transformers import PreTrainedModel

from namm.memory.attention import ATTENTION_NAME
from namm.memory.cache import MemoryCache, is_packed
from namm.policies.base import LayerView, MemoryPolicy


@contextmanager
def memory_attention_enabled(model: PreTrainedModel) -> Iterator[None]:
    """Switch the model to the memory attention function for the duration of a block."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass
class UpdateRecord:
    """Cache size of every layer, and the KV bytes held, right after one memory update of one row
    (``kv_bytes_full``: what the full cache would hold then)."""

    row: int
    tokens_seen: int
    tokens_per_layer: list[int]
    kv_bytes: int
    kv_bytes_full: int


@dataclass
class MemoryRunner:
    """Runs a model over a growing sequence per row with a policy managing the KV cache."""

    model: PreTrainedModel
    policy: MemoryPolicy
    batch_size: int
    chunk_size: int = 128
    record_history: bool = False
    cache: MemoryCache = field(init=False)
    seen: Tensor = field(init=False)  # (B,) tokens fed per row
    previous_update: Tensor = field(init=False)  # (B,) tokens seen at each row's last update
    kv_bytes_peak: Tensor = field(init=False)
    history: list[UpdateRecord] = field(init=False, default_factory=list)
    policy_seconds: float = 0.0
    holding: bool = field(init=False, default=False)  # inside updates_held: feeding never compresses

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.policy.bind(self.model)
        device = self.model.device
        self.cache = MemoryCache(self.model.config.num_hidden_layers, self.batch_size, device)
        self.cache.query_window = self.policy.query_window if self.policy.evicts else 0
        self.cache.policy = self.policy
        self.seen = torch.zeros(self.batch_size, dtype=torch.long)
        self.previous_update = torch.zeros(self.batch_size, dtype=torch.long)
        self.kv_bytes_peak = torch.zeros(self.batch_size, dtype=torch.long)
        self.policy.reset(self.batch_size)

    @property
    def progressive(self) -> bool:
        """Whether feeding tokens triggers memory updates (every ``n_up`` tokens seen)."""
        return self.policy.evicts and self.policy.schedule == "progressive"

    def _next_boundary(self, seen: int) -> int:
        nxt = (seen // self.chunk_size + 1) * self.chunk_size
        if self.progressive:
            nxt = min(nxt, (seen // self.policy.n_up + 1) * self.policy.n_up)
        return nxt

    def feed(self, rows_tokens: list[Tensor], progress=None, all_logits: bool = False,
             keep: int = 0) -> Tensor | list[Tensor]:
        """Feed each row its tokens (1-D tensors of token ids, or (n, hidden) input embeddings for a
        model fed ``inputs_embeds``, e.g. a Decision Transformer; possibly empty); returns (B, vocab)
        logits of each row's last fed token (rows fed nothing get zeros), or with ``all_logits`` a list holding,
        per row, the (n_b, vocab) float32 logits of every token fed (with ``keep`` > 0: of at most
        the last ``keep`` tokens of each forward step, the others are never computed)."""
        if len(rows_tokens) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} rows, got {len(rows_tokens)}")
        done = [0] * self.batch_size
        last_logits: Tensor | None = None
        every: list[list[Tensor]] = [[] for _ in range(self.batch_size)]
        while True:
            takes = []
            for b, tokens in enumerate(rows_tokens):
                left = len(tokens) - done[b]
                seen = int(self.seen[b])
                takes.append(min(left, self._next_boundary(seen) - seen) if left > 0 else 0)
            width = max(takes)
            if width == 0:
                break
            logits = self._step([rows_tokens[b][done[b]:done[b] + takes[b]] for b in range(self.batch_size)], width,
                                all_logits, keep)
            if all_logits:
                kept = logits.shape[1]
                for b, t in enumerate(takes):
                    if t:
                        every[b].append(logits[b, kept - min(t, kept):])
                logits = logits[:, -1]
            if last_logits is None:
                last_logits = torch.zeros_like(logits)
            fed = torch.tensor([t > 0 for t in takes])
            last_logits[fed] = logits[fed]
            for b, t in enumerate(takes):
                done[b] += t
            due = fed & (self.seen % self.policy.n_up == 0) if self.progressive and not self.holding else fed & False
            if bool(due.any()):
                self.update(due.nonzero().flatten())
            if progress is not None:
                progress.update(sum(takes))
        if all_logits:
            vocab = self.model.config.get_text_config().vocab_size
            return [torch.cat(parts) if parts else torch.zeros(0, vocab) for parts in every]
        return last_logits

    def end_prompt(self) -> None:
        """Every row's whole prompt has been fed: a policy on the prompt-end schedule compresses
        every row now, once, before the first generated token (other policies: nothing happens)."""
        if self.policy.evicts and self.policy.schedule == "prompt-end":
            self.update(torch.arange(self.batch_size))
            self.cache.query_window = 0  # no later update would read buffered queries

    def end_context(self) -> None:
        """The query-agnostic protocol: every row's context (its prompt without the question) has been
        fed. Every policy compresses each row now, whatever its schedule (a row a progressive update
        compressed at this very token is left as it is); feed the question inside
        :meth:`updates_held`, so nothing compresses again before the first answer token."""
        if self.policy.schedule == "prompt-end":
            self.end_prompt()
            return
        due = self.seen != self.previous_update
        if self.policy.evicts and bool(due.any()):
            self.update(due.nonzero().flatten())

    @contextmanager
    def updates_held(self) -> Iterator[None]:
        """Feeding inside this block never compresses (progressive updates resume after it)."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def preload(self, layers: list[tuple[Tensor, Tensor, Tensor]], seen: int) -> None:
        """Start every row from a given cache: per layer (keys, values, positions) as in
        :meth:`MemoryLayer.assign`, after ``seen`` tokens (also taken as the last update)."""
        if bool(self.seen.any()):
            raise ValueError("preload needs rows that have seen no token yet")
        if len(layers) != len(self.cache.layers):
            raise ValueError(f"expected {len(self.cache.layers)} layers, got {len(layers)}")
        for layer, (keys, values, positions) in zip(self.cache.layers, layers):
            layer.assign(keys, values, positions)
        self.seen.fill_(seen)
        self.previous_update.fill_(seen)

    def shareable(self, rows_tokens: list[Tensor]) -> int:
        """How many leading tokens :meth:`feed_shared` may compute once for these (fresh) rows:
        all rows identical, at least one token left per row, and none past the first update."""
        first = rows_tokens[0]
        if self.batch_size < 2 or bool(self.seen.any()) or any(not torch.equal(t, first) for t in rows_tokens[1:]):
            return 0
        limit = len(first) - 1
        return min(limit, self.policy.n_up - 1) if self.progressive else limit

    def feed_shared(self, tokens: Tensor) -> None:
        """Feed the same ``tokens`` to every fresh row by running the model on one row and copying
        its cache to all rows (a batch of one prompt, e.g. a population of policies, computes the
        tokens before the first memory update once). At most :meth:`shareable` tokens."""
        if bool(self.seen.any()):
            raise ValueError("feed_shared needs rows that have seen no token yet")
        if self.progressive and len(tokens) >= self.policy.n_up:
            raise ValueError(f"only the tokens before the first memory update ({self.policy.n_up}) can be shared")
        rows = self.batch_size
        self.batch_size, self.seen = 1, self.seen[:1]
        try:
            self.feed([tokens])
        finally:
            self.batch_size = rows
            self.seen = self.seen.repeat(rows)
        self.cache.repeat_rows(rows)

    def _step(self, pieces: list[Tensor], width: int, all_logits: bool = False, keep: int = 0) -> Tensor:
        """One forward over a left-padded (B, width) step; (B, vocab) last logits, or (B, width,
        vocab) with ``all_logits`` ((B, min(keep, width), vocab) with ``keep`` > 0)."""
        device = self.model.device
        embeds = next((p for p in pieces if p.dim() == 2), None)  # rows of input embeddings, not ids
        ids = (torch.zeros(self.batch_size, width, dtype=torch.long) if embeds is None
               else embeds.new_zeros(self.batch_size, width, embeds.shape[-1]))
        positions = torch.full((self.batch_size, width), -1, dtype=torch.long)
        for b, piece in enumerate(pieces):
            n = len(piece)
            if n:
                ids[b, width - n:] = piece
                positions[b, width - n:] = torch.arange(int(self.seen[b]), int(self.seen[b]) + n)
        self.cache.step_positions = positions.to(device)
        inputs = {"input_ids" if embeds is None else "inputs_embeds": ids.to(device)}
        out = self.model(
            **inputs, position_ids=positions.clamp(min=0).to(device), past_key_values=self.cache,
            use_cache=True, logits_to_keep=(min(keep, width) if keep else 0) if all_logits else 1, namm_memory=self.cache,
        )
        self.seen += torch.tensor([len(p) for p in pieces])
        if bool((positions < 0).any()):
            self.cache.drop_padding()
        return out.logits.float() if all_logits else out.logits[:, -1].float()

    def update(self, rows: Tensor) -> None:
        """Run the policy on every layer for ``rows`` and shrink their caches."""
        start = time.perf_counter()
        self.kv_bytes_peak = torch.maximum(self.kv_bytes_peak, self.cache.nbytes().cpu())
        all_rows = len(rows) == self.batch_size
        device = self.model.device
        rows_dev = rows.to(device)
        for layer_idx, layer in enumerate(self.cache.layers):
            if layer.positions is None:
                continue
            if not is_packed(layer.positions >= 0):
                layer.compact(layer.positions >= 0)
            state = layer.aligned_state()
            pick = (lambda t: t) if all_rows else (lambda t: t.index_select(0, rows_dev))
            view = LayerView(
                layer_idx=layer_idx, num_layers=len(self.cache.layers),
                keys=pick(layer.keys), values=pick(layer.values), positions=pick(layer.positions),
                queries=None if layer.queries is None else pick(layer.queries),
                query_positions=None if layer.query_positions is None else pick(layer.query_positions),
                tokens_seen=self.seen[rows].to(device), previous_tokens_seen=self.previous_update[rows].to(device),
                scaling=layer.scaling, sliding_window=layer.sliding_window,
                state={k: pick(v) for k, v in state.items()}, rows=rows_dev,
            )
            keep = self.policy.select(view)
            if all_rows:
                full_keep, state = keep, view.state
            else:
                full_keep = layer.positions >= 0
                full_keep[rows_dev] = keep
                for name, value in view.state.items():
                    if name not in state:
                        state[name] = value.new_zeros(self.batch_size, *value.shape[1:])
                    state[name][rows_dev] = value
            layer.compact(full_keep, state)
            layer.clear_queries(rows_dev)
        self.previous_update[rows] = self.seen[rows]
        if self.record_history:
            counts, held, full = self.cache.token_counts().cpu(), self.kv_bytes(), self.kv_bytes_full()
            for r in rows.tolist():
                self.history.append(UpdateRecord(r, int(self.seen[r]), counts[:, r].tolist(), int(held[r]),
                                                 int(full[r])))
        self.policy_seconds += time.perf_counter() - start

    def kv_bytes(self) -> Tensor:
        """(B,) bytes of keys and values held now."""
        return self.cache.nbytes().cpu()

    def kv_bytes_full(self) -> Tensor:
        """(B,) bytes a full cache would hold for the tokens seen so far."""
        config = self.model.config
        layer = next((l for l in self.cache.layers if l.keys is not None), None)
        if layer is None:
            return torch.zeros(self.batch_size, dtype=torch.long)
        per_token = (layer.keys.shape[1] * (layer.keys.shape[-1] + layer.values.shape[-1])
                     * layer.keys.element_size() * config.num_hidden_layers)
        return self.seen * per_token
