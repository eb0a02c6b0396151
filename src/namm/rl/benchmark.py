"""The RL benchmark: DT rollouts with the full cache, a NAMM zero-shot and baselines at its memory.

For every seed, ``episodes`` CartPole episodes (environment seeds ``SEED_STRIDE * (seed + 1) + i``,
apart from the training data's) run greedily with each policy. The NAMM runs first; its mean KV
fraction right after its memory updates (KV bytes held / full cache's, over all its updates)
becomes the budget of recency and H2O, so they hold the same memory after every compression.
Optional extra budgets run recency, H2O and the same NAMM in budget mode (its scores only rank
tokens) at smaller memories, to show where this task starts to need its context.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from namm.eval.intervals import bootstrap_interval, format_difference, paired_difference
from namm.policies.registry import make_policy
from namm.rl.data import generate_trajectories
from namm.rl.model import DecisionTransformer
from namm.rl.retention import kept_shares, plot_retention, profile, teacher_forced
from namm.rl.rollout import RolloutResult, rollout

SEED_STRIDE = 10_000
RETURN_RESAMPLES = 10_000  # bootstrap draws for a row's mean-return interval


def env_seeds(seed: int, episodes: int) -> list[int]:
    return [SEED_STRIDE * (seed + 1) + i for i in range(episodes)]


def summarize(name: str, budget: float | None, results: list[RolloutResult], seconds: float,
              max_return: float) -> dict:
    """One table row from the rollouts of every seed (``at_max_share``: episodes reaching ``max_return``)."""
    returns = np.concatenate([r.returns for r in results])
    fractions = np.concatenate([r.kv_fraction for r in results])
    lo, hi = bootstrap_interval([returns], resamples=RETURN_RESAMPLES)
    return {
        "policy": name, "budget": budget, "episodes": int(len(returns)), "return_mean": float(returns.mean()),
        "return_lo": lo, "return_hi": hi, "at_max_share": float((returns >= max_return).mean()),
        "seed_means": [float(r.returns.mean()) for r in results], "returns": returns.tolist(),
        "kv_fraction_after_update": float(np.nanmean(fractions)) if np.isfinite(fractions).any() else 1.0,
        "kv_fraction_end": float(np.concatenate([r.kv_fraction_end for r in results]).mean()),
        "updates_per_episode": float(np.concatenate([r.updates for r in results]).mean()),
        "expert_agreement": float(np.concatenate([r.expert_agreement for r in results]).mean()),
        "wall_s": round(seconds, 1),
    }


def run_policy(model: DecisionTransformer, make, seeds: list[int], episodes: int) -> tuple[list[RolloutResult], float]:
    start = time.perf_counter()
    return [rollout(model, make(), env_seeds(s, episodes)) for s in seeds], time.perf_counter() - start


def namm_policy(checkpoint: str, n_up: int | None, budget: float | None = None):
    """The NAMM of a rollout, on the progressive schedule whatever its checkpoint records: an
    episode has no prompt end to compress at."""
    return make_policy("namm", checkpoint=checkpoint, n_up=n_up, budget=budget, schedule="progressive")


def run_benchmark(model: DecisionTransformer, seeds: list[int], episodes: int, checkpoint: str,
                  n_up: int | None = None, extra_budgets: tuple[float, ...] = (), retention_episodes: int = 16,
                  log=print) -> dict:
    """Every policy on every seed, plus the NAMM's retention views; returns the JSON-able record."""
    namm_name = f"namm ({checkpoint})"

    def run(name: str, budget: float | None, make) -> list[RolloutResult]:
        results, seconds = run_policy(model, make, seeds, episodes)
        rows.append(summarize(name, budget, results, seconds, model.config.max_steps))
        log(format_row(rows[-1]))
        return results

    rows: list[dict] = []
    run("full", None, lambda: make_policy("full"))
    namm_runs = run(namm_name, None, lambda: namm_policy(checkpoint, n_up))
    matched = round(rows[-1]["kv_fraction_after_update"], 3)
    n_up_used = namm_runs[0].runner.policy.n_up
    source = namm_runs[0].runner.policy.loaded_checkpoint.provenance.get("model", "another model")
    extras = [(name, b) for b in extra_budgets for name in ("recency", "h2o", f"{namm_name} budget mode")]
    for name, budget in [("recency", matched), ("h2o", matched), *extras]:
        if name == namm_name + " budget mode":
            run(name, budget, lambda: namm_policy(checkpoint, n_up_used, budget))
        else:
            run(name, budget, lambda: make_policy(name, budget=budget, n_up=n_up_used))
    retention = retention_views(model, checkpoint, n_up, namm_runs[0], retention_episodes)
    return {"env": model.config.env, "observed": model.config.observed, "checkpoint": checkpoint,
            "checkpoint_source": source, "n_up": n_up_used,
            "seeds": seeds, "episodes_per_seed": episodes, "matched_budget": matched,
            "target_return": model.config.max_steps, "dt": model.config.provenance, "rows": rows,
            "retention": retention}


def retention_views(model: DecisionTransformer, checkpoint: str, n_up: int | None, namm_run: RolloutResult,
                    episodes: int) -> dict:
    """Retention profiles of the NAMM on (a) held-out behaviour episodes fed as in training
    (expert controller with 10% of its actions flipped; label: the flipped steps) and (b) its own
    rollouts of the first seed (label: steps where the DT's action differs from the expert's)."""
    steps = model.config.max_steps
    behaviour = generate_trajectories(episodes, seed=999, epsilon=0.1)
    runner = teacher_forced(model, namm_policy(checkpoint, n_up), behaviour)
    flipped = np.zeros((episodes, steps), dtype=bool)
    for i, tr in enumerate(behaviour):
        flipped[i, :len(tr.flipped)] = tr.flipped
    forced = profile(*kept_shares(runner, steps), flipped)
    forced.update(label="flipped actions", episodes=episodes,
                  returns=[tr.ret for tr in behaviour])
    own = profile(*kept_shares(namm_run.runner, steps), namm_run.disagree)
    own.update(label="non-expert actions", episodes=len(namm_run.returns))
    return {"behaviour episodes (10% flipped actions)": forced, "NAMM's own rollouts (seed 0)": own}


def paired_rows(rows: list[dict]) -> list[dict]:
    """Every NAMM row against the full cache and each baseline row at its budget (the
    threshold-mode NAMM against the baselines at its matched memory): the mean per-episode return
    difference with its bootstrap 95% interval. Every policy plays the same environment seeds, so
    episodes pair."""
    out = []
    full = [r for r in rows if r["policy"] == "full"]
    baselines = [r for r in rows if r["policy"] in ("recency", "h2o")]
    matched = next((b["budget"] for b in baselines), None)
    for row in rows:
        if not row["policy"].startswith("namm"):
            continue
        budget = matched if row["budget"] is None else row["budget"]
        for base in full + [b for b in baselines if b["budget"] == budget]:
            diff, (lo, hi) = paired_difference(row["returns"], base["returns"])
            out.append({"policy": row["policy"], "baseline": base["policy"], "budget": budget,
                        "difference": diff, "lo": lo, "hi": hi})
    return out


def format_row(row: dict) -> str:
    budget = "" if row["budget"] is None else f" @ {row['budget']:.3f}"
    return (f"{row['policy']}{budget}: return {row['return_mean']:.1f} [{row['return_lo']:.1f}, {row['return_hi']:.1f}]"
            f" | KV after update {row['kv_fraction_after_update']:.3f} | KV at end {row['kv_fraction_end']:.3f}"
            f" | {row['wall_s']:.0f} s")


def write_report(record: dict, out: Path, command: str) -> list[Path]:
    """``rl.md`` (tables), ``rl.json`` (everything) and ``rl_retention.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    png = out / "rl_retention.png"
    plot_retention(record["retention"], png,
                   f"NAMM {record['checkpoint']} on the CartPole Decision Transformer (n_up {record['n_up']}): "
                   "kept share of tokens", record["n_up"])
    dt = record["dt"]
    full_at_max = record["rows"][0]["at_max_share"]
    lines = [
        f"# Decision Transformer on {record['env']}: the language-evolved NAMM zero-shot",
        "",
        f"A {dt.get('steps', '?')}-step-trained Decision Transformer (`namm.rl`, a 3-layer Llama decoder fed "
        f"return/state/action embeddings) on {dt.get('episodes', '?')} behaviour episodes of mixed quality "
        f"(mean return {dt.get('behaviour_return_mean', float('nan')):.0f}, "
        f"{100 * dt.get('behaviour_full_length_share', float('nan')):.0f}% reach 500). The DT observes only the "
        f"state components {record['observed']} of (x, x_dot, theta, theta_dot), so it must infer the rest from "
        f"its context. Greedy rollouts asking for the maximum return {record['target_return']}; "
        f"{len(record['seeds'])} seeds x {record['episodes_per_seed']} episodes per policy; a full episode is "
        f"1,499 tokens, and the memory updates every {record['n_up']} tokens. NAMM = checkpoint "
        f"`{record['checkpoint']}` (evolved on {record['checkpoint_source']}'s text, never on "
        "this task), threshold mode; recency and H2O "
        f"run at its measured memory ({record['matched_budget']:.3f} of the full KV cache after each update). "
        f"The full cache reaches the maximum return in {100 * full_at_max:.0f}% of its episodes: where that is "
        "near 100%, this table can show what a policy loses, not what it gains.",
        "",
        f"Reproduce: `{command}`",
        "",
        "| policy | budget | mean return [95% CI] | per-seed means | episodes at max | KV fraction after update | "
        "KV fraction at end | updates / episode | actions = expert's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        budget = "—" if r["budget"] is None else f"{r['budget']:.3f}"
        lines.append(
            f"| {r['policy']} | {budget} | {r['return_mean']:.1f} [{r['return_lo']:.1f}, {r['return_hi']:.1f}] | "
            f"{', '.join(f'{m:.1f}' for m in r['seed_means'])} | {100 * r['at_max_share']:.0f}% | "
            f"{r['kv_fraction_after_update']:.3f} | "
            f"{r['kv_fraction_end']:.3f} | {r['updates_per_episode']:.2f} | {100 * r['expert_agreement']:.1f}% |")
    lines += [
        "",
        "Return: mean over all episodes with its 95% percentile-bootstrap interval. KV fraction after update: KV "
        "bytes held right after each memory update over the full cache's then, averaged over updates (1.0 for the "
        "full cache); at end: when the episode stops. Actions = expert's: share of the DT's actions that equal the "
        "scripted expert controller's.",
        "",
        "## The NAMM against the full cache and each baseline at the same memory",
        "",
        "| NAMM | baseline | budget | return difference, paired [95% CI] |",
        "|---|---|---|---|",
    ]
    paired = paired_rows(record["rows"])
    for d in paired:
        lines.append(f"| {d['policy']} | {d['baseline']} | {d['budget']:.3f} | "
                     f"{format_difference(d['difference'], (d['lo'], d['hi']))} |")
    lines += [
        "",
        "Paired: every policy plays the same environment seeds, so the difference is taken episode by episode "
        "(NAMM − baseline) and bootstrapped over episodes; an interval that excludes 0 is a difference this "
        "many episodes can show.",
        "",
        "## What the NAMM keeps",
        "",
        "![retention](rl_retention.png)",
        "",
        "| view | layer | kept share: return-to-go / state / action | kept share of labelled steps vs others |",
        "|---|---|---|---|",
    ]
    for name, view in record["retention"].items():
        for l, by_type in enumerate(view["by_type"]):
            lines.append(f"| {name} | {l} | {' / '.join(f'{v:.3f}' for v in by_type)} | "
                         f"{view['labelled_step_share'][l]:.3f} ({view['label']}, {view['labelled_steps']}) vs "
                         f"{view['other_step_share'][l]:.3f} ({view['other_steps']}) |")
    lines += [
        "",
        "Kept share: the share of a layer's KV heads holding a token at the end of the episode, over the tokens "
        "that were scored by at least one memory update. Behaviour episodes are fed as in training (their own "
        "returns-to-go, states and actions); their labelled steps are those whose action the behaviour policy "
        "flipped away from the expert's (suboptimal actions).",
        "",
    ]
    md, js = out / "rl.md", out / "rl.json"
    md.write_text("\n".join(lines), encoding="utf-8")
    js.write_text(json.dumps({**record, "paired": paired, "command": command}, indent=2) + "\n",
                  encoding="utf-8")
    return [md, js, png]
