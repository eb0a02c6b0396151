"""Training the Decision Transformer on the behaviour episodes (offline, action cross-entropy).

Every training sequence is a whole episode from its first step, so the model learns the long
contexts (up to 500 steps = 1,500 tokens) it meets in evaluation. Deterministic given the seed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from namm.rl.data import MAX_STEPS, Trajectory, generate_trajectories
from namm.rl.model import DecisionTransformer, DTConfig


@dataclass
class Episodes:
    """Behaviour episodes padded to one length: returns-to-go and actions (N, T), states
    (N, T, state_dim), ``mask`` (N, T) of real steps and ``lengths`` (N,)."""

    returns_to_go: Tensor
    states: Tensor
    actions: Tensor
    mask: Tensor
    lengths: Tensor

    @classmethod
    def from_trajectories(cls, trajectories: list[Trajectory]) -> "Episodes":
        n, t = len(trajectories), max(len(tr.actions) for tr in trajectories)
        dim = trajectories[0].states.shape[1]
        rtg, actions = torch.zeros(n, t), torch.zeros(n, t, dtype=torch.long)
        states, mask = torch.zeros(n, t, dim), torch.zeros(n, t, dtype=torch.bool)
        for i, tr in enumerate(trajectories):
            k = len(tr.actions)
            rtg[i, :k] = torch.from_numpy(tr.returns_to_go())
            states[i, :k] = torch.from_numpy(tr.states)
            actions[i, :k] = torch.from_numpy(tr.actions)
            mask[i, :k] = True
        return cls(rtg, states, actions, mask, mask.sum(1))

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The episodes at ``index``, cropped to the longest of them."""
        t = int(self.lengths[index].max())
        return (self.returns_to_go[index, :t], self.states[index, :t], self.actions[index, :t], self.mask[index, :t])


def action_loss(model: DecisionTransformer, rtg: Tensor, states: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
    """Mean cross-entropy of the behaviour actions over the real steps."""
    logits = model(rtg, states, actions, mask)
    return F.cross_entropy(logits[mask], actions[mask])


def train_dt(episodes: int = 300, steps: int = 300, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
             hidden: int = 64, layers: int = 3, heads: int = 4, kv_heads: int = 2, max_epsilon: float = 0.4,
             observed: tuple[int, ...] = (0, 2), log=print) -> DecisionTransformer:
    """Generate ``episodes`` behaviour episodes and train a Decision Transformer on them for
    ``steps`` AdamW steps (cosine learning rate, 10% warm-up); returns it in eval mode. The DT
    observes the state components ``observed`` (default: cart position and pole angle only, so
    it must infer the velocities from its context)."""
    torch.manual_seed(seed)
    trajectories = generate_trajectories(episodes, seed=seed, max_epsilon=max_epsilon)
    data = Episodes.from_trajectories(trajectories)
    real = data.states[data.mask][:, list(observed)]
    returns = np.array([tr.ret for tr in trajectories])
    config = DTConfig(
        state_dim=data.states.shape[2], observed=list(observed), hidden=hidden, layers=layers, heads=heads,
        kv_heads=kv_heads, max_steps=MAX_STEPS,
        return_scale=float(MAX_STEPS), state_mean=real.mean(0).tolist(), state_std=real.std(0).clamp(min=1e-6).tolist(),
        provenance={
            "trainer": "namm rl train", "episodes": episodes, "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "max_epsilon": max_epsilon, "behaviour_return_mean": float(returns.mean()),
            "behaviour_return_min": float(returns.min()), "behaviour_return_max": float(returns.max()),
            "behaviour_full_length_share": float((returns >= MAX_STEPS).mean()),
        },
    )
    model = DecisionTransformer(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps))))
    gen = torch.Generator().manual_seed(seed)
    start, running = time.perf_counter(), None
    for step in range(steps):
        loss = action_loss(model, *data.batch(torch.randint(len(trajectories), (batch_size,), generator=gen)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        if log is not None and ((step + 1) % 25 == 0 or step + 1 == steps):
            log(f"step {step + 1}/{steps}: loss {running:.4f} ({time.perf_counter() - start:.0f} s)")
    config.provenance["final_loss"] = running
    config.provenance["train_seconds"] = round(time.perf_counter() - start, 1)
    return model.eval()
