"""What a NAMM keeps: the share of each token class it retains, per layer, on held-out code and prose.

    python benchmarks/token_classes.py [--checkpoint NAME_OR_PATH] [--budget B] [--length 3072]
                                       [--out docs/results/token-classes]

The NAMM (default: the one shipped for smollm2-135m, threshold mode; ``--budget`` for budget mode)
reads two held-out prompts and the tokens it holds after the last memory update are compared with
all tokens old enough to have been scored (positions before that update):

* code: Python source from the standard library's ``test`` package (never part of the training
  corpus or tasks), classified with :mod:`tokenize`;
* prose: the held-out split of the offline corpus.

Classes: ``whitespace`` (only spaces/newlines), ``punctuation`` (no letter or digit), ``comment``
(inside a ``#`` comment or a docstring; code only), ``identifier/number`` (code: names, keywords,
numbers outside comments; prose: tokens with a digit), ``other`` (prose words, string literals,
mixed tokens). Writes OUT.json, OUT.md (table) and OUT.png (kept share per layer and class).
"""

from __future__ import annotations

import argparse
import io
import json
import sysconfig
import tokenize
from pathlib import Path

import torch

import namm
from namm.memory.driver import MemoryRunner, memory_attention_enabled
from namm.tasks.corpus import corpus_tokens

CLASSES = ["whitespace", "punctuation", "comment", "identifier/number", "other"]


def code_text(min_chars: int) -> str:
    """Concatenated Python test-suite sources with comments and docstrings, at least ``min_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    parts, size = [], 0
    for file in sorted(root.glob("test_*.py")):
        text = file.read_text(encoding="utf-8", errors="ignore")
        if "#" not in text or '"""' not in text:
            continue
        parts.append(text)
        size += len(text)
        if size >= min_chars:
            break
    return "\n".join(parts)


def comment_spans(source: str) -> list[tuple[int, int]]:
    """Character spans of comments and docstring-like string statements in Python ``source``."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    spans = []
    previous = tokenize.NEWLINE
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            begin = starts[tok.start[0] - 1] + tok.start[1]
            end = starts[tok.end[0] - 1] + tok.end[1]
            if tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and previous in (
                    tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)):
                spans.append((begin, end))
            if tok.type not in (tokenize.COMMENT,):
                previous = tok.type
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # a file cut mid-statement: the spans found so far hold
    return spans


def classify(text: str, offsets: list[tuple[int, int]], code: bool) -> list[str]:
    """The class of every token (by its character span)."""
    inside = torch.zeros(len(text) + 1, dtype=torch.bool)
    if code:
        for a, b in comment_spans(text):
            inside[a:b] = True
    out = []
    for a, b in offsets:
        piece = text[a:b]
        if not piece.strip():
            out.append("whitespace")
        elif code and b > a and bool(inside[a:b].all()):
            out.append("comment")
        elif not any(c.isalnum() for c in piece):
            out.append("punctuation")
        elif code and piece.strip().replace("_", "").isalnum():
            out.append("identifier/number")
        elif not code and any(c.isdigit() for c in piece):
            out.append("identifier/number")
        else:
            out.append("other")
    return out


@torch.inference_mode()
def kept_shares(model, policy, ids: torch.Tensor, classes: list[str]) -> dict:
    """Per class: tokens scored, and the share kept per layer (mean over KV heads)."""
    runner = MemoryRunner(model, policy, 1)
    with memory_attention_enabled(model):
        runner.feed([ids])
        runner.end_prompt()  # a policy on the prompt-end schedule compresses here
    last = int(runner.previous_update[0])
    labels = classes[:last]
    out = {}
    for name in CLASSES:
        mask = torch.tensor([c == name for c in labels])
        if not bool(mask.any()):
            continue
        per_layer = []
        for layer in runner.cache.layers:
            positions = layer.positions[0]  # (H, K)
            scored = (positions >= 0) & (positions < last)
            held = torch.zeros(positions.shape[0], last + 1, dtype=torch.bool)
            held.scatter_(1, torch.where(scored, positions, last), True)  # unscored slots land in the extra column
            per_layer.append(float(held[:, :last][:, mask].float().mean()))
        out[name] = {"tokens": int(mask.sum()), "kept_per_layer": per_layer,
                     "kept_mean": sum(per_layer) / len(per_layer)}
    total = torch.stack([(layer.positions[0] >= 0).sum(-1).float().mean() for layer in runner.cache.layers])
    return {"scored_tokens": last, "classes": out, "cache_fraction": float(total.mean() / int(runner.seen[0]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model: registry name or path (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None, help="NAMM checkpoint (default: the one shipped for the model)")
    parser.add_argument("--budget", type=float, default=None, help="budget mode at this budget (default: threshold mode)")
    parser.add_argument("--length", type=int, default=3072,
                        help="tokens of each held-out prompt, the code one and the prose one (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/token-classes"),
                        help="output path without suffix: writes OUT.json, OUT.md and OUT.png (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = namm.load_model(args.model)
    options = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    if args.budget is not None:
        options["budget"] = args.budget
    prose_ids = corpus_tokens(tokenizer, args.length, "heldout", 0)[: args.length]
    texts = {"code": code_text(8 * args.length), "prose": tokenizer.decode(prose_ids.tolist())}
    result = {"model": args.model, "checkpoint": args.checkpoint or "(shipped)", "budget": args.budget,
              "length": args.length, "texts": {}}
    for kind, text in texts.items():
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor(enc.input_ids[: args.length])
        classes = classify(text, enc.offset_mapping[: args.length], code=kind == "code")
        result["texts"][kind] = kept_shares(model, namm.make_policy("namm", **options), ids, classes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (args.out.parent / f"{args.out.name}{suffix}" for suffix in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# What the NAMM keeps, by token class ({args.model}, {result['checkpoint']}, "
             f"{'budget ' + str(args.budget) if args.budget else 'threshold mode'})", "",
             f"Share of the tokens of each class still held after the last memory update of a {args.length}-token "
             "held-out prompt, mean over layers (and KV heads); `python benchmarks/token_classes.py` rebuilds it.", "",
             "| text | class | tokens | kept (mean over layers) | min layer | max layer |", "|---|---|---|---|---|---|"]
    for kind, data in result["texts"].items():
        for name, c in data["classes"].items():
            lines.append(f"| {kind} | {name} | {c['tokens']} | {c['kept_mean']:.3f} | {min(c['kept_per_layer']):.3f} | "
                         f"{max(c['kept_per_layer']):.3f} |")
        lines.append(f"| {kind} | all (cache fraction) | {data['scored_tokens']} | {data['cache_fraction']:.3f} | | |")
    md_path.write_text("\n".join(lines) + "\n")
    plot(result, png_path)
    print("\n".join(lines))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result["texts"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), sharey=True)
    for ax, kind in zip(axes, kinds):
        for name, c in result["texts"][kind]["classes"].items():
            ax.plot(range(len(c["kept_per_layer"])), c["kept_per_layer"], marker=".", label=f"{name} ({c['tokens']})")
        ax.set_title(f"{kind}: share kept per layer")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("share of the class kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
