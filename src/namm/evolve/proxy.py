"""The proxy evaluator: NAMM members scored on data recorded once per prompt (docs/algorithm.md §8).

Once per training prompt and run, the full-cache model reads the prompt up to its last memory
update ``U``: the largest multiple of ``n_up`` before the last prompt token, the end of the
whole prompt on the prompt-end schedule or, for a query-agnostic prompt, the end of its context
(where every policy compresses before the question). At every update it records the normalised
NAMM features of every cached token, and at the end every layer's keys and values. A member then
costs only

* a replay of the progressive schedule: at each update its scorer scores the recorded features of
  the tokens it still holds and the NAMM selection (threshold or budget) decides which survive, and
* one batched forward of the *continuation* (the prompt after ``U``, then the reference answer,
  teacher-forced) over each member's surviving keys, giving the answer's statistic (mean
  log-likelihood or margin, :func:`namm.evolve.fitness.answer_statistic`).

The approximation: features and the keys of prompt tokens come from the full-cache run, where real
eviction would compute them over an already reduced cache. The continuation itself runs over the
member's real reduced cache. With the all-zero NAMM every token survives and the proxy gives the
full-cache values exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from namm.evolve.distributed import Workers
from namm.evolve.fitness import Scores, TrainingPrompt, answer_statistic
from namm.evolve.record_store import RecordStore

from namm.memory.cache import compaction_index, gather_slots
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.registry import make_policy
from namm.policies.namm.policy import NAMMPolicy
from namm.policies.namm.selection import out_of_window, pooled_scores, select_tokens

GATHER_FLOATS = 1 << 25  # feature floats gathered at once during a replay (bounds its memory)
NO_WINDOW = 1 << 40  # ProxyPrompt.windows of a global-attention layer


@dataclass(eq=False)
class FeatureRecorder(MemoryPolicy):
    """Keep-everything policy that records, at every update, the NAMM features of every layer
    (batch of one row). ``namm`` provides the feature pipeline and its frozen normalisation."""

    namm: NAMMPolicy
    name = "namm-recorder"

    def __post_init__(self) -> None:
        self.n_up = self.namm.n_up
        self.query_window = self.namm.query_window
        self.updates: list[list[Tensor]] = []  # per update, per layer: (H, K, dim)

    def reset(self, batch_size: int) -> None:
        if batch_size != 1:
            raise ValueError("the feature recorder runs one prompt at a time")
        self.updates = []

    def select(self, view: LayerView) -> Tensor:
        if view.layer_idx == 0:
            self.updates.append([])
        self.updates[-1].append(self.namm.token_features(view)[0])
        return view.valid


@dataclass
class ProxyPrompt:
    """What the proxy keeps of one training prompt."""

    key: str
    task: int
    seen: int  # U: tokens read before the continuation (the last update point)
    features: list[Tensor]  # per update at n_up, 2 n_up, ... and U: (L, H, K_u, dim) float32
    keys: list[Tensor]  # per layer: (H, U, D) full-cache keys
    values: list[Tensor]  # per layer: (H, U, D)
    continuation: Tensor  # prompt tokens after U, then the answer without its last token
    answer: Tensor  # (A,) reference answer token ids
    windows: Tensor  # (L,) each layer's sliding window (a huge value for global layers)
    lead_logits: Tensor | None = None  # (1, vocab): the full cache's prediction of the answer's first
    # token when U is the prompt's end (query-aware prompt-end: computed before the compression)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def tensors(self) -> dict[str, Tensor]:
        """The recording as named tensors (for a :class:`RecordStore`); ``key`` and ``task`` are not kept."""
        named = {"seen": torch.tensor(self.seen), "continuation": self.continuation, "answer": self.answer,
                 "windows": self.windows}
        for name in ("features", "keys", "values"):
            named |= {f"{name}.{i}": t for i, t in enumerate(getattr(self, name))}
        return named | ({"lead_logits": self.lead_logits} if self.lead_logits is not None else {})

    @classmethod
    def from_tensors(cls, key: str, task: int, named: dict[str, Tensor]) -> "ProxyPrompt | None":
        """The recording of :meth:`tensors` (None when a tensor is missing)."""
        def listed(name: str) -> list[Tensor]:
            return [named[f"{name}.{i}"] for i in range(sum(k.startswith(name + ".") for k in named))]

        try:
            return cls(key=key, task=task, seen=int(named["seen"]), features=listed("features"), keys=listed("keys"),
                       values=listed("values"), continuation=named["continuation"], answer=named["answer"],
                       windows=named["windows"], lead_logits=named.get("lead_logits"))
        except KeyError:
            return None


def last_update_point(prompt_tokens: int, n_up: int) -> int:
    """The largest multiple of ``n_up`` before the prompt's last token (0 if none)."""
    return (prompt_tokens - 1) // n_up * n_up


@torch.inference_mode()
def record_prompt(model: PreTrainedModel, namm: NAMMPolicy, prompt_ids: Tensor, answer_ids: Tensor, key: str,
                  task: int, chunk_size: int = 128, context_tokens: int | None = None) -> ProxyPrompt:
    """Run the full-cache model over ``prompt_ids`` up to its last update point, recording the
    features at every update and the keys and values at the end. With ``context_tokens``
    (query-agnostic) the last update point is the end of the context, compressed there whatever
    the schedule, and the question is part of the continuation. Otherwise, on ``namm``'s
    prompt-end schedule, it is the end of the whole prompt (the compression reads the question's
    queries) and the continuation is the answer alone. On the prompt-end schedule that is the only
    update, so the proxy gives real eviction's values exactly."""
    prompt_end = context_tokens is None and namm.schedule == "prompt-end"
    if context_tokens is not None:
        seen = context_tokens
    else:
        seen = len(prompt_ids) if prompt_end else last_update_point(len(prompt_ids), namm.n_up)
    if seen == 0:
        raise ValueError(f"prompt {key} has {len(prompt_ids)} tokens: it needs more than n_up = {namm.n_up} "
                         f"to see a memory update")
    if len(answer_ids) == 0:
        raise ValueError(f"prompt {key} has an empty reference answer")
    continuation = torch.cat([prompt_ids[seen:], answer_ids[:-1]])
    if namm.schedule == "progressive" and len(continuation) + 1 > namm.n_up:
        raise ValueError(f"prompt {key}: {len(continuation) + 1} tokens after the last update point would cross "
                         f"another memory update (n_up = {namm.n_up}); the proxy replays updates of the prompt only")
    recorder = FeatureRecorder(namm)
    recorder.schedule = namm.schedule
    runner = MemoryRunner(model, recorder, 1, chunk_size=chunk_size)
    with memory_attention_enabled(model):
        last = runner.feed([prompt_ids[:seen]])
        if context_tokens is not None:
            runner.end_context()
        elif prompt_end:
            runner.end_prompt()
    layers = runner.cache.layers
    expected = torch.arange(seen, device=layers[0].positions.device)
    if any(not bool((layer.positions[0] == expected).all()) for layer in layers):
        raise RuntimeError("the feature recorder must keep every token in order")
    features = [torch.stack(per_layer) for per_layer in recorder.updates]
    record = ProxyPrompt(key=key, task=task, seen=seen, features=features,
                       keys=[layer.keys[0].clone() for layer in layers],
                       values=[layer.values[0].clone() for layer in layers],
                       continuation=continuation, answer=answer_ids.clone(),
                       windows=torch.tensor([layer.sliding_window or NO_WINDOW for layer in layers]),
                       lead_logits=last.float().clone() if prompt_end else None)
    return record


def replay(prompt: ProxyPrompt, namm: NAMMPolicy, params: Tensor) -> Tensor:
    """(P, L, H, U) bool: the tokens each of the P parameter rows holds after the prompt's last
    update, replaying the progressive schedule with ``namm``'s scorer and selection (its threshold,
    or its budget in budget mode) on the recorded features."""
    params = params.float()
    P = params.shape[0]
    held: Tensor | None = None
    for features in prompt.features:
        L, H, K, dim = features.shape
        alive = torch.ones(P, L, H, K, dtype=torch.bool, device=features.device)
        if held is not None:
            alive[..., :held.shape[-1]] = held
        order, real = compaction_index(alive)  # (P, L, H, W): surviving tokens, packed in order
        W = order.shape[-1]
        keep = torch.zeros_like(real)
        shared = getattr(namm.net, "score_shared", None)  # per-token scorers: score every token once
        width = 16 if shared is not None else dim
        step = max(1, GATHER_FLOATS // max(1, L * H * K * width))
        seen = torch.full((L,), K, dtype=torch.long, device=features.device)
        for lo in range(0, P, step):
            rows = slice(lo, lo + step)
            n = order[rows].shape[0]
            valid = real[rows].reshape(n * L, H, W)
            if shared is not None:
                scores = torch.gather(shared(features, params[rows]), 3, order[rows]).reshape(n * L, H, W)
            else:
                x = gather_slots(features.expand(n, L, H, K, dim), order[rows], 3).reshape(n * L, H, W, dim)
                scores = namm.net.score(x, valid, params[rows].repeat_interleave(L, dim=0))
            scores = pooled_scores(scores, valid, namm.pool)
            scores, cap = out_of_window(scores, valid, order[rows].reshape(n * L, H, W), seen.repeat(n),
                                        prompt.windows.to(seen.device).repeat(n), namm.cap(seen.repeat(n)))
            keep[rows] = select_tokens(scores, valid, namm.threshold, cap,
                                       namm.floor_count(seen.repeat(n))).view(n, L, H, W)
        held = torch.zeros_like(alive).scatter_(-1, order, keep & real)
    return held


@torch.inference_mode()
def continuation_logits(model: PreTrainedModel, prompt: ProxyPrompt, held: Tensor | None,
                        chunk_size: int = 512) -> Tensor:
    """(P, A, vocab) logits predicting each reference answer token, teacher-forced after the
    prompt, for each row of ``held`` ((P, L, H, U) bool, the tokens each row keeps; None: all, one
    row)."""
    L = prompt.num_layers
    H, U, _ = prompt.keys[0].shape
    if held is None:
        held = torch.ones(1, L, H, U, dtype=torch.bool)
    P = held.shape[0]
    device = prompt.keys[0].device
    layers = []
    for l in range(L):
        order, real = compaction_index(held[:, l].to(device))  # (P, H, W)
        keys = gather_slots(prompt.keys[l].expand(P, *prompt.keys[l].shape), order, 2)
        values = gather_slots(prompt.values[l].expand(P, *prompt.values[l].shape), order, 2)
        layers.append((keys, values, torch.where(real, order, -1)))
    parts = [] if prompt.lead_logits is None else [prompt.lead_logits.to(device)[None].expand(P, -1, -1)]
    A = len(prompt.answer) - sum(part.shape[1] for part in parts)  # answer tokens read over the reduced caches
    if A:
        runner = MemoryRunner(model, make_policy("full"), P, chunk_size=chunk_size)
        runner.preload(layers, prompt.seen)
        with memory_attention_enabled(model):
            logits = runner.feed([prompt.continuation] * P, all_logits=True, keep=A)
        parts.append(torch.stack([row[-A:] for row in logits]))
        del runner, logits
    return torch.cat(parts, 1)


def continuation_scores(model: PreTrainedModel, prompt: ProxyPrompt, held: Tensor | None,
                        chunk_size: int = 512, statistic: str = "loglik") -> Tensor:
    """(P,) answer statistic (:func:`namm.evolve.fitness.answer_statistic`) of the reference answer
    under each row of ``held`` (see :func:`continuation_logits`)."""
    tail = continuation_logits(model, prompt, held, chunk_size)
    return answer_statistic(tail, prompt.answer, statistic).cpu()


def position_rule_held(prompt: ProxyPrompt, policy: MemoryPolicy) -> Tensor:
    """(1, L, H, U) bool: what a baseline that reads no queries (``query_window == 0``: recency,
    streaming, l2, ...) keeps when it compresses the recorded full cache once, at its end: on the
    prompt-end schedule, exactly what real eviction keeps."""
    if policy.query_window != 0:
        raise ValueError(f"{policy.name} reads buffered queries, which a recording does not hold")
    U = prompt.seen
    device = prompt.keys[0].device
    seen = torch.tensor([U], device=device)
    masks = []
    for l in range(prompt.num_layers):
        keys, values = prompt.keys[l][None], prompt.values[l][None]
        positions = torch.arange(U, device=device).expand(1, keys.shape[1], U)
        window = int(prompt.windows[l])
        view = LayerView(l, prompt.num_layers, keys, values, positions, None, None, seen, torch.zeros_like(seen),
                         keys.shape[-1] ** -0.5, window if window < NO_WINDOW else None, {},
                         torch.zeros(1, dtype=torch.long, device=device))
        masks.append(policy.select(view))
    return torch.stack(masks, 1).cpu()


def held_fraction(held: Tensor) -> Tensor:
    """(P,) share of the full cache's tokens a row holds after the last update (mean over layers
    and heads, i.e. its KV-byte fraction there)."""
    return held.float().mean((1, 2, 3)).cpu()



class ProxyScorer:
    """Scores NAMM parameter vectors with the proxy: an answer statistic (``statistic``: mean
    log-likelihood or margin) on training prompts, each prompt recorded once per run (or once per
    machine, read back from ``store``). Same interface as :class:`namm.evolve.fitness.PopulationScorer`;
    the NAMM policy's current mode (threshold, or budget after ``set_budget``) drives the replayed
    selection."""

    def __init__(self, model: PreTrainedModel, policy: NAMMPolicy, workers: Workers | None = None,
                 progress: bool = True, statistic: str = "loglik", store: RecordStore | None = None):
        self.model, self.policy = model, policy
        self.statistic = statistic
        self.store = store
        self.workers = workers or Workers()
        self.progress = progress and self.workers.is_main
        self.records: dict[str, ProxyPrompt] = {}
        self.full_cache: dict[str, float] = {}

    def record(self, prompts: list[TrainingPrompt]) -> list[ProxyPrompt]:
        """The recorded data of each prompt (recorded now where missing)."""
        todo = [p for p in prompts if p.key not in self.records]
        for p in tqdm(todo, desc="record prompts", unit="prompt", disable=not self.progress or not todo, leave=False):
            digest = self.store.digest(self.model, self.policy, p) if self.store else None
            stored = self.store.load(digest, self.model.device) if digest else None
            record = ProxyPrompt.from_tensors(p.key, p.task, stored) if stored else None
            if record is None:
                record = record_prompt(self.model, self.policy, p.token_ids, p.answer_ids, p.key, p.task,
                                       context_tokens=p.context_tokens)
                if digest and self.workers.is_main:
                    self.store.save(digest, record.tensors())
            self.records[p.key] = record
        return [self.records[p.key] for p in prompts]

    def members(self, params: Tensor, prompts: list[TrainingPrompt], batched: bool = True) -> Scores:
        """(P, n) answer statistics and cache fractions of every member on every prompt."""
        mine = params[self.workers.block(len(params))]
        scores = torch.zeros(len(mine), len(prompts))
        fraction = torch.ones(len(mine), len(prompts))
        records = self.record(prompts)
        if len(mine):
            for i, rec in enumerate(tqdm(records, desc="population", unit="prompt", disable=not self.progress,
                                         leave=False)):
                held = replay(rec, self.policy, mine)
                scores[:, i] = continuation_scores(self.model, rec, held, statistic=self.statistic)
                fraction[:, i] = held_fraction(held)
        return Scores(self.workers.gather_blocks(scores), self.workers.gather_blocks(fraction))

    def vector(self, params: Tensor, prompts: list[TrainingPrompt], batch_size: int = 1) -> Scores:
        """(1, n) answer statistics and cache fractions of one parameter vector."""
        return self.members(params.reshape(1, -1), prompts)

    def full(self, prompts: list[TrainingPrompt], batch_size: int = 1) -> Tensor:
        """(n,) full-cache answer statistics, computed once per prompt."""
        for p, rec in zip(prompts, self.record(prompts)):
            if p.key not in self.full_cache:
                self.full_cache[p.key] = float(continuation_scores(self.model, rec, None, statistic=self.statistic)[0])
        return torch.tensor([self.full_cache[p.key] for p in prompts])
