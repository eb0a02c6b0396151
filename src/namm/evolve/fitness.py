"""Fitness of NAMM parameter vectors (docs/algorithm.md §7).

Two families, both relative to the full-cache model on the *same* prompts:

* answer statistics (``loglik``, ``margin``): a teacher-forced number per prompt computed from the
  logits that predict its reference answer (:func:`answer_statistic`); the fitness is the member's
  value minus the full cache's, averaged per task, then over tasks (:func:`answer_fitness`);
* the task metric (``task``, the paper's): per task the member's mean score over the full cache's
  (:func:`normalised_fitness`).

Either can carry a penalty when the mean cache fraction exceeds a target. All members of a
generation see the same prompts (common random numbers); full-cache values are computed once per
prompt and cached. Members are scored in a batch: P members on one prompt in one call, each row
with its own parameters (``policy.set_population``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from namm.evolve.distributed import Workers
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.memory.generation import generate, model_context, tokenize_prompts
from namm.policies.base import MemoryPolicy
from namm.policies.registry import make_policy
from namm.tasks.base import Sample
from namm.tasks.metrics import score_sample


@dataclass
class TrainingPrompt:
    """One training prompt: its task index, the sample and its token ids."""

    task: int
    sample: Sample
    token_ids: Tensor
    answer_ids: Tensor | None = None  # the reference continuation's tokens (teacher-forced fitness)
    context_tokens: int | None = None  # query-agnostic: the first tokens, compressed before the rest is read

    @property
    def key(self) -> str:
        return f"{self.task}:{self.sample.id}"


@dataclass
class MemoryTerm:
    """Penalty ``weight * max(0, cache_fraction - target)`` on a member's mean cache fraction."""

    target: float
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"memory target must be a cache fraction in (0, 1], got {self.target}")
        if self.weight < 0:
            raise ValueError("memory weight must be >= 0")

    def penalty(self, cache_fraction: Tensor) -> Tensor:
        return self.weight * (cache_fraction - self.target).clamp(min=0)


def with_memory_term(fitness: Tensor, cache_fraction: Tensor | None, memory: MemoryTerm | None) -> Tensor:
    """``fitness`` (P,) minus the memory penalty on each member's mean (P, n) cache fraction."""
    if memory is None:
        return fitness
    if cache_fraction is None:
        raise ValueError("a memory term needs cache fractions")
    return fitness - memory.penalty(cache_fraction.double().mean(1))


def normalised_fitness(
    scores: Tensor, full_scores: Tensor, tasks: Tensor, cache_fraction: Tensor | None = None,
    memory: MemoryTerm | None = None,
) -> Tensor:
    """(P,) fitness from (P, n) member scores, (n,) full-cache scores and (n,) task indices.

    Per task: member mean / full-cache mean over that task's prompts; when the full cache scores
    0 on all of them the ratio is 1 + member mean (so matching the full cache still gives 1).
    Then the mean over tasks, minus the memory penalty on the (P, n) ``cache_fraction`` averaged
    per member.
    """
    ratios = []
    for task in torch.unique(tasks):
        cols = tasks == task
        member = scores[:, cols].double().mean(1)
        full = full_scores[cols].double().mean()
        ratios.append(member / full if full > 0 else 1 + member)
    return with_memory_term(torch.stack(ratios).mean(0), cache_fraction, memory)


def answer_ids(tokenizer, sample: Sample) -> Tensor:
    """Token ids of the sample's reference continuation (:meth:`Sample.reference`), no special tokens."""
    ids = tokenizer(sample.reference(), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"sample {sample.id} has an empty reference answer")
    return torch.tensor(ids, dtype=torch.long)


ANSWER_STATISTICS = ("loglik", "margin")  # teacher-forced fitnesses (docs/algorithm.md §7)
MARGIN_CLIP = 3.0  # nats: the margin statistic is clipped to [-MARGIN_CLIP, MARGIN_CLIP]


def answer_statistic(logits: Tensor, answer: Tensor, statistic: str) -> Tensor:
    """(...,) one number per row from (..., A, vocab) logits that predict the (A,) answer tokens.

    ``"loglik"``: the mean log-probability of the answer tokens. ``"margin"``: the smallest, over
    the answer tokens, of log p(reference token) minus the largest log-probability of any other
    token, clipped to [-MARGIN_CLIP, MARGIN_CLIP]. It is positive exactly when greedy decoding
    would emit the whole answer, so it follows exact match where a mean log-likelihood rewards
    keeping parts of the answer. ``"accuracy"`` (a diagnostic, not a fitness): the share of answer
    tokens that are the argmax."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    index = answer.to(logp.device).expand(*logp.shape[:-1])[..., None]
    reference = logp.gather(-1, index)[..., 0]  # (..., A)
    if statistic == "loglik":
        return reference.mean(-1)
    margin = reference - logp.scatter(-1, index, float("-inf")).amax(-1)  # (..., A)
    if statistic == "margin":
        return margin.amin(-1).clamp(-MARGIN_CLIP, MARGIN_CLIP)
    if statistic == "accuracy":
        return (margin > 0).float().mean(-1)
    raise ValueError(f"unknown answer statistic {statistic!r}; choose from {', '.join(ANSWER_STATISTICS)}, accuracy")


def answer_fitness(
    values: Tensor, full_values: Tensor, tasks: Tensor, cache_fraction: Tensor | None = None,
    memory: MemoryTerm | None = None,
) -> Tensor:
    """(P,) fitness from (P, n) member answer statistics (:func:`answer_statistic`) and the (n,)
    full-cache values on the same prompts: per task the mean of member minus full cache, then the
    mean over tasks, minus the memory penalty. The full cache scores 0."""
    gaps = [(values[:, tasks == task].double() - full_values[tasks == task].double()).mean(1)
            for task in torch.unique(tasks)]
    return with_memory_term(torch.stack(gaps).mean(0), cache_fraction, memory)


def tokenize_samples(tokenizer, model, samples: list[tuple[int, Sample]],
                     query_agnostic: bool = False) -> list[TrainingPrompt]:
    """Token ids (and reference answer ids) for (task index, sample) pairs, checked against the
    model's context. ``query_agnostic``: each prompt is its context then its question, tokenized
    apart as :func:`namm.generate` does with ``question=``, and the context length is recorded so
    that the memory compresses the context before the question is read."""
    context = model_context(model)
    if not query_agnostic:
        ids = tokenize_prompts(tokenizer, [s.prompt for _, s in samples], context)
        return [TrainingPrompt(task, sample, tok, answer_ids(tokenizer, sample))
                for (task, sample), tok in zip(samples, ids)]
    missing = [s.id for _, s in samples if s.question is None]
    if missing:
        raise ValueError(f"sample {missing[0]} carries no separate question, which query-agnostic training needs")
    contexts = tokenize_prompts(tokenizer, [s.context for _, s in samples], context, what="context")
    questions = tokenize_prompts(tokenizer, [s.question for _, s in samples], context, add_special_tokens=False,
                                 what="question")
    return [TrainingPrompt(task, sample, torch.cat([c, q]), answer_ids(tokenizer, sample), context_tokens=len(c))
            for (task, sample), c, q in zip(samples, contexts, questions)]


@dataclass
class Scores:
    """Scores and cache fractions of R parameter rows on n prompts, both (R, n)."""

    scores: Tensor
    cache_fraction: Tensor


class PopulationScorer:
    """Scores NAMM parameter vectors on training prompts with one model, split across workers."""

    def __init__(self, model, tokenizer, policy: MemoryPolicy, workers: Workers | None = None,
                 chunk_size: int = 128, progress: bool = True):
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.workers = workers or Workers()
        self.chunk_size = chunk_size
        self.progress = progress and self.workers.is_main
        self.full_cache: dict[str, float] = {}

    def _run(self, prompts: list[TrainingPrompt], policy: MemoryPolicy) -> list[tuple[float, float]]:
        """(task score, cache fraction) of each prompt, one batch row each (equal answer lengths)."""
        outs = generate(self.model, self.tokenizer, [p.token_ids for p in prompts], policy=policy,
                        max_new_tokens=prompts[0].sample.max_new_tokens, chunk_size=self.chunk_size)
        return [(score_sample(p.sample, out.text), out.cache_fraction) for p, out in zip(prompts, outs)]

    def members(self, params: Tensor, prompts: list[TrainingPrompt], batched: bool = True) -> Scores:
        """(P, n) scores of every population member on every prompt (same prompts for all).

        Batched: each prompt runs once with this worker's members as the rows of one batch.
        Otherwise each member runs alone (for comparison; same results). Members are split into
        contiguous blocks across workers."""
        mine = params[self.workers.block(len(params))]
        scores = torch.zeros(len(mine), len(prompts))
        fraction = torch.ones(len(mine), len(prompts))
        groups = [list(range(len(mine)))] if batched else [[m] for m in range(len(mine))]
        groups = [g for g in groups if g]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].token_ids))
        with tqdm(total=len(prompts) * len(groups), desc="population", unit="run", disable=not self.progress,
                  leave=False) as bar:
            for i in order:
                p = prompts[i]
                for rows in groups:
                    self.policy.set_population(mine[rows])
                    for r, (score, frac) in zip(rows, self._run([p] * len(rows), self.policy)):
                        scores[r, i], fraction[r, i] = score, frac
                    bar.update()
        self.policy.set_population(None)
        return Scores(self.workers.gather_blocks(scores), self.workers.gather_blocks(fraction))

    def vector(self, params: Tensor, prompts: list[TrainingPrompt], batch_size: int = 1) -> Scores:
        """(1, n) scores of one parameter vector (e.g. the CMA-ES mean) on many prompts."""
        return self._by_prompt(prompts, batch_size, params)

    def full(self, prompts: list[TrainingPrompt], batch_size: int = 1) -> Tensor:
        """(n,) full-cache scores, computed once per prompt and cached."""
        todo = [p for p in prompts if p.key not in self.full_cache]
        if todo:
            done = self._by_prompt(todo, batch_size, None)
            for p, s in zip(todo, done.scores[0].tolist()):
                self.full_cache[p.key] = s
        return torch.tensor([self.full_cache[p.key] for p in prompts])

    def _by_prompt(self, prompts: list[TrainingPrompt], batch_size: int, params: Tensor | None) -> Scores:
        """Prompts split round-robin across workers; each worker batches up to ``batch_size`` of its
        prompts with the same answer length, longest first."""
        mine = self.workers.strided(len(prompts))
        ordered = sorted(mine, key=lambda i: (prompts[i].sample.max_new_tokens, -len(prompts[i].token_ids)))
        batches: list[list[int]] = []
        for i in ordered:
            last = batches[-1] if batches else None
            if last and len(last) < batch_size and prompts[last[0]].sample.max_new_tokens == prompts[i].sample.max_new_tokens:
                last.append(i)
            else:
                batches.append([i])
        policy = make_policy("full") if params is None else self.policy
        results: dict[int, tuple[float, float]] = {}
        with tqdm(total=len(mine), desc="full cache" if params is None else "mean", unit="prompt",
                  disable=not self.progress, leave=False) as bar:
            for batch in batches:
                if params is not None:
                    self.policy.set_population(params.reshape(1, -1).expand(len(batch), -1).contiguous())
                for i, result in zip(batch, self._run([prompts[i] for i in batch], policy)):
                    results[i] = result
                bar.update(len(batch))
        if params is not None:
            self.policy.set_population(None)
        merged = self.workers.gather_strided([results[i] for i in mine], len(prompts))
        return Scores(torch.tensor([[m[0] for m in merged]]), torch.tensor([[m[1] for m in merged]]))


class AnswerScorer(PopulationScorer):
    """Scores by a teacher-forced statistic of each prompt's reference answer (``statistic``, see
    :func:`answer_statistic`) under real eviction: the prompt and the answer tokens go through the
    memory runtime, updates and all."""

    def __init__(self, *args, statistic: str = "loglik", **kwargs):
        super().__init__(*args, **kwargs)
        self.statistic = statistic

    def _run(self, prompts: list[TrainingPrompt], policy: MemoryPolicy) -> list[tuple[float, float]]:
        return teacher_forced_scores(self.model, policy, prompts, self.chunk_size, self.statistic)


@torch.inference_mode()
def teacher_forced_logits(model, policy: MemoryPolicy, prompts: list[TrainingPrompt],
                          chunk_size: int = 128) -> list[tuple[Tensor, float]]:
    """((A, vocab) logits predicting the reference answer, cache fraction at the end) of each
    prompt, one batch row each, with ``policy`` managing the cache while the prompt and the answer
    are read, as :func:`namm.generate` reads them: the prompt, then (a prompt-end policy compresses
    here) the answer. Query-agnostic prompts (all or none of them): the context is read and
    compressed, then the question and the answer are read with updates held, as
    :func:`namm.generate` does with ``question=``."""
    agnostic = {p.context_tokens is not None for p in prompts}
    if len(agnostic) != 1:
        raise ValueError("prompts of one batch must all be query-agnostic or all query-aware")
    query_agnostic = agnostic == {True}
    rows = [torch.cat([p.token_ids, p.answer_ids[:-1]]) for p in prompts]
    cut = [p.context_tokens if query_agnostic else len(p.token_ids) for p in prompts]
    longest = max(len(p.answer_ids) for p in prompts)
    runner = MemoryRunner(model, policy, len(rows), chunk_size=chunk_size)
    with memory_attention_enabled(model):
        heads = [r[:c] for r, c in zip(rows, cut)]
        shared = runner.shareable(heads)
        if shared:
            runner.feed_shared(heads[0][:shared])
        last = runner.feed([h[shared:] for h in heads])  # (B, vocab): query-aware, the answer's first token
        if query_agnostic:
            runner.end_context()
        else:
            runner.end_prompt()
        with runner.updates_held() if query_agnostic else nullcontext():
            rest = runner.feed([r[c:] for r, c in zip(rows, cut)], all_logits=True, keep=longest)
        logits = [torch.cat([last[b, None].float(), rest[b]]) for b in range(len(rows))]
    counts = runner.cache.token_counts().cpu().double()
    return [(logits[b][-len(p.answer_ids):], float(counts[:, b].mean() / runner.seen[b]))
            for b, p in enumerate(prompts)]


def teacher_forced_scores(model, policy: MemoryPolicy, prompts: list[TrainingPrompt], chunk_size: int = 128,
                          statistic: str = "loglik") -> list[tuple[float, float]]:
    """(answer statistic, cache fraction at the end) of each prompt (:func:`teacher_forced_logits`)."""
    return [(float(answer_statistic(logits, p.answer_ids, statistic)), fraction)
            for p, (logits, fraction) in zip(prompts, teacher_forced_logits(model, policy, prompts, chunk_size))]
