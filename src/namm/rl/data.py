"""Offline trajectories for the Decision Transformer, generated here with gymnasium's CartPole-v1.

The behaviour policy is a linear expert controller (it balances for the full 500 steps) whose
action is flipped with probability ``epsilon``; every episode draws its own ``epsilon`` from
``[0, max_epsilon]``, so the data mixes expert, mediocre and poor episodes (returns from about
10 to 500). Everything is deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENV_ID = "CartPole-v1"
MAX_STEPS = 500  # CartPole-v1 truncates episodes at 500 steps (the maximum return)
EXPERT_GAINS = np.array([0.05, 0.2, 1.0, 0.5])  # weights of (x, x_dot, theta, theta_dot)


def make_env(env_id: str = ENV_ID):
    """A gymnasium environment, or a one-line error naming the extra that installs gymnasium."""
    try:
        import gymnasium
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the RL benchmark needs gymnasium: pip install 'namm[rl]'") from None
    return gymnasium.make(env_id)


def expert_actions(states: np.ndarray) -> np.ndarray:
    """The expert controller's actions (push right when the pole falls right) for (..., 4) states."""
    return (states @ EXPERT_GAINS > 0).astype(np.int64)


@dataclass
class Trajectory:
    """One episode: ``states`` (T, 4), ``actions`` (T,), ``rewards`` (T,), the behaviour policy's
    ``epsilon`` and which actions were flipped away from the expert's (``flipped``, (T,) bool)."""

    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    epsilon: float
    flipped: np.ndarray

    @property
    def ret(self) -> float:
        return float(self.rewards.sum())

    def returns_to_go(self) -> np.ndarray:
        """(T,) the reward still to come at every step (the first is the episode's return)."""
        return np.cumsum(self.rewards[::-1])[::-1].copy()


def run_behaviour(epsilon: float, env_seed: int, rng: np.random.Generator, env_id: str = ENV_ID) -> Trajectory:
    """One episode of the expert whose action is flipped with probability ``epsilon``."""
    env = make_env(env_id)
    state, _ = env.reset(seed=env_seed)
    states, actions, rewards, flipped = [], [], [], []
    done = False
    while not done:
        flip = bool(rng.random() < epsilon)
        action = int(expert_actions(state)) ^ flip
        states.append(state)
        actions.append(action)
        flipped.append(flip)
        state, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        done = terminated or truncated
    env.close()
    return Trajectory(np.asarray(states, dtype=np.float32), np.asarray(actions, dtype=np.int64),
                      np.asarray(rewards, dtype=np.float32), float(epsilon), np.asarray(flipped))


def generate_trajectories(n: int, seed: int = 0, max_epsilon: float = 0.4,
                          epsilon: float | None = None) -> list[Trajectory]:
    """``n`` behaviour episodes, each with ``epsilon`` drawn uniformly from ``[0, max_epsilon]``
    (or the fixed ``epsilon``); deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        eps = float(rng.uniform(0.0, max_epsilon)) if epsilon is None else float(epsilon)
        out.append(run_behaviour(eps, int(rng.integers(2**31 - 1)), rng))
    return out
