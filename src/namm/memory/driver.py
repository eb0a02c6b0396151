"""The driver: chunked prefill and feeding, over a :class:`~namm.memory.cache.MemoryCache`.

Every row of a batch keeps its own count of tokens seen. A step feeds each row the tokens up to
its next boundary (a multiple of the chunk size, if one is set, or, on the progressive schedule,
of the policy's ``n_up``). By default there is no chunk size: a step runs to the next memory
update (the whole input when nothing updates on the way), which gives the same result as any
chunking (docs/algorithm.md §1) in the fewest steps, and a fresh prefill runs SDPA's unmasked
causal kernel as a plain transformers forward does. Rows with fewer tokens are left-padded
inside the step, and the padding is masked out and later dropped. On the progressive schedule the cache updates a row when its count of tokens
seen reaches a multiple of ``n_up``, in prefill and in decoding alike, so a batch gives each row
exactly what it would get alone. On the prompt-end schedule feeding never updates: the caller
runs :meth:`MemoryRunner.end_prompt` once, after every row's whole prompt.

:func:`memory_cache` builds the same cache for transformers' own ``generate`` and pipelines,
whose chunked prefill then drives the updates.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor
from transformers import PreTrainedModel

from namm.memory.attention import ATTENTION_NAME
from namm.memory.cache import MemoryCache
from namm.memory.schedule import UpdateRecord
from namm.policies.base import MemoryPolicy
from namm.policies.registry import make_policy

__all__ = ["MemoryRunner", "UpdateRecord", "cache_argument", "memory_attention_enabled", "memory_cache"]


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Switch the model to the registered attention function ``name`` for the duration of a block."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def memory_attention_enabled(model: PreTrainedModel) -> Iterator[None]:
    """Switch the model to the memory attention function for the duration of a block."""
    return attention_implementation(model, ATTENTION_NAME)


def cache_argument(model: PreTrainedModel) -> str:
    """The name under which the model's forward takes its cache (``cache`` since transformers 5.x
    renamed ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def memory_cache(model: PreTrainedModel, policy: MemoryPolicy | str | None = None,
                 record_history: bool = False) -> MemoryCache:
    """A fresh namm cache for one ``model.generate`` call (or a text-generation pipeline): pass it
    as the model's cache argument, e.g. ``model.generate(ids, cache=namm.cache(model, policy),
    prefill_chunk_size=128)``; transformers' own (chunked) prefill and decoding then drive the
    memory updates, exactly as :func:`namm.generate` does. ``policy``: a policy or its name
    (default ``"full"``). The model is switched to namm's attention function, which runs plain SDPA
    for any other cache. On the prompt-end schedule the cache compresses before the first
    one-token forward (generation's first step), so the prompt's last prefill chunk must hold
    more than one token."""
    policy = make_policy("full") if policy is None else (make_policy(policy) if isinstance(policy, str) else policy)
    policy.bind(model)
    model.set_attn_implementation(ATTENTION_NAME)
    return MemoryCache(policy, model.config.get_text_config().num_hidden_layers, device=model.device,
                       record_history=record_history, auto_prompt_end=True)


@dataclass
class MemoryRunner:
    """Runs a model over a growing sequence per row with a policy managing the KV cache."""

    model: PreTrainedModel
    policy: MemoryPolicy
    batch_size: int
    chunk_size: int | None = None  # None: steps end only at memory updates (and at the input's end)
    record_history: bool = False
    cache: MemoryCache = field(init=False)
    cache_kwarg: str = field(init=False)  # the model's name for its cache argument

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.policy.bind(self.model)
        self.cache = MemoryCache(self.policy, self.model.config.get_text_config().num_hidden_layers, self.batch_size,
                                 self.model.device, self.record_history)
        self.cache_kwarg = cache_argument(self.model)

    @classmethod
    def forked(cls, base: "MemoryRunner", policy: MemoryPolicy, record_history: bool = False) -> "MemoryRunner":
        """A runner that goes on from ``base``'s rows (fed, never compressed) with ``policy``
        managing their memory (see :meth:`MemoryCache.fork`); ``base`` is left as it is."""
        runner = cls(base.model, policy, base.batch_size, base.chunk_size, record_history)
        runner.cache = base.cache.fork(policy)
        runner.cache.record_history = record_history
        return runner

    @property
    def seen(self) -> Tensor:
        """(B,) tokens fed per row (host)."""
        return self.cache.seen

    @property
    def previous_update(self) -> Tensor:
        """(B,) tokens seen at each row's last update (host)."""
        return self.cache.previous_update

    @property
    def kv_bytes_peak(self) -> Tensor:
        """(B,) the most KV bytes each row held right before an update."""
        return self.cache.kv_bytes_peak

    @property
    def history(self) -> list[UpdateRecord]:
        return self.cache.history

    @property
    def policy_seconds(self) -> float:
        return self.cache.policy_seconds

    @property
    def progressive(self) -> bool:
        """Whether feeding tokens triggers memory updates (every ``n_up`` tokens seen)."""
        return self.cache.progressive

    def _next_boundary(self, seen: int) -> int:
        """The count of tokens seen at which a row's current step ends."""
        ends = [(seen // step + 1) * step for step in (self.chunk_size, self.policy.n_up if self.progressive else None)
                if step is not None]
        return min(ends, default=sys.maxsize)

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
            seen = self.seen.tolist()
            takes = [min(len(tokens) - done[b], self._next_boundary(seen[b]) - seen[b]) if len(tokens) > done[b] else 0
                     for b, tokens in enumerate(rows_tokens)]
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
            if all(takes):
                last_logits = logits
            else:  # rows fed nothing keep their previous logits (never written in place: views of `every`)
                fed = torch.tensor([t > 0 for t in takes], device=logits.device)
                last_logits = torch.where(fed[:, None], logits, 0.0 if last_logits is None else last_logits)
            for b, t in enumerate(takes):
                done[b] += t
            if progress is not None:
                progress.update(sum(takes))
        if all_logits:
            vocab = self.model.config.get_text_config().vocab_size
            return [torch.cat(parts) if parts else torch.zeros(0, vocab, device=self.model.device) for parts in every]
        return last_logits

    def end_prompt(self) -> None:
        """Every row's whole prompt has been fed: a policy on the prompt-end schedule compresses
        every row now, once, before the first generated token (other policies: nothing happens)."""
        self.cache.end_prompt()

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
        self.cache.holding = True
        try:
            yield
        finally:
            self.cache.holding = False

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
        self.cache.columns = seen

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
        self.batch_size = 1
        self.cache.set_rows(1)
        try:
            self.feed([tokens])
        finally:
            self.batch_size = rows
        self.cache.repeat_rows(rows)

    def _step(self, pieces: list[Tensor], width: int, all_logits: bool = False, keep: int = 0) -> Tensor:
        """One forward over a left-padded (B, width) step; (B, vocab) last logits, or (B, width,
        vocab) with ``all_logits`` ((B, min(keep, width), vocab) with ``keep`` > 0)."""
        device = self.model.device
        embeds = next((p for p in pieces if p.dim() == 2), None)  # rows of input embeddings, not ids
        if all(len(p) == width for p in pieces):  # no padding: one stack, no mask
            inputs = torch.stack(pieces)
            positions = self.seen[:, None] + torch.arange(width)
            mask = None
        else:
            inputs = (torch.zeros(self.batch_size, width, dtype=torch.long) if embeds is None
                      else embeds.new_zeros(self.batch_size, width, embeds.shape[-1]))
            for b, piece in enumerate(pieces):
                if len(piece):
                    inputs[b, width - len(piece):] = piece
            lengths = torch.tensor([len(p) for p in pieces])
            real = torch.arange(width) >= width - lengths[:, None]
            positions = torch.where(real, self.seen[:, None] + real.long().cumsum(-1) - 1, 0)
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            mask = (causal & real[:, None, :])[:, None].to(device)  # (B, 1, width, width): the step's own mask
        out = self.model(
            **{"input_ids" if embeds is None else "inputs_embeds": inputs.to(device)},
            position_ids=positions.to(device), attention_mask=mask, use_cache=True,
            logits_to_keep=(min(keep, width) if keep else 0) if all_logits else 1, **{self.cache_kwarg: self.cache},
        )
        return out.logits.float() if all_logits else out.logits[:, -1].float()

    def update(self, rows: Tensor) -> None:
        """Run the policy on every layer for ``rows`` and shrink their caches."""
        self.cache.update_rows(rows)

    def kv_bytes(self) -> Tensor:
        """(B,) bytes of keys and values held now."""
        return self.cache.nbytes().cpu()

    def kv_bytes_full(self) -> Tensor:
        """(B,) bytes a full cache would hold for the tokens seen so far."""
        return self.seen * self.cache.bytes_per_token()
