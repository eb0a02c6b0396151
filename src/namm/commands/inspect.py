"""``namm inspect``: see what a memory policy keeps. Writes an HTML page with the prompt's tokens
coloured by the share of (layer, KV head) caches that still hold them at the end, a PNG of the
cache size of every layer over time, and the raw numbers as JSON."""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from namm.commands.common import (
    add_model_args, add_policy_args, load_model_from_args, policy_from_args, read_text_file, set_threads,
    show_progress, writable_dir,
)
from namm.policies.base import LayerView, MemoryPolicy


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="show which tokens a memory policy keeps",
        description="Generate from a prompt with a memory policy (default: namm) and write OUT/retention.html (every "
                    "token coloured by the share of layer/KV-head caches holding it at the end; hover for counts), "
                    "OUT/cache_size.png (cache size of each layer over time, dropping at every memory update) and "
                    "OUT/retention.json (the same numbers).")
    add_model_args(p)
    add_policy_args(p, default="namm")
    p.add_argument("--prompt-file", required=True, help="text file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate (default 32)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=run)


@dataclass
class RetentionRecorder(MemoryPolicy):
    """Wraps a policy and remembers, per layer, the positions each head kept at its last update
    (batch of one)."""

    inner: MemoryPolicy
    kept: dict[int, tuple[int, Tensor, Tensor]] = field(default_factory=dict)  # layer -> (seen, positions, keep)

    def __post_init__(self) -> None:
        self.n_up, self.query_window, self.evicts = self.inner.n_up, self.inner.query_window, self.inner.evicts
        self.schedule = self.inner.schedule
        self.name, self.attend = self.inner.name, self.inner.attend  # attend: e.g. a LESS memory's output

    def reset(self, batch_size: int) -> None:
        self.inner.reset(batch_size)

    def select(self, view: LayerView) -> Tensor:
        keep = self.inner.select(view)
        self.kept[view.layer_idx] = (int(view.tokens_seen[0]), view.positions[0].cpu(), keep[0].cpu())
        return keep

    def retention(self, num_layers: int, tokens_seen: int) -> Tensor:
        """(layers, tokens_seen) share of a layer's KV heads that hold each position at the end."""
        out = torch.ones(num_layers, tokens_seen)
        for layer, (seen, positions, keep) in self.kept.items():
            held = torch.zeros(positions.shape[0], tokens_seen)
            held.scatter_add_(1, positions.clamp(min=0), (keep & (positions >= 0)).float())
            held[:, seen:] = 1  # arrived after the layer's last update: still cached
            out[layer] = held.mean(0)
        return out


def token_html(text: str, share: float | None, title: str) -> str:
    """One token as a coloured span (red: dropped everywhere, green: kept everywhere)."""
    shown = html.escape(text).replace("\n", "↵<br>") or "&nbsp;"
    style = "" if share is None else f' style="background:hsl({120 * share:.0f},75%,{85 - 10 * share:.0f}%)"'
    return f'<span class="t"{style} title="{html.escape(title)}">{shown}</span>'


def write_html(path: Path, tokens: list[str], retention: Tensor, summary: dict) -> None:
    """The retention page: a summary, the legend, the cache-size plot and the coloured tokens."""
    share = retention.mean(0)
    layers_any = (retention > 0).sum(0)
    spans = []
    for i, text in enumerate(tokens):
        if i < retention.shape[1]:
            title = (f"position {i}: held by {100 * share[i]:.0f}% of layer/KV-head caches "
                     f"(in {int(layers_any[i])} of {retention.shape[0]} layers)")
            spans.append(token_html(text, float(share[i]), title))
        else:
            spans.append(token_html(text, None, f"position {i}: generated last, never cached"))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>namm inspect: {html.escape(summary['policy'])}</title>
<style>
body {{ font-family: sans-serif; max-width: 70em; margin: 2em auto; }}
.text {{ font-family: monospace; white-space: pre-wrap; line-height: 1.7; }}
.t {{ border-radius: 2px; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }} th, td {{ text-align: left; padding: 2px 8px; }}
</style></head><body>
<h1>What the memory kept</h1>
<table>{rows}</table>
<p>Each token is coloured by the share of (layer, KV head) caches that still hold it at the end:
<span class="t" style="background:hsl(0,75%,85%)">dropped everywhere</span>
<span class="t" style="background:hsl(60,75%,80%)">kept by half</span>
<span class="t" style="background:hsl(120,75%,75%)">kept everywhere</span>. Hover a token for details.</p>
<img src="cache_size.png" alt="cache size per layer over time" style="max-width:100%">
<h2>Prompt and generated text</h2>
<div class="text">{''.join(spans)}</div>
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def cache_size_series(updates: list[tuple[int, list[int]]], final: tuple[int, list[int]]) -> tuple[list[int], Tensor]:
    """(tokens seen, (points, layers) cache sizes) over time: the cache grows one token per token
    seen and drops at each update, so every update gives a point just before and just after it."""
    layers = len(final[1])
    seen, sizes = [0], [torch.zeros(layers)]
    for tokens, after in updates:
        sizes.append(sizes[-1] + (tokens - seen[-1]))
        seen.append(tokens)
        sizes.append(torch.tensor(after, dtype=torch.float))
        seen.append(tokens)
    seen.append(final[0])
    sizes.append(torch.tensor(final[1], dtype=torch.float))
    return seen, torch.stack(sizes)


def plot_cache_sizes(path: Path, seen: list[int], sizes: Tensor, title: str) -> None:
    """PNG: cache size of every layer against tokens seen, with the full cache as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    cmap = plt.get_cmap("viridis")
    layers = sizes.shape[1]
    for layer in range(layers):
        ax.plot(seen, sizes[:, layer].numpy(), color=cmap(layer / max(layers - 1, 1)), lw=1)
    ax.plot([0, seen[-1]], [0, seen[-1]], "k--", lw=1, label="full cache")
    colorbar = fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, layers - 1), cmap), ax=ax)
    colorbar.set_label("layer")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("tokens cached per head")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import namm
    from namm.memory.generation import model_context, tokenize_prompts

    set_threads(args)
    prompt = read_text_file(args.prompt_file)
    if args.max_new_tokens < 0:
        raise ValueError("--max-new-tokens must be >= 0")
    recorder = RetentionRecorder(policy_from_args(args))
    out_dir = writable_dir(args.out)
    model, tokenizer = load_model_from_args(args)
    ids = tokenize_prompts(tokenizer, [prompt], model_context(model))[0]
    out = namm.generate(model, tokenizer, ids, policy=recorder, max_new_tokens=args.max_new_tokens,
                        record_history=True, progress=show_progress(args))
    config = model.config.get_text_config()
    retention = recorder.retention(config.num_hidden_layers, out.tokens_seen)
    all_ids = ids.tolist() + out.token_ids
    tokens = [tokenizer.decode([t]) for t in all_ids]
    updates = [(h.tokens_seen, h.tokens_per_layer) for h in out.history]
    seen, sizes = cache_size_series(updates, (out.tokens_seen, out.cache_tokens_per_layer))
    summary = {"model": args.model, "policy": args.policy, "checkpoint": args.checkpoint or "",
               "prompt tokens": out.prompt_tokens, "tokens seen": out.tokens_seen,
               "mean cache fraction": f"{out.cache_fraction:.3f}",
               "cache per layer (tokens)": " ".join(map(str, out.cache_tokens_per_layer)),
               "generated text": out.text}
    write_html(out_dir / "retention.html", tokens, retention, summary)
    plot_cache_sizes(out_dir / "cache_size.png", seen, sizes, f"{args.policy} on {args.model}: cache size per layer")
    (out_dir / "retention.json").write_text(json.dumps({
        "summary": summary, "token_ids": all_ids, "tokens": tokens,
        "retention_per_layer": [[round(v, 4) for v in row] for row in retention.tolist()],
        "updates": [{"tokens_seen": s, "tokens_per_layer": n} for s, n in updates],
        "final": {"tokens_seen": out.tokens_seen, "tokens_per_layer": out.cache_tokens_per_layer},
    }) + "\n", encoding="utf-8")
    print(f"kept {out.cache_fraction:.1%} of the cache on average over layers; wrote {out_dir / 'retention.html'}, "
          f"{out_dir / 'cache_size.png'} and {out_dir / 'retention.json'}")
    return 0
