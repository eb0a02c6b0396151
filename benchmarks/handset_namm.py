"""Hand-set NAMMs: starting points for evolution, not results.

    python benchmarks/handset_namm.py --rule streaming --normalization runs/smollm2-135m-margin/normalization \\
        [--hidden 8] [--sink-share 0.03] --out runs/streaming-namm
    python benchmarks/handset_namm.py --rule attention --normalization runs/NAME/normalization [--pool 7] \\
        [--schedule prompt-end] --out runs/attention-namm
    namm evolve --init-checkpoint runs/streaming-namm --scorer mlp --hidden 8 ... --out runs/stage3

Both are MLP scorers (``--hidden H``, H >= 2; tanh units, docs/algorithm.md §5) whose other hidden
units start at zero.

``streaming``: the first hidden unit reads the slowest recency sine (newer tokens score higher) and
the second fires on attention sinks: tokens whose spectrogram DC bin, un-normalised, says they
receive more than ``--sink-share`` of their head's attention. A sink outscores every other token,
so in budget mode the NAMM keeps the sinks, then the newest tokens — StreamingLLM's rule, learned
from the NAMM's own features (it has no absolute positions). Evolution started here begins level
with the strongest query-agnostic baseline instead of at the full cache.

``attention``: the first hidden unit reads the DC bin (the attention a token received from the
update's queries, smoothed over time), the second the recency sine with a small weight that only
breaks ties. With ``--n-up 32`` on the prompt-end schedule the queries are the question's, so the
NAMM ranks like SnapKV's observation-window vote without its max-pool (a per-token scorer sees no
neighbours). ``--pool 7`` records a selection that max-pools every score over 7 neighbouring slots
(docs/algorithm.md §6): with it the rule is SnapKV's vote, max-pool included.

The attention unit is tanh(slope * (DC - center)) in normalised DC units. The ranking is the same for
any positive slope until tanh saturates, but evolution is not: the feature statistics include the
attention sinks, so ordinary context tokens span only about 0.01 normalised units, while a CMA-ES
step of 0.02 on each of the scorer's inputs moves a unit's input by about 0.05. At the default slope
(0.25, centre 0) the search noise outweighs the attention signal; at slope 150 it is the other way
round: every member of a generation scored the same fitness, so the search had nothing to rank.
``--attention-slope 10 --attention-center -0.104`` (-0.104: the median context token of
Qwen2.5-Coder on validation prompts) sits between: a step keeps about 80% of the start's selection
(docs/results/evolution-v2/README.md, stage 13). No ordinary token saturates at that slope.

The recency sine sin(r w) with the slowest frequency w rises with the distance r up to
r = pi / (2 w) (5,253 tokens at the default base), so the recency ranking holds for caches up to
that size.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from namm.policies.base import SCHEDULES
from namm.policies.namm.checkpoint import check_pool, load_namm_checkpoint, namm_config, save_namm_checkpoint
from namm.policies.namm.features import FeatureConfig, recency_frequencies
from namm.policies.namm.scorers import MLPScorer, split_params

SINK_SHARPNESS = 2.0  # slope of the sink unit per normalised DC unit
ATTENTION_SLOPE = 0.25  # default slope of the attention unit per normalised DC unit (unsaturated to ~8 sd)
# Weight of the recency unit in the attention rule. It must only break ties: over a 2k cache the
# recency unit spans about 0.5, and at 0.05 that outweighed the small attention differences between
# a needle's digits and filler (validation prompts, docs/results/evolution-v2/README.md, stage 12).
TIE_BREAK = 1e-4


def steady_dc(share: float, features: FeatureConfig) -> float:
    """The un-normalised DC bin of a token that receives ``share`` of every query's attention: the
    periodic Hann window sums to window / 2, and the EMA of a constant converges to it."""
    return share * features.window / 2


def check_one_hidden_layer(scorer: MLPScorer, rule: str) -> None:
    """Both rules use two units of one hidden layer."""
    if len(scorer.hidden) != 1 or scorer.hidden[0] < 2:
        raise ValueError(f"the {rule} NAMM needs one hidden layer of at least 2 units (--hidden 2 or more)")


def streaming_params(scorer: MLPScorer, features: FeatureConfig, norm_mean: torch.Tensor, norm_std: torch.Tensor,
                     sink_share: float) -> torch.Tensor:
    """(num_params,) parameters of the streaming-like scorer (see the module docstring)."""
    check_one_hidden_layer(scorer, "streaming-like")
    half = features.recency_dims // 2
    dc = features.recency_dims  # the DC bin is the first spectrogram feature, after the recency embedding
    threshold = (steady_dc(sink_share, features) - float(norm_mean[0])) / max(float(norm_std[0]), features.eps)
    flat = torch.zeros(1, scorer.num_params)
    w1, b1, w2, b2 = split_params(flat, scorer.shapes)  # views into ``flat``
    w1[0, half - 1, 0] = -1.0  # sin(r w_slowest): grows with the distance to the newest token
    w1[0, dc, 1] = SINK_SHARPNESS
    b1[0, 1] = -SINK_SHARPNESS * threshold
    w2[0, 0, 0] = 1.0  # recency: tanh(-sin(r w)) in (-0.77, 0] up to r = pi / (2 w)
    w2[0, 1, 0] = 1.0  # sink: +1 against -1 for other tokens, more than the whole recency range
    return flat[0]


def attention_params(scorer: MLPScorer, features: FeatureConfig, slope: float = ATTENTION_SLOPE,
                     center: float = 0.0) -> torch.Tensor:
    """(num_params,) parameters of the attention-ranked scorer (see the module docstring): the
    attention unit is tanh(slope * (DC - center)) in normalised DC units."""
    check_one_hidden_layer(scorer, "attention-ranked")
    half = features.recency_dims // 2
    dc = features.recency_dims
    flat = torch.zeros(1, scorer.num_params)
    w1, b1, w2, _ = split_params(flat, scorer.shapes)  # views into ``flat``
    w1[0, dc, 0] = slope  # attention received: more is better
    b1[0, 0] = -slope * center
    w1[0, half - 1, 1] = -1.0  # sin(r w_slowest): grows with the distance to the newest token
    w2[0, 0, 0] = 1.0
    w2[0, 1, 0] = TIE_BREAK
    return flat[0]


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", choices=("streaming", "attention"), default="streaming",
                   help="streaming: sinks, then the newest tokens (default); attention: the most attended tokens")
    p.add_argument("--normalization", required=True,
                   help="a NAMM checkpoint (or an evolution run's normalization/) whose feature statistics to use")
    p.add_argument("--hidden", type=int, default=8, help="hidden units of the MLP scorer (>= 2; default 8)")
    p.add_argument("--sink-share", type=float, default=0.03,
                   help="streaming rule: attention share above which a token counts as a sink (default 0.03)")
    p.add_argument("--attention-slope", type=float, default=ATTENTION_SLOPE,
                   help=f"attention rule: slope of the attention unit per normalised DC unit (default {ATTENTION_SLOPE})")
    p.add_argument("--attention-center", type=float, default=0.0,
                   help="attention rule: normalised DC level where the attention unit is steepest (default 0)")
    p.add_argument("--pool", type=int, default=1,
                   help="odd number of neighbouring slots each score is max-pooled over at selection (default 1: none)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="schedule to record in the checkpoint (default: none, so the policy's own default)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    args = p.parse_args(argv)
    if not 0 < args.sink_share < 1:
        raise SystemExit(f"--sink-share must be in (0, 1), got {args.sink_share}")
    if not args.attention_slope > 0:
        raise SystemExit(f"--attention-slope must be positive, got {args.attention_slope}")
    try:
        check_pool(args.pool, "--pool")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    source = load_namm_checkpoint(args.normalization)
    features = FeatureConfig(**source.config["features"])
    scorer = MLPScorer(in_dim=features.dim, hidden=(args.hidden,))
    config = namm_config(features, scorer.config(), pool=args.pool)
    if args.schedule:
        config["selection"]["schedule"] = args.schedule
    limit = math.pi / (2 * float(recency_frequencies(features)[-1]))
    provenance = {"kind": "hand-set", "normalization_from": str(args.normalization), "valid_up_to_tokens": int(limit)}
    if args.rule == "streaming":
        params = streaming_params(scorer, features, source.mean, source.std, args.sink_share)
        provenance.update(rule="streaming-like", sink_share=args.sink_share)
        summary = f"sinks above {args.sink_share:.1%} of the attention, then the newest tokens"
    else:
        params = attention_params(scorer, features, args.attention_slope, args.attention_center)
        provenance.update(rule="attention-ranked", attention_slope=args.attention_slope,
                          attention_center=args.attention_center)
        summary = f"the most attended tokens first (update window {features.n_up} queries, pool {args.pool})"
    path = save_namm_checkpoint(args.out, params, source.mean, source.std, config, provenance)
    print(f"wrote {path}: {summary} (recency valid up to {int(limit)} cached tokens)")
    return path


if __name__ == "__main__":
    main()
