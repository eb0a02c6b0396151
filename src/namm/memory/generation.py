"""``namm.generate``: prompt in, text out, with a memory policy managing the KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from namm.memory.driver import MemoryRunner, UpdateRecord, memory_attention_enabled
from namm.memory.stopping import StopStrings
from namm.policies.base import MemoryPolicy
from namm.policies.registry import make_policy


@dataclass
class GenerationOutput:
    """The result of one prompt."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    tokens_seen: int
    cache_tokens_per_layer: list[int]
    kv_bytes: int
    kv_bytes_full: int
    kv_bytes_peak: int
    kv_bytes_full_peak: int
    prefill_seconds: float
    decode_seconds: float
    policy_seconds: float
    less_state_bytes: int = 0  # the policy's memory beside the KV cache (LESS state), per sequence
    history: list[UpdateRecord] = field(default_factory=list)

    @property
    def cache_fraction(self) -> float:
        """Mean over layers of retained tokens / tokens seen."""
        if not self.cache_tokens_per_layer or self.tokens_seen == 0:
            return 1.0
        return sum(self.cache_tokens_per_layer) / len(self.cache_tokens_per_layer) / self.tokens_seen

    @property
    def memory_fraction(self) -> float:
        """(KV bytes + LESS state bytes) held at the end / full-cache KV bytes."""
        return (self.kv_bytes + self.less_state_bytes) / self.kv_bytes_full if self.kv_bytes_full else 1.0

    def to_dict(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
            "tokens_seen": self.tokens_seen, "cache_tokens_per_layer": self.cache_tokens_per_layer,
            "cache_fraction": self.cache_fraction, "kv_bytes": self.kv_bytes, "kv_bytes_full": self.kv_bytes_full,
            "kv_bytes_peak": self.kv_bytes_peak, "kv_bytes_full_peak": self.kv_bytes_full_peak,
            "less_state_bytes": self.less_state_bytes, "memory_fraction": self.memory_fraction,
            "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
            "policy_seconds": self.policy_seconds,
        }


def model_context(model: PreTrainedModel) -> int:
    """The longest sequence the model was trained for."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)


Message = dict[str, str]  # {"role": ..., "content": ...}
Prompt = str | list[int] | Tensor | list[Message]


def is_chat(prompt) -> bool:
    """Whether ``prompt`` is a chat: a list of {"role", "content"} messages."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def render_chat(tokenizer: PreTrainedTokenizerBase | None, messages: list[Message]) -> str:
    """The text of a chat as the tokenizer's chat template renders it, ready for the assistant's turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat messages need a tokenizer with a chat template")
    if any(not {"role", "content"} <= set(m) for m in messages):
        raise ValueError('every chat message needs a "role" and a "content"')
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase | None, prompts: list[Prompt], context: int,
                     add_special_tokens: bool = True, what: str = "prompt") -> list[Tensor]:
    """Token ids of each prompt (text, chat messages rendered by the tokenizer's chat template, or
    token ids already); clear errors, naming each as ``what``, for empty or over-long prompts.
    ``add_special_tokens=False``: text gets no BOS (a question)."""
    out = []
    for i, prompt in enumerate(prompts):
        if is_chat(prompt):  # the template writes its own special tokens
            ids = torch.tensor(tokenizer(render_chat(tokenizer, prompt), add_special_tokens=False).input_ids,
                               dtype=torch.long)
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"{what} {i} is empty")
            if tokenizer is None:
                raise ValueError(f"a tokenizer is needed for text {what}s")
            ids = torch.tensor(tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids, dtype=torch.long)
        else:
            ids = torch.as_tensor(prompt, dtype=torch.long).flatten()
        if len(ids) == 0:
            raise ValueError(f"{what} {i} is empty")
        if len(ids) >= context:
            raise ValueError(f"{what} {i} has {len(ids)} tokens; the model's context is {context} tokens")
        out.append(ids)
    return out


def _question_ids(tokenizer: PreTrainedTokenizerBase | None, question: Prompt | list[Prompt], single: bool,
                  ids: list[Tensor], context: int) -> list[Tensor]:
    """Token ids of the question of every prompt; a clear error when context and question do not fit."""
    questions = [question] if single else list(question)
    if len(questions) != len(ids):
        raise ValueError(f"{len(questions)} questions for {len(ids)} prompts")
    asked = tokenize_prompts(tokenizer, questions, context, add_special_tokens=False, what="question")
    for i, (x, q) in enumerate(zip(ids, asked)):
        if len(x) + len(q) >= context:
            raise ValueError(f"prompt {i} and its question have {len(x) + len(q)} tokens; the model's context is "
                             f"{context} tokens")
    return asked


def _sampler(do_sample: bool, temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if do_sample:
        if temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k and top_k > 0:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A random generator seeded with ``seed`` on ``device`` (sampling draws on the logits' device)."""
    return torch.Generator(device=device).manual_seed(seed)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompt: Prompt | list[Prompt],
    policy: MemoryPolicy | str | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    chunk_size: int | None = None,
    record_history: bool = False,
    progress: bool = False,
    eos_token_id: list[int] | None | str = "auto",
    question: Prompt | list[Prompt] | None = None,
) -> GenerationOutput | list[GenerationOutput]:
    """Generate from one prompt (or a list: a batch) with ``policy`` managing the KV cache.

    Greedy by default; ``do_sample`` with ``temperature``/``top_k``/``top_p`` samples instead.
    Stops at the model's end-of-sequence token, at any ``stop`` string, or after
    ``max_new_tokens``. A prompt is text, token ids or chat messages (a list of {"role", "content"}
    dicts, rendered with the tokenizer's chat template). A list of prompts returns one output per
    prompt, each identical to what the prompt would give alone. ``eos_token_id`` overrides the
    model's end-of-sequence ids (None: never stop early). A policy on the prompt-end schedule
    compresses once, after the whole prompt and before the first generated token.

    With ``question`` (one per prompt, text tokenized without special tokens, or token ids) the
    prompt is a context and the query-agnostic protocol runs: the context is prefilled (progressive
    policies update on their schedule) and compressed once by every policy, then the question is
    fed with no compression before the first answer token; decoding follows the policy's schedule.

    ``chunk_size`` caps the tokens of one prefill step (None: a step runs to the next memory
    update); any value gives the same result.
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    single, ids, asked, lengths = _prepared(model, tokenizer, prompt, question)
    policy = make_policy("full") if policy is None else (make_policy(policy) if isinstance(policy, str) else policy)
    runner = MemoryRunner(model, policy, len(ids), chunk_size=chunk_size, record_history=record_history)
    eos = _eos_ids(model, tokenizer) if eos_token_id == "auto" else set(eos_token_id or [])
    decoder = _Decoder(runner, tokenizer, eos, _sampler(do_sample, temperature, top_k, top_p), stop, do_sample, seed,
                       model_context(model), lengths, max_new_tokens)
    with memory_attention_enabled(model):
        t0 = time.perf_counter()
        with tqdm(total=sum(lengths), desc="prefill", unit="tok", disable=not progress, leave=False) as bar:
            logits = _end_prompt(runner, _prefill(runner, ids, bar), asked, bar)
        t1 = time.perf_counter()
        generated = decoder.run(logits, progress)
        t2 = time.perf_counter()
    outputs = _outputs(runner, tokenizer, generated, lengths, eos, stop, t1 - t0, t2 - t1)
    return outputs[0] if single else outputs


@torch.inference_mode()
def generate_shared(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    prompt: Prompt | list[Prompt],
    policies: list[MemoryPolicy],
    max_new_tokens: int = 32,
    stop: list[str] | None = None,
    record_history: bool = False,
    eos_token_id: list[int] | None | str = "auto",
    question: Prompt | list[Prompt] | None = None,
) -> list[GenerationOutput | list[GenerationOutput]]:
    """Greedy :func:`generate` with each of ``policies``, prefilling the prompts once for all of
    them: one output (or list, for a list of prompts) per policy, token for token what
    :func:`generate` gives with that policy alone. Every policy must compress only after the
    prompt (or context, with ``question``), so that the prefill is the same for all: the prompt-end
    schedule, or no eviction, and no attention hook (LESS). Each policy's ``prefill_seconds``
    counts the whole shared prefill, so its timings are what it would take alone."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if not policies:
        raise ValueError("no policy given")
    for p in policies:
        p.bind(model)
        if not prefill_shareable(p):
            raise ValueError(f"policy {p.name} compresses during the prefill or changes its attention; "
                             "it cannot share a prefill")
    single, ids, asked, lengths = _prepared(model, tokenizer, prompt, question)
    base = MemoryRunner(model, make_policy("full"), len(ids))
    base.cache.query_window = widest_query_window(policies)
    eos = _eos_ids(model, tokenizer) if eos_token_id == "auto" else set(eos_token_id or [])
    results = []
    with memory_attention_enabled(model):
        t0 = time.perf_counter()
        prompt_logits = _prefill(base, ids)
        shared_seconds = time.perf_counter() - t0
        for policy in policies:
            runner = MemoryRunner.forked(base, policy, record_history)
            t0 = time.perf_counter()
            logits = _end_prompt(runner, prompt_logits, asked)
            t1 = time.perf_counter()
            decoder = _Decoder(runner, tokenizer, eos, LogitsProcessorList(), stop, False, None, model_context(model),
                               lengths, max_new_tokens)
            generated = decoder.run(logits, False)
            t2 = time.perf_counter()
            outputs = _outputs(runner, tokenizer, generated, lengths, eos, stop, shared_seconds + t1 - t0, t2 - t1)
            results.append(outputs[0] if single else outputs)
            del runner, decoder  # free this fork's cache now, not beside the next's
    return results


def prefill_shareable(policy: MemoryPolicy) -> bool:
    """Whether ``policy`` leaves a prefill untouched, so :func:`generate_shared` can share it:
    it compresses only at the prompt's end (or never) and has no attention hook."""
    return (not policy.evicts or policy.schedule == "prompt-end") and policy.attend is None


def widest_query_window(policies: list[MemoryPolicy]) -> int | None:
    """The buffered queries per layer that serve every policy (None: all of them)."""
    windows = [p.query_window for p in policies if p.evicts]
    return None if None in windows else max(windows, default=0)


def _prepared(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, prompt: Prompt | list[Prompt],
              question: Prompt | list[Prompt] | None) -> tuple[bool, list[Tensor], list[Tensor] | None, list[int]]:
    """(one prompt given, token ids per prompt, question ids per prompt or None, tokens per prompt
    with its question)."""
    single = isinstance(prompt, str) or (isinstance(prompt, Tensor) and prompt.dim() == 1) or is_chat(prompt) or (
        isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int))
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    context = model_context(model)
    ids = tokenize_prompts(tokenizer, prompts, context)
    asked = None if question is None else _question_ids(tokenizer, question, single, ids, context)
    lengths = [len(x) for x in ids] if asked is None else [len(x) + len(q) for x, q in zip(ids, asked)]
    return single, ids, asked, lengths


def _prefill(runner: MemoryRunner, ids: list[Tensor], bar=None) -> Tensor:
    """Feed every row its prompt (a common prefix of identical prompts computed once); the last logits."""
    shared = runner.shareable(ids)  # identical prompts (a population): common prefix computed once
    if shared:
        runner.feed_shared(ids[0][:shared])
        if bar is not None:
            bar.update(shared * len(ids))
    return runner.feed([x[shared:] for x in ids], progress=bar)


def _end_prompt(runner: MemoryRunner, logits: Tensor, asked: list[Tensor] | None, bar=None) -> Tensor:
    """After the prompt: compress on the prompt-end schedule, or, with questions, compress the
    context and feed the questions without compressing; the logits decoding starts from."""
    if asked is None:
        runner.end_prompt()
        return logits
    runner.end_context()
    with runner.updates_held():
        return runner.feed(asked, progress=bar)


@dataclass
class _Decoder:
    """The decoding loop of one batch: picks tokens, stops rows, feeds the picks back."""

    runner: MemoryRunner
    tokenizer: PreTrainedTokenizerBase | None
    eos: set[int]
    procs: LogitsProcessorList
    stop: list[str] | None
    do_sample: bool
    seed: int | None
    context: int
    lengths: list[int]
    max_new_tokens: int

    def run(self, logits: Tensor, progress: bool) -> list[list[int]]:
        """The generated token ids of every row."""
        B = len(self.lengths)
        stops = StopStrings(self.tokenizer, self.stop or []) if self.tokenizer is not None else None
        gen: torch.Generator | None = None  # made on the logits' device at the first sample
        generated: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        budget = [min(self.max_new_tokens, self.context - n) for n in self.lengths]
        for step in tqdm(range(max(budget, default=0)), desc="decode", unit="tok", disable=not progress, leave=False):
            if len(self.procs):
                history = torch.tensor([g[-1:] or [0] for g in generated], device=logits.device)
                logits = self.procs(history, logits)
            if self.do_sample:
                probs = torch.softmax(logits, dim=-1)
                if gen is None and self.seed is not None:
                    gen = seeded_generator(self.seed, probs.device)
                next_ids = torch.multinomial(probs, 1, generator=gen).flatten().tolist()
            else:
                next_ids = logits.argmax(-1).tolist()
            feed = []
            for b in range(B):
                if finished[b] or step >= budget[b]:
                    finished[b] = True
                    feed.append(torch.empty(0, dtype=torch.long))
                    continue
                tok = next_ids[b]
                generated[b].append(tok)
                if tok in self.eos or (stops and stops.found(generated[b])):
                    finished[b] = True
                if finished[b] or step + 1 >= budget[b]:
                    finished[b] = True
                    feed.append(torch.empty(0, dtype=torch.long))
                else:
                    feed.append(torch.tensor([tok]))
            if all(finished):
                break
            logits = self.runner.feed(feed)
        return generated


def _outputs(runner: MemoryRunner, tokenizer: PreTrainedTokenizerBase | None, generated: list[list[int]],
             lengths: list[int], eos: set[int], stop: list[str] | None, prefill_seconds: float,
             decode_seconds: float) -> list[GenerationOutput]:
    """One :class:`GenerationOutput` per row of a finished generation."""
    counts = runner.cache.token_counts().cpu()
    kv_now, kv_full = runner.kv_bytes(), runner.kv_bytes_full()
    peak = torch.maximum(runner.kv_bytes_peak, kv_now)
    outputs = []
    for b in range(len(lengths)):
        tokens = [t for t in generated[b] if t not in eos]
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
        for s in stop or []:
            if s in text:
                text = text[: text.index(s)]
        outputs.append(GenerationOutput(
            text=text, token_ids=generated[b], prompt_tokens=lengths[b], tokens_seen=int(runner.seen[b]),
            cache_tokens_per_layer=counts[:, b].tolist(), kv_bytes=int(kv_now[b]), kv_bytes_full=int(kv_full[b]),
            kv_bytes_peak=int(peak[b]), kv_bytes_full_peak=int(kv_full[b]),
            prefill_seconds=prefill_seconds, decode_seconds=decode_seconds, policy_seconds=runner.policy_seconds,
            less_state_bytes=runner.policy.state_nbytes(),
            history=[h for h in runner.history if h.row == b],
        ))
    return outputs
