"""LESS on h2o and on the NAMM: held-out perplexity at several lengths and one retrieval task.

    python benchmarks/less_table.py --h2o-less smollm2-135m-h2o --namm-less smollm2-135m-namm \\
        [--model smollm2-135m] [--checkpoint NAMM] [--lengths 2048,4096] [--samples 5] [--retrieval passkey] \\
        [--retrieval-length 2048] [--retrieval-samples 32] [--threads N] [--out docs/results/less]

Rows (one ``namm eval`` each, into ``OUT/<task>-L<length>/<row>/``; a row whose metrics.json exists
is not run again, so rerunning resumes):

* ``full`` — the full cache;
* ``h2o`` — h2o at budget 0.1, and ``h2o-less`` with the h2o kernels;
* ``h2o-0.11`` — the equal-bytes baseline: h2o at 0.11, which keeps at least LESS's state bytes
  more KV at every update (checked against the measured bytes and printed);
* ``namm`` — the model's shipped NAMM, and ``namm-less`` with the NAMM kernels;
* ``namm+extra`` — the NAMM's equal-bytes baseline: every layer keeps ``--extra-tokens`` more
  top-scored tokens than its threshold admits (5 for SmolLM2 in float32: a rank-8 state per KV
  head is 8 × 65 × 4 bytes, the bytes of 4.06 tokens).

Perplexity runs read ``--samples`` consecutive sequences of the corpus's held-out split (seed 0);
LESS kernels are trained on the train split only. The share of a policy's perplexity gap closed
by LESS is ``(NLL policy − NLL policy+LESS) / (NLL policy − NLL full)`` on the mean NLL, with a
bootstrap 95% interval over sequences. Writes ``OUT/README.md``-ready tables to ``OUT/results.md``
and every number to ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

H2O_BUDGET, EQUAL_BYTES_BUDGET = "0.1", "0.11"


def rows(args: argparse.Namespace) -> dict[str, list[str]]:
    """Row name → ``namm eval`` policy arguments."""
    namm = ["--policy", "namm", *(["--checkpoint", args.checkpoint] if args.checkpoint else [])]
    h2o = ["--policy", "h2o", *(["--n-up", str(args.n_up)] if args.n_up else []), "--budget"]
    return {
        "full": ["--policy", "full"],
        "h2o": [*h2o, H2O_BUDGET],
        "h2o-less": [*h2o, H2O_BUDGET, "--less", args.h2o_less],
        "h2o-0.11": [*h2o, EQUAL_BYTES_BUDGET],
        "namm": namm,
        "namm-less": [*namm, "--less", args.namm_less],
        "namm+extra": [*namm, "--extra-tokens", str(args.extra_tokens)],
    }


def run_row(out: Path, task: str, length: int, samples: int, seed: int, policy: list[str],
            args: argparse.Namespace) -> dict:
    """Run (unless done) one ``namm eval`` and return its metrics."""
    if not (out / "metrics.json").is_file():
        command = [sys.executable, "-m", "namm", "eval", "--model", args.model, "--task", task, "--length",
                   str(length), "--samples", str(samples), "--seed", str(seed), *policy, "--quiet", "--out", str(out),
                   *(["--threads", str(args.threads)] if args.threads else [])]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def gap_closed(full: list[float], base: list[float], less: list[float], resamples: int = 2000) -> dict:
    """Share of the mean-NLL gap between ``base`` and ``full`` that ``less`` closes, and its
    percentile bootstrap 95% interval over sequences (paired)."""
    def share(idx: list[int]) -> float:
        gap = sum(base[i] - full[i] for i in idx)
        return sum(base[i] - less[i] for i in idx) / gap if gap else float("nan")

    n, rng = len(full), random.Random(0)
    draws = sorted(share([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return {"share": share(list(range(n))), "ci": [draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]]}


def perplexity_table(length: int, found: dict[str, dict]) -> tuple[str, dict]:
    """Markdown table and summary of one length's perplexity rows."""
    nll = {name: [s["nll"] for s in m["sequences"]] for name, m in found.items()}
    summary = {"length": length, "rows": {name: {k: m[k] for k in ("nll", "perplexity", "cache_fraction",
                                                                  "less_state_bytes", "memory_fraction_peak",
                                                                  "kv_bytes_peak")} | {"per_sequence_nll": nll[name]}
                                          for name, m in found.items()}}
    lines = [f"| row | mean NLL | perplexity | cache fraction | LESS state bytes | (KV + LESS) peak / full | "
             f"share of the gap closed [95% CI] | per-sequence NLL |", "|---|---|---|---|---|---|---|---|"]
    pairs = {"h2o-less": "h2o", "h2o-0.11": "h2o", "namm-less": "namm", "namm+extra": "namm"}
    for name, m in found.items():
        cell = ""
        if name in pairs and pairs[name] in found and "full" in found:
            closed = gap_closed(nll["full"], nll[pairs[name]], nll[name])
            summary["rows"][name]["gap_closed_vs_" + pairs[name]] = closed
            cell = f"{closed['share']:.1%} [{closed['ci'][0]:.1%}, {closed['ci'][1]:.1%}] of {pairs[name]}'s"
        lines.append(f"| {name} | {m['nll']:.4f} | {m['perplexity']:.3f} | {m['cache_fraction']:.4f} | "
                     f"{m['less_state_bytes']:,} | {m['memory_fraction_peak']:.4f} | {cell} | "
                     f"{', '.join(f'{x:.4f}' for x in nll[name])} |")
    for base, less, more in (("h2o", "h2o-less", "h2o-0.11"), ("namm", "namm-less", "namm+extra")):
        if {base, less, more} <= found.keys():
            extra = found[more]["kv_bytes_peak"] - found[base]["kv_bytes_peak"]
            summary[f"{more}_extra_kv_bytes_peak"] = extra
            lines.append(f"\n{more} holds {extra:,} more KV bytes at its peak than {base} (the LESS state of "
                         f"{less}: {found[less]['less_state_bytes']:,} bytes).")
    return "\n".join(lines), summary


def retrieval_table(task: str, length: int, found: dict[str, dict]) -> tuple[str, dict]:
    """Markdown table and summary of the retrieval rows."""
    lines = ["| row | n | score [95% CI] | KV fraction | LESS state bytes |", "|---|---|---|---|---|"]
    summary = {"task": task, "length": length, "rows": {}}
    for name, m in found.items():
        low, high = m["score_ci"]
        summary["rows"][name] = {k: m.get(k) for k in ("score", "score_ci", "n", "cache_fraction", "less_state_bytes")}
        lines.append(f"| {name} | {m['n']} | {m['score']:.1f} [{low:.1f}, {high:.1f}] | "
                     f"{m.get('cache_fraction', float('nan')):.3f} | {m.get('less_state_bytes', 0):,} |")
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model every namm eval runs (default %(default)s)")
    p.add_argument("--checkpoint", default=None, help="NAMM checkpoint (default: the model's shipped one)")
    p.add_argument("--n-up", type=int, default=None, help="h2o's tokens between updates (default 512, as trained)")
    p.add_argument("--h2o-less", required=True, help="LESS kernels trained on h2o@0.1 (name or path)")
    p.add_argument("--namm-less", required=True, help="LESS kernels trained on the shipped NAMM (name or path)")
    p.add_argument("--extra-tokens", type=int, default=5,
                   help="tokens per layer the NAMM's equal-bytes row keeps beyond its threshold (default 5)")
    p.add_argument("--lengths", default="2048,4096",
                   help="comma-separated sequence lengths in tokens of the perplexity tables (default %(default)s)")
    p.add_argument("--samples", type=int, default=5, help="held-out sequences per length (default 5)")
    p.add_argument("--retrieval", default="passkey", help="retrieval task ('' to skip; default passkey)")
    p.add_argument("--retrieval-length", type=int, default=2048,
                   help="retrieval prompt length in tokens (default %(default)s)")
    p.add_argument("--retrieval-samples", type=int, default=32, help="retrieval prompts (default %(default)s)")
    p.add_argument("--retrieval-seed", type=int, default=100,
                   help="seed of the retrieval prompts (default %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads passed to every namm eval (default: namm eval's own, all cores)")
    p.add_argument("--only", default=None, help="comma-separated rows to run (default: all)")
    p.add_argument("--out", type=Path, default=Path("docs/results/less"),
                   help="folder of the rows' runs, results.md and results.json (default %(default)s)")
    args = p.parse_args(argv)
    wanted = rows(args)
    if args.only:
        wanted = {k: v for k, v in wanted.items() if k in args.only.split(",")}
    sections, summary = [], {"model": args.model, "h2o_less": args.h2o_less, "namm_less": args.namm_less, "tables": []}
    for length in [int(x) for x in args.lengths.split(",") if x]:
        found = {name: run_row(args.out / f"perplexity-L{length}" / name, "perplexity", length, args.samples, 0,
                               policy, args) for name, policy in wanted.items()}
        table, part = perplexity_table(length, found)
        sections.append(f"### Perplexity, {args.samples} held-out sequences of {length} tokens\n\n{table}")
        summary["tables"].append(part)
    if args.retrieval:
        found = {name: run_row(args.out / f"{args.retrieval}-L{args.retrieval_length}" / name, args.retrieval,
                               args.retrieval_length, args.retrieval_samples, args.retrieval_seed, policy, args)
                 for name, policy in wanted.items()}
        table, part = retrieval_table(args.retrieval, args.retrieval_length, found)
        sections.append(f"### {args.retrieval}, {args.retrieval_samples} prompts of {args.retrieval_length} tokens, "
                        f"seed {args.retrieval_seed}\n\n{table}")
        summary["tables"].append(part)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n\n".join(sections) + "\n")
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
