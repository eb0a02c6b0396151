"""Does a NAMM beat the baselines at equal memory? The evolution issue's acceptance table.

    python benchmarks/namm_acceptance.py --checkpoint runs/smollm2-135m-budget/best \\
        [--threshold-checkpoint C] [--tasks niah_single,passkey,multidoc_qa] [--lengths 2048,4096] \\
        [--samples 32] [--seed 100] [--budgets 0.25,0.5] [--out docs/results/namm-acceptance]

Every baseline is query-agnostic (the context is compressed before the question is seen). The
NAMM runs on its checkpoint's schedule and protocol (query-aware when it was evolved so: compressed
after the question, whose queries its features read), or on ``--namm-protocol``. For every length
it runs ``namm compare`` (resumable: rerun the same command to continue):

* budget mode: full and the NAMM at each budget, and every baseline at the same budgets on both
  query-agnostic schedules (progressive, and prompt-end: compressed once after the context);
* threshold mode (with ``--threshold-checkpoint``): the NAMM on its threshold, then every baseline at
  the NAMM's measured mean KV fraction per task, on both schedules.

``--baselines-from DIR`` reuses the baseline runs of an earlier acceptance folder (same layout) instead
of running them: for a NAMM that changed only its selection, whose measured fraction is at most the
one those baselines were run at; each row then says whether every baseline holds at least the NAMM's
KV bytes. ``--budgets ''`` skips budget mode.

Each baseline is then taken on whichever schedule scores best for it on that task, length and
budget, and ``OUT/README.md`` / ``OUT/summary.json`` say, row by row, whether the NAMM is above every
baseline and (threshold mode) whether it keeps >= 95% of the full cache's score at <= 0.5 of its
KV bytes. Scores carry bootstrap 95% intervals over samples (from ``namm compare``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from namm.commands.compare import matched_budget
from namm.eval.intervals import format_difference, paired_difference
from namm.policies.namm.checkpoint import load_namm_checkpoint
from namm.policies.registry import make_policy

BASELINES = "recency,streaming,h2o,l2,tova,random"
KV_TOLERANCE = 5e-4  # a matched budget is written with four decimals
SCHEDULES = ("progressive", "prompt-end")


def compare(out: Path, length: int, args: argparse.Namespace, policies: str, tasks: str, schedule: str,
            budget_args: list[str], checkpoint: str, query_agnostic: bool = True) -> dict:
    """Run (or resume) one ``namm compare`` and return its results.json."""
    command = [sys.executable, "-m", "namm", "compare", "--model", args.model, "--policies", policies,
               "--tasks", tasks, "--length", str(length), "--samples", str(args.samples),
               "--seed", str(args.seed), "--checkpoint", checkpoint, "--schedule", schedule,
               *(["--question-after-compression"] if query_agnostic else []), "--batch-size", str(args.batch_size),
               "--quiet", "--out", str(out), *budget_args, *(["--threads", str(args.threads)] if args.threads else [])]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def namm_protocol(args: argparse.Namespace) -> str:
    """The NAMM's protocol: ``--namm-protocol``, else the one its checkpoint was evolved on."""
    if args.namm_protocol:
        return args.namm_protocol
    return load_namm_checkpoint(args.checkpoint).provenance.get("protocol", "query-agnostic")


def baseline_runs(args: argparse.Namespace, length: int, name: str, tasks: str, schedule: str,
                  budget_args: list[str]) -> list[dict]:
    """Rows of one baseline run: run (or resume) it in OUT, or with ``--baselines-from`` read it from
    that folder (no rows when it holds no such run)."""
    if args.baselines_from:
        results = Path(args.baselines_from) / f"L{length}" / name / "results.json"
        if not results.exists():
            print(f"no baseline run {results}; its rows are left out", flush=True)
            return []
        return json.loads(results.read_text())["rows"]
    return compare(Path(args.out) / f"L{length}" / name, length, args, args.baselines, tasks, schedule, budget_args,
                   args.checkpoint)["rows"]


def runs_of(args: argparse.Namespace, length: int) -> list[tuple[str, list[dict]]]:
    """(mode, rows) of every compare run for one length."""
    root = Path(args.out) / f"L{length}"
    own = make_policy("namm", checkpoint=args.checkpoint).schedule  # the NAMM runs on its checkpoint's schedule
    protocol = namm_protocol(args)
    agnostic = protocol == "query-agnostic"
    done = []
    if args.budgets:
        done.append(("budget", compare(root / f"budget-namm-{own}-{protocol}", length, args, "full,namm", args.tasks,
                                       own, ["--budgets", args.budgets], args.checkpoint, agnostic)["rows"]))
        for schedule in SCHEDULES:
            done.append(("budget", baseline_runs(args, length, f"budget-{schedule}", args.tasks, schedule,
                                                 ["--budgets", args.budgets])))
    if args.threshold_checkpoint:
        threshold_own = make_policy("namm", checkpoint=args.threshold_checkpoint).schedule
        rows = compare(root / f"threshold-namm-{threshold_own}-{protocol}", length, args, "namm", args.tasks,
                       threshold_own, ["--match-cache", "namm"], args.threshold_checkpoint, agnostic)["rows"]
        done.append(("threshold", rows))
        for r in [r for r in rows if r["policy"] == "namm"]:  # the baselines at the NAMM's measured fraction
            for schedule in SCHEDULES:
                again = baseline_runs(args, length, f"threshold-{schedule}-{r['task']}", r["task"], schedule,
                                      ["--budgets", matched_budget(r["kv_fraction"])])
                done.append(("threshold", again))
    return done


def budget_key(row: dict, mode: str) -> str:
    return "matched" if mode == "threshold" else str(row["budget"])


def verdicts(runs: list[tuple[str, dict]], length: int, baselines: list[str]) -> list[dict]:
    """One line per (mode, task, budget): the NAMM, the full cache and each baseline on its best schedule."""
    full = {r["task"]: r for _, rows in runs for r in rows if r["policy"] == "full"}
    groups: dict[tuple[str, str, str], dict] = {}
    for mode, rows in runs:
        for r in rows:
            if r["policy"] == "full":
                continue
            g = groups.setdefault((mode, r["task"], budget_key(r, mode)), {"baselines": {}})
            if r["policy"] == "namm":
                g["namm"] = r
            else:
                best = g["baselines"].get(r["policy"])
                if best is None or r["score"] > best["score"]:
                    g["baselines"][r["policy"]] = r
    lines = []
    for (mode, task, budget), g in sorted(groups.items()):
        namm = g.get("namm")
        if namm is None:
            continue
        ref = full.get(task, {"score": namm.get("reference_score")})  # compare's cached full-cache score
        if ref["score"] is None:
            continue
        beaten = [b for b in baselines if b in g["baselines"] and namm["score"] > g["baselines"][b]["score"]]
        minus = {b: paired_difference(namm["sample_scores"], r["sample_scores"]) for b, r in g["baselines"].items()}
        line = {"mode": mode, "task": task, "length": length, "budget": budget, "n": namm["n"],
                "full": ref["score"], "namm": namm["score"], "namm_ci": namm["score_ci"],
                "namm_kv_fraction": namm["kv_fraction"],
                "normalised": 100.0 * namm["score"] / ref["score"] if ref["score"] > 0 else None,
                "baselines": {b: {"score": r["score"], "ci": r["score_ci"], "schedule": r["schedule"],
                                  "kv_fraction": r["kv_fraction"], "namm_minus": minus[b][0],
                                  "namm_minus_ci": list(minus[b][1])} for b, r in sorted(g["baselines"].items())},
                "above_every_baseline": len(beaten) == len(baselines),
                "baselines_hold_at_least_namm_kv": all(r["kv_fraction"] >= namm["kv_fraction"] - KV_TOLERANCE
                                                       for r in g["baselines"].values()),
                "significantly_above_every_baseline": all(b in minus and minus[b][1][0] > 0 for b in baselines)}
        if mode == "threshold":
            line["keeps_95_at_half"] = (line["normalised"] or 0) >= 95.0 and namm["kv_fraction"] <= 0.5
        lines.append(line)
    return lines


def ci(score: float, interval) -> str:
    return f"{score:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]"


def markdown(lines: list[dict], baselines: list[str], args: argparse.Namespace) -> str:
    head = ["mode", "task", "length", "budget", "n", "full", "NAMM [95% CI]", "NAMM KV", *baselines, "NAMM above all"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ln in lines:
        cells = [ln["mode"], ln["task"], str(ln["length"]), ln["budget"], str(ln["n"]), f"{ln['full']:.1f}",
                 ci(ln["namm"], ln["namm_ci"]), f"{ln['namm_kv_fraction']:.3f}"]
        for b in baselines:
            r = ln["baselines"].get(b)
            cells.append(f"{ci(r['score'], r['ci'])} ({r['schedule']})" if r else "–")
        verdict = "yes" if ln["above_every_baseline"] else "no"
        if ln["mode"] == "threshold":
            verdict += "; ≥95% of full at ≤0.5 KV: " + ("yes" if ln["keeps_95_at_half"] else "no")
        if not ln["baselines_hold_at_least_namm_kv"]:
            verdict += "; a baseline holds less KV than the NAMM"
        out.append("| " + " | ".join(cells + [verdict]) + " |")
    paired_head = ["mode", "task", "length", "budget", *(f"− {b}" for b in baselines), "interval above 0 for all"]
    paired = ["| " + " | ".join(paired_head) + " |", "|" + "---|" * len(paired_head)]
    for ln in lines:
        cells = [ln["mode"], ln["task"], str(ln["length"]), ln["budget"]]
        for b in baselines:
            r = ln["baselines"].get(b)
            cells.append(format_difference(r["namm_minus"], r["namm_minus_ci"]) if r else "–")
        paired.append("| " + " | ".join(cells + ["yes" if ln["significantly_above_every_baseline"] else "no"]) + " |")
    return "\n".join([
        "# NAMM vs the baselines at equal memory (baselines query-agnostic)",
        "",
        f"NAMM checkpoint: `{args.checkpoint}`"
        + (f"; threshold mode: `{args.threshold_checkpoint}`" if args.threshold_checkpoint else "")
        + f"; the NAMM runs {namm_protocol(args)}.",
        f"Tasks {args.tasks}, seed {args.seed}, {args.samples} samples per task and length; model {args.model}. "
        "Each baseline cell is its score on whichever query-agnostic schedule (progressive, or prompt-end: "
        "compressed once after the context) scored best for it on that row; score 0-100 with a bootstrap 95% "
        "interval over samples. Budget mode: every policy at the row's budget (a memory budget in KV bytes). "
        "Threshold mode: baselines at the NAMM's measured mean KV fraction on the task. The runs behind each "
        "row are in `L<length>/<mode>-<schedule>/` (results.md there has KV bytes, peaks and tokens/s).",
        *([f"The baseline runs are read from `{args.baselines_from}` (run for an earlier NAMM; a row whose "
           "baselines hold less KV than this NAMM says so).", ""] if args.baselines_from else [""]),
        f"Reproduce: `python benchmarks/namm_acceptance.py {shlex.join(sys.argv[1:])}`",
        "",
        *out,
        "",
        "NAMM minus each baseline on the same prompts (points of score; paired bootstrap 95% interval; each "
        "baseline on the schedule of the table above):",
        "",
        *paired,
        "",
    ])


def report_paths(out: Path, name: str | None) -> tuple[Path, Path]:
    """Where the table and its data go: README.md and summary.json, or NAME.md and NAME.json."""
    if name is None:
        return out / "README.md", out / "summary.json"
    if not name or "/" in name or name in ("README", "summary"):
        raise SystemExit(f"namm_acceptance.py: error: --report {name!r} must be a plain file name other than "
                         "README or summary")
    return out / f"{name}.md", out / f"{name}.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="budget-mode NAMM checkpoint (a run's best/ or a shipped name)")
    p.add_argument("--threshold-checkpoint", help="threshold-mode checkpoint (from `namm finalize`); omit to skip")
    p.add_argument("--namm-protocol", choices=("query-agnostic", "query-aware"), default=None,
                   help="the NAMM's protocol (default: the one its checkpoint was evolved on; baselines are always "
                        "query-agnostic)")
    p.add_argument("--model", default="smollm2-135m", help="registry name of the model (default smollm2-135m)")
    p.add_argument("--tasks", default="niah_single,passkey,multidoc_qa",
                   help="comma-separated evaluation tasks, none used in training (default niah_single,passkey,"
                        "multidoc_qa)")
    p.add_argument("--lengths", default="2048,4096",
                   help="comma-separated prompt lengths in tokens (default 2048,4096)")
    p.add_argument("--budgets", default="0.25,0.5", help="budget-mode rows: comma-separated KV fractions "
                                                         "(default 0.25,0.5; '' for none)")
    p.add_argument("--baselines", default=BASELINES, help=f"comma-separated baseline policies (default {BASELINES})")
    p.add_argument("--baselines-from", default=None, metavar="DIR",
                   help="read the baseline runs from an earlier acceptance folder instead of running them (for a "
                        "NAMM whose measured fraction is at most the one they ran at)")
    p.add_argument("--samples", type=int, default=32, help="prompts per task and length (default 32)")
    p.add_argument("--seed", type=int, default=100, help="seed of the evaluation prompts; keep it apart from "
                                                         "training and validation seeds (default 100)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per forward in namm compare (default 4)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--out", default="docs/results/namm-acceptance",
                   help="folder of the runs, README.md and summary.json (default docs/results/namm-acceptance)")
    p.add_argument("--report", default=None, metavar="NAME",
                   help="write the table to OUT/NAME.md and its data to OUT/NAME.json instead of README.md and "
                        "summary.json (e.g. a budget-mode table beside a threshold-mode one)")
    args = p.parse_args()
    baselines = [b for b in args.baselines.split(",") if b]
    table, data = report_paths(Path(args.out), args.report)  # a bad name fails before any run
    lines = []
    for length in [int(x) for x in args.lengths.split(",")]:
        lines += verdicts(runs_of(args, length), length, baselines)
    data.write_text(json.dumps(lines, indent=1) + "\n")
    text = markdown(lines, baselines, args)
    table.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
