"""Score versus cache fraction: one panel per task (plus the mean), one curve per policy."""

from __future__ import annotations

from pathlib import Path

# policies without a budget are drawn as single points (full cache, NAMM at its emergent size)
POINT_MARKERS = {"full": "*", "namm": "D"}
# coincident curves stay visible through distinct markers and dash patterns
LINE_MARKERS = ["o", "s", "^", "v", "P", "X", "<", ">"]
LINE_STYLES = ["-", "--", "-.", ":"]


def plot_score_vs_cache(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Save a PNG of score (y) against mean cache fraction (x). Budgeted policies are lines
    through their budgets; policies without a budget (full, NAMM) are points. ``rows`` are
    comparison rows (task, policy, budget, score, cache_fraction); task 'mean' gets a panel too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cols = min(len(tasks), 4)
    nrows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(policies)}
    styles = {p: (LINE_MARKERS[i % len(LINE_MARKERS)], LINE_STYLES[i % len(LINE_STYLES)]) for i, p in enumerate(policies)}
    for ax, task in zip(axes.flat, tasks):
        for policy in policies:
            pts = sorted((r["cache_fraction"], r["score"]) for r in rows if r["task"] == task and r["policy"] == policy)
            if not pts:
                continue
            xs, ys = zip(*pts)
            budgeted = any(r.get("budget") for r in rows if r["task"] == task and r["policy"] == policy)
            if budgeted:
                marker, style = styles[policy]
                ax.plot(xs, ys, marker=marker, linestyle=style, color=colors[policy], label=policy, alpha=0.8)
            else:
                ax.scatter(xs, ys, marker=POINT_MARKERS.get(policy, "s"), s=90, color=colors[policy], label=policy,
                           zorder=3)
        ax.set_title(task)
        ax.set_xlabel("mean cache fraction")
        ax.set_ylabel("score (0-100)")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95 if title else 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
