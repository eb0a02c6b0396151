"""Which timesteps a memory policy keeps in a Decision Transformer's cache.

After a run, every layer's cache holds some of the tokens ``R_t, s_t, a_t``. A token's kept share
is the fraction of the layer's KV heads still holding it; only tokens fed before the row's last
memory update count (later ones were never scored). Steps can be labelled (e.g. the behaviour
policy's flipped, suboptimal actions) to compare the kept share of labelled and other steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.policies.base import MemoryPolicy
from namm.rl.data import Trajectory
from namm.rl.model import TOKENS_PER_STEP, DecisionTransformer

TOKEN_TYPES = ("return-to-go", "state", "action")


def kept_shares(runner: MemoryRunner, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(layers, B, steps, 3) share of each layer's KV heads holding each token, and the (B, steps, 3)
    mask of tokens that were scored (fed before the row's last memory update)."""
    width = steps * TOKENS_PER_STEP
    shares = []
    for layer in runner.cache.layers:
        positions = layer.positions.cpu()  # (B, H, K)
        held = torch.zeros(positions.shape[0], positions.shape[1], width + 1)
        held.scatter_(2, torch.where(positions >= 0, positions, width), 1.0)  # empty slots -> spare column
        shares.append(held[..., :width].mean(1).view(-1, steps, TOKENS_PER_STEP))
    scored = torch.arange(width)[None] < runner.previous_update[:, None]
    return torch.stack(shares).numpy(), scored.view(-1, steps, TOKENS_PER_STEP).numpy()


def profile(shares: np.ndarray, scored: np.ndarray, labels: np.ndarray, bin_steps: int = 20) -> dict:
    """Summaries of :func:`kept_shares`: per layer the mean kept share of each token type per bin
    of ``bin_steps`` timesteps (NaN where nothing was scored), the kept share of the tokens of
    labelled (``labels`` (B, steps) true) and other steps, and the overall share per type."""
    layers, _, steps, _ = shares.shape
    bins = -(-steps // bin_steps)
    pad = bins * bin_steps - steps
    s = np.pad(shares, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(layers, -1, bins, bin_steps, len(TOKEN_TYPES))
    m = np.pad(scored, ((0, 0), (0, pad), (0, 0))).reshape(-1, bins, bin_steps, len(TOKEN_TYPES))
    count = m.sum((0, 2))  # (bins, 3)
    over_time = np.where(count > 0, (s * m).sum((1, 3)) / np.maximum(count, 1), np.nan)  # (layers, bins, 3)
    step_scored = scored.all(-1)
    labelled, other = step_scored & labels, step_scored & ~labels

    def share(mask: np.ndarray, kind: slice | int) -> list[float]:
        if not mask.any():
            return [float("nan")] * layers
        return [float(shares[l][mask][..., kind].mean()) for l in range(layers)]

    return {
        "bin_steps": bin_steps, "over_time": over_time.tolist(),
        "by_type": [[float((shares[l] * scored)[..., k].sum() / max(scored[..., k].sum(), 1)) for k in range(3)]
                    for l in range(layers)],
        "labelled_steps": int(labelled.sum()), "other_steps": int(other.sum()),
        "labelled_step_share": share(labelled, slice(None)), "other_step_share": share(other, slice(None)),
        "labelled_action_share": share(labelled, 2), "other_action_share": share(other, 2),
    }


@torch.inference_mode()
def teacher_forced(model: DecisionTransformer, policy: MemoryPolicy, trajectories: list[Trajectory]) -> MemoryRunner:
    """Feed whole behaviour episodes (their own returns-to-go, states and actions, as in training)
    through the runtime with ``policy``, one row per episode; returns the runner."""
    rows = []
    for tr in trajectories:
        tokens = model.sequence(torch.from_numpy(tr.returns_to_go())[None], torch.from_numpy(tr.states)[None],
                                torch.from_numpy(tr.actions)[None])[0]
        rows.append(tokens[:-1])  # the last action is never fed in a rollout either
    runner = MemoryRunner(model.decoder, policy, len(rows))
    with memory_attention_enabled(model.decoder):
        runner.feed(rows)
    return runner


def plot_retention(views: dict[str, dict], path: str | Path, title: str, n_up: int) -> None:
    """One row of panels per view: the kept share of each token type over episode time in every
    layer (dotted lines: the memory updates, every ``n_up`` tokens), then the kept share of
    labelled versus other steps per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(views)
    layers = len(views[names[0]]["over_time"])
    fig, axes = plt.subplots(len(names), layers + 1, figsize=(3.2 * (layers + 1), 2.9 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        view = views[name]
        over_time = np.asarray(view["over_time"], dtype=float)
        t = (np.arange(over_time.shape[1]) + 0.5) * view["bin_steps"]
        for l in range(layers):
            ax = axes[row, l]
            for k, kind in enumerate(TOKEN_TYPES):
                ax.plot(t, over_time[l, :, k], label=kind)
            for step in np.arange(n_up, TOKENS_PER_STEP * t[-1], n_up) / TOKENS_PER_STEP:
                ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{name}\nlayer {l}", fontsize=8)
            ax.set_xlabel("timestep", fontsize=8)
            if l == 0:
                ax.set_ylabel("kept share", fontsize=8)
                ax.legend(fontsize=7)
        ax = axes[row, layers]
        x = np.arange(layers)
        ax.bar(x - 0.2, view["labelled_step_share"], 0.4, label=f"{view['label']} ({view['labelled_steps']})")
        ax.bar(x + 0.2, view["other_step_share"], 0.4, label=f"other steps ({view['other_steps']})")
        ax.set_xticks(x, [f"L{l}" for l in range(layers)])
        ax.set_ylim(0, 1.05)
        ax.set_title("kept share of a step's tokens", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
