"""Autoregressive Decision Transformer rollouts through namm's memory runtime.

A batch of episodes runs in lockstep, one row per episode. At step ``t`` each live row is fed
the tokens ``a_{t-1}, R_t, s_t`` (just ``R_0, s_0`` at the start) and acts greedily on the action
logits of ``s_t``; the memory policy compresses the cache whenever a row's count of tokens seen
reaches a multiple of its ``n_up``, exactly as for text. Finished rows are fed nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.base import MemoryPolicy
from namm.rl.data import expert_actions, make_env
from namm.rl.model import DecisionTransformer

FEED_ORDER = [2, 0, 1]  # the tokens of step t in feeding order: a_{t-1}, R_t, s_t


@dataclass
class RolloutResult:
    """Per episode: ``returns``, ``lengths`` (steps), ``expert_agreement`` (share of actions equal to
    the expert controller's), ``kv_fraction`` (mean over the row's memory updates of the KV bytes
    held right after the update / the full cache's; NaN without an update), ``kv_fraction_end``
    (at the episode's end) and ``updates``; ``disagree`` (N, T) marks the steps whose action differs
    from the expert's; ``runner`` holds the final caches."""

    returns: np.ndarray
    lengths: np.ndarray
    expert_agreement: np.ndarray
    kv_fraction: np.ndarray
    kv_fraction_end: np.ndarray
    updates: np.ndarray
    disagree: np.ndarray
    runner: MemoryRunner


def step_tokens(model: DecisionTransformer, rtg: np.ndarray, states: np.ndarray, previous: np.ndarray) -> Tensor:
    """(B, 3, hidden) embeddings of ``a_{t-1}, R_t, s_t`` for every row."""
    emb = model.embed(torch.from_numpy(rtg).float()[:, None], torch.from_numpy(states).float()[:, None],
                      torch.from_numpy(previous)[:, None])[:, 0]
    return emb[:, FEED_ORDER]


@torch.inference_mode()
def rollout(model: DecisionTransformer, policy: MemoryPolicy, env_seeds: list[int],
            target_return: float | None = None) -> RolloutResult:
    """Run one greedy episode per environment seed with ``policy`` managing the DT's KV cache;
    ``target_return`` is the return the DT is asked for (default: the maximum, ``max_steps``)."""
    cfg = model.config
    n = len(env_seeds)
    envs = [make_env(cfg.env) for _ in env_seeds]
    states = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs, env_seeds)]).astype(np.float32)
    rtg = np.full(n, float(cfg.max_steps if target_return is None else target_return))
    previous = np.zeros(n, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    returns, lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
    disagree = np.zeros((n, cfg.max_steps), dtype=bool)
    runner = MemoryRunner(model.decoder, policy, n, record_history=True)
    hidden = cfg.hidden
    with memory_attention_enabled(model.decoder):
        for t in range(cfg.max_steps):
            tokens = step_tokens(model, rtg, states, previous)
            rows = [tokens[b, (1 if t == 0 else 0):] if alive[b] else tokens.new_zeros(0, hidden) for b in range(n)]
            actions = runner.feed(rows).argmax(-1).numpy()
            disagree[alive, t] = actions[alive] != expert_actions(states[alive])
            for b in np.flatnonzero(alive):
                state, reward, terminated, truncated, _ = envs[b].step(int(actions[b]))
                states[b], returns[b], rtg[b], lengths[b] = state, returns[b] + reward, rtg[b] - reward, t + 1
                alive[b] = not (terminated or truncated)
            previous = actions
            if not alive.any():
                break
    for env in envs:
        env.close()
    fractions = [[] for _ in range(n)]
    for record in runner.history:
        fractions[record.row].append(record.kv_bytes / max(record.kv_bytes_full, 1))
    end = runner.kv_bytes().double() / runner.kv_bytes_full().double().clamp(min=1)
    agreement = 1 - disagree.sum(1) / np.maximum(lengths, 1)
    return RolloutResult(
        returns=returns, lengths=lengths, expert_agreement=agreement,
        kv_fraction=np.array([np.mean(f) if f else np.nan for f in fractions]), kv_fraction_end=end.numpy(),
        updates=np.array([len(f) for f in fractions]), disagree=disagree, runner=runner,
    )
