"""The kvpress half of the namm / kvpress cross-check (``benchmarks/kvpress_crosscheck.py`` drives it).

Runs in its own virtual environment with kvpress and the transformers version kvpress supports;
it imports neither namm nor anything from this repository:

    /work/kvpress-venv/bin/python benchmarks/kvpress_side.py --prompts P.json --model DIR --out rows.jsonl

It reads the prompts namm's task code wrote (token ids included, so both libraries see the same
tokens), answers each one greedily with kvpress presses and appends one JSON row per (sample,
protocol, press) to ``--out`` (a rerun skips rows already there):

* ``query-aware``: the whole prompt (question included) is prefilled with the press active, which
  compresses it once; the first answer token comes from that prefill's logits, then decoding
  appends to the compressed cache (no further compression).
* ``query-agnostic`` (kvpress's own convention): the context alone is prefilled and compressed,
  then the question is fed at its true positions and the answer decoded.

Plain completion prompts, no chat template (as on namm's side): ``--model`` must be a directory
whose tokenizer has no chat template (KVzip reads its repeat prompt's framing from it).

Hook presses (all but KVzip) share one prefill per sample and protocol: the prefill runs with
eager attention (ObservedAttention needs the attention weights; the others use them or compute
the same window attention themselves) and, after each layer's attention, every press's own
``forward_hook`` compresses a private copy of that layer's cache. kvpress's own hooks also run
after the layer's attention, so the prefill's activations never depend on the press, and each
press gets exactly the inputs its context manager would give it; ``--verify`` checks this against
``with press(model)`` on the first sample. KVzip replays the context, so it runs alone through its
own context manager on an SDPA copy of the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

import kvpress
from kvpress import (ExpectedAttentionPress, KnormPress, KVzipPress, ObservedAttentionPress, SnapKVPress,
                     StreamingLLMPress, TOVAPress)

PROTOCOLS = ("query-aware", "query-agnostic")
PRESSES: dict[str, Callable[[float], object]] = {
    "SnapKV": lambda r: SnapKVPress(compression_ratio=r),
    "Knorm": lambda r: KnormPress(compression_ratio=r),
    "StreamingLLM": lambda r: StreamingLLMPress(compression_ratio=r),
    "TOVA": lambda r: TOVAPress(compression_ratio=r),
    "ObservedAttention": lambda r: ObservedAttentionPress(compression_ratio=r),
    "ExpectedAttention": lambda r: ExpectedAttentionPress(compression_ratio=r),
    "KVzip": lambda r: KVzipPress(compression_ratio=r),
}
FULL = "full"


@dataclass
class Prompt:
    """One sample as namm's task code produced it (token ids from namm's tokenizer call)."""

    id: str
    task: str
    prompt_ids: list[int]
    context_ids: list[int]
    question_ids: list[int]
    max_new_tokens: int


def load_prompts(path: Path) -> list[Prompt]:
    """The samples of a prompts file written by ``kvpress_crosscheck.py``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [Prompt(s["id"], s["task"], s["prompt_ids"], s["context_ids"], s["question_ids"], s["max_new_tokens"])
            for s in data["samples"]]


def first_per_task(samples: list[Prompt], n: int) -> list[Prompt]:
    """The first ``n`` samples of every task, in file order."""
    seen: dict[str, int] = {}
    out = []
    for s in samples:
        seen[s.task] = seen.get(s.task, 0) + 1
        if seen[s.task] <= n:
            out.append(s)
    return out


def load(model_dir: str, attn: str) -> nn.Module:
    """The model in float32 on the CPU with the given attention implementation, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()


def eos_ids(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({int(eos)} if eos is not None else set())


def decode(model: nn.Module, cache: DynamicCache, first: torch.Tensor, position: int, max_new_tokens: int,
           eos: set[int]) -> list[int]:
    """Greedy tokens after the logits ``first`` (vocabulary,), feeding each token at its true
    absolute position starting at ``position``; stops after an end-of-sequence token."""
    tokens = [int(first.argmax())]
    for i in range(max_new_tokens - 1):
        if tokens[-1] in eos:
            break
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                    position_ids=torch.tensor([[position + i]]), use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def ask(model: nn.Module, cache: DynamicCache, question: list[int], position: int) -> torch.Tensor:
    """Feed the question at positions ``position``.. without compression; the last token's logits."""
    ids = torch.tensor([question])
    pos = torch.arange(position, position + len(question)).unsqueeze(0)
    return model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1).logits[0, -1]


def cache_tokens(cache: DynamicCache) -> list[int]:
    """Tokens each layer holds (heads of a layer hold the same count in these presses)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


class SharedPrefill:
    """Forward hooks that let several presses compress one prefill, each into its own cache."""

    def __init__(self, model: nn.Module, presses: dict[str, object]):
        self.model = model
        self.presses = presses
        self.caches: dict[str, DynamicCache] = {}
        self.hooks: list = []

    def __enter__(self) -> "SharedPrefill":
        self.caches = {name: DynamicCache() for name in self.presses}
        for press in self.presses.values():
            press.post_init_from_model(self.model)  # what press(model) does first
        for layer in self.model.model.layers:
            layer.self_attn.rotary_emb = self.model.model.rotary_emb  # ditto
            self.hooks.append(layer.self_attn.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _hook(self, module: nn.Module, args, kwargs: dict, output):
        full = kwargs["past_key_values"].layers[module.layer_idx]
        for name, press in self.presses.items():
            own = self.caches[name]
            own.update(full.keys, full.values, module.layer_idx)  # a fresh layer: it holds these tensors
            press.forward_hook(module, args, {**kwargs, "past_key_values": own}, output)
        return output


def hook_presses_run(model: nn.Module, sample: Prompt, protocol: str, names: list[str], ratio: float,
                     eos: set[int]) -> list[dict]:
    """Rows for the full cache and every hook press in ``names`` on one shared prefill."""
    ids = sample.prompt_ids if protocol == "query-aware" else sample.context_ids
    presses = {name: PRESSES[name](ratio) for name in names}
    main = DynamicCache()
    start = time.perf_counter()
    with torch.inference_mode(), SharedPrefill(model, presses) as shared:
        out = model(input_ids=torch.tensor([ids]), past_key_values=main, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    rows = []
    with torch.inference_mode():
        for name, cache in [(FULL, main), *shared.caches.items()]:
            kept = cache_tokens(cache)
            t0 = time.perf_counter()
            if protocol == "query-aware":
                first, position = out.logits[0, -1], len(ids)
            else:
                first, position = ask(model, cache, sample.question_ids, len(ids)), len(ids) + len(sample.question_ids)
            tokens = decode(model, cache, first, position, sample.max_new_tokens, eos)
            rows.append(row(sample, protocol, name, ratio if name != FULL else 0.0, tokens, kept, len(ids),
                            prefill_s, time.perf_counter() - t0))
    return rows


def kvzip_run(model: nn.Module, sample: Prompt, protocol: str, ratio: float, eos: set[int]) -> dict:
    """One KVzip row: its context manager prefills, replays the context to score it and masks the
    dropped keys (kvpress's KVzip compresses by masking, so the kept count is what is unmasked)."""
    ids = sample.prompt_ids if protocol == "query-aware" else sample.context_ids
    press = PRESSES["KVzip"](ratio)
    cache = DynamicCache()
    start = time.perf_counter()
    with torch.inference_mode():
        with press(model):
            out = model.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        prefill_s = time.perf_counter() - start
        layers = model.model.layers
        heads = model.config.num_key_value_heads
        masked = [0 if getattr(l.self_attn, "masked_key_indices", None) is None
                  else int(l.self_attn.masked_key_indices[0].numel()) for l in layers]
        kept = [len(ids) - m / heads for m in masked]
        t0 = time.perf_counter()
        if protocol == "query-aware":
            first = model.lm_head(out.last_hidden_state[:, -1])[0]
            position = len(ids)
        else:
            first, position = ask(model, cache, sample.question_ids, len(ids)), len(ids) + len(sample.question_ids)
        tokens = decode(model, cache, first, position, sample.max_new_tokens, eos)
        for l in layers:
            l.self_attn.masked_key_indices = None
    return row(sample, protocol, "KVzip", ratio, tokens, kept, len(ids), prefill_s, time.perf_counter() - t0)


def row(sample: Prompt, protocol: str, press: str, ratio: float, tokens: list[int], kept: list[float],
        compressed_len: int, prefill_s: float, decode_s: float) -> dict:
    """One output row: the answer's token ids and the memory right after compression."""
    return {"id": sample.id, "task": sample.task, "protocol": protocol, "press": press, "compression_ratio": ratio,
            "token_ids": tokens, "cache_tokens_per_layer": kept, "compressed_tokens": compressed_len,
            "kv_fraction": sum(kept) / (len(kept) * compressed_len), "prefill_s": prefill_s, "decode_s": decode_s}


def verify(model: nn.Module, sample: Prompt, names: list[str], ratio: float) -> None:
    """Assert the shared prefill gives every press exactly the cache its own context manager gives."""
    presses = {name: PRESSES[name](ratio) for name in names}
    with torch.inference_mode():
        with SharedPrefill(model, presses) as shared:
            model.model(input_ids=torch.tensor([sample.context_ids]), past_key_values=DynamicCache(), use_cache=True)
        for name in names:
            alone = DynamicCache()
            with PRESSES[name](ratio)(model):
                model.model(input_ids=torch.tensor([sample.context_ids]), past_key_values=alone, use_cache=True)
            for a, b in zip(shared.caches[name].layers, alone.layers):
                if not (torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)):
                    raise AssertionError(f"{name}: the shared prefill's cache differs from press(model)'s")
    print(f"verify: shared prefill == press(model) for {', '.join(names)} on {sample.id}", file=sys.stderr)


def done_keys(path: Path) -> set[tuple[str, str, str]]:
    """(id, protocol, press) of the rows already in ``path`` (a torn last line is dropped)."""
    if not path.exists():
        return set()
    keys, good = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        keys.add((r["id"], r["protocol"], r["press"]))
        good.append(line)
    path.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return keys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, required=True,
                   help="prompts JSON file written by kvpress_crosscheck.py (token ids included)")
    p.add_argument("--model", required=True, help="model directory (its tokenizer must have no chat template)")
    p.add_argument("--out", type=Path, required=True, help="JSONL rows (appended; a rerun resumes)")
    p.add_argument("--presses", default=",".join(PRESSES),
                   help="comma-separated presses to run; the full cache runs too unless KVzip is the only one "
                        "(default: %(default)s)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help="comma-separated protocols: query-aware (question in the prefill) and/or query-agnostic "
                        "(context compressed before the question) (default: %(default)s)")
    p.add_argument("--kvzip-protocols", default="query-agnostic", help="KVzip is query-agnostic by design")
    p.add_argument("--ratio", type=float, default=0.5, help="kvpress compression_ratio (fraction removed)")
    p.add_argument("--limit", type=int, default=None, help="first N samples of each task only")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: %(default)s)")
    p.add_argument("--verify", action="store_true", help="check the shared prefill against press(model) first")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    hf_logging.disable_progress_bar()  # a log file, not a terminal
    if AutoTokenizer.from_pretrained(a.model).chat_template is not None:
        sys.exit(f"{a.model}: its tokenizer has a chat template; pass a directory without one (plain prompts)")
    names = [n for n in a.presses.split(",") if n]
    unknown = sorted(set(names) - set(PRESSES))
    if unknown:
        sys.exit(f"unknown presses: {', '.join(unknown)}; choose from {', '.join(PRESSES)}")
    hook_names = [n for n in names if n != "KVzip"]
    samples = load_prompts(a.prompts)
    if a.limit is not None:
        samples = first_per_task(samples, a.limit)
    eager = load(a.model, "eager")
    sdpa = load(a.model, "sdpa") if "KVzip" in names else None
    eos = eos_ids(eager)
    if a.verify and hook_names:
        verify(eager, samples[0], hook_names, a.ratio)
    done = done_keys(a.out)
    print(f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else ''}: {len(samples)} samples, "
          f"{len(done)} rows already done", file=sys.stderr)
    with a.out.open("a", encoding="utf-8") as handle:
        for i, sample in enumerate(samples):
            for protocol in a.protocols.split(","):
                rows = []
                if hook_names and any((sample.id, protocol, n) not in done for n in [FULL, *hook_names]):
                    rows += hook_presses_run(eager, sample, protocol, hook_names, a.ratio, eos)
                if sdpa is not None and protocol in a.kvzip_protocols.split(",") \
                        and (sample.id, protocol, "KVzip") not in done:
                    rows.append(kvzip_run(sdpa, sample, protocol, a.ratio, eos))
                for r in rows:
                    if (r["id"], r["protocol"], r["press"]) not in done:
                        handle.write(json.dumps(r) + "\n")
                handle.flush()
            print(f"kvpress side: {i + 1}/{len(samples)} samples", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
