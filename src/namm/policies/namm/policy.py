"""``namm``: the Neural Attention Memory Model policy (Cetin et al., 2024, "An Evolved Universal
Transformer Memory", arXiv 2410.13166).

At every update each layer's tokens get a feature vector from the attention they received
(spectrogram EMA + recency, see ``features.py``), a scoring network (BAM or MLP) scores them
and the tokens scoring at or above the threshold are kept (``selection.py``). The memory size
is emergent; ``max_tokens`` / ``max_fraction`` optionally cap it. In budget mode (``budget=b``)
the scores only rank the tokens: each layer keeps its top-scored tokens within the budget, the
same memory a baseline gets at that budget (docs/algorithm.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from namm.policies.base import LayerView, MemoryPolicy
from namm.policies.budget import Budget
from namm.policies.namm.checkpoint import (NAMMCheckpoint, check_floor, check_pool, load_namm_checkpoint,
                                          namm_config, shipped_namm_for, zeros_checkpoint)
from namm.policies.namm.features import Normalization, layer_features, token_features
from namm.policies.namm.scorers import make_scorer
from namm.policies.namm.selection import out_of_window, pooled_scores, select_tokens


@dataclass(eq=False)
class NAMMPolicy(MemoryPolicy):
    """NAMM eviction. ``checkpoint``: None (the default: the checkpoint shipped for the model the
    policy runs on, resolved when the runtime binds it to a model), "zeros" (the all-zero NAMM,
    which keeps everything), a shipped name, a path, or a loaded :class:`NAMMCheckpoint`.
    ``threshold`` / ``n_up`` default to the checkpoint's values; ``scorer`` ("bam" or "mlp") picks
    the architecture of the "zeros" checkpoint and must match a loaded one. ``max_tokens`` (>= 2)
    or ``max_fraction`` (in (0, 1]) cap each layer's cache. ``budget`` (a fraction of tokens seen
    or a token count) switches to budget mode: no threshold, each layer keeps exactly its
    top-scored tokens up to the budget. ``pool`` (odd, default the checkpoint's, else 1) max-pools
    each token's score over that many neighbouring slots before selection. ``floor`` (a fraction,
    default the checkpoint's, else none) makes every layer keep, in threshold mode, at least that
    share of the tokens it has seen, its top-scored ones. ``extra_tokens`` (threshold mode) makes
    every layer keep that many more top-scored tokens than the threshold admits, e.g. to give the
    NAMM the bytes of a LESS state in an equal-memory comparison."""

    checkpoint: str | NAMMCheckpoint | None = None
    threshold: float | None = None
    max_tokens: int | None = None
    max_fraction: float | None = None
    n_up: int | None = None
    scorer: str | dict | None = None
    budget: float | int | str | None = None
    pool: int | None = None
    floor: float | None = None
    extra_tokens: int | None = None
    name = "namm"

    def __post_init__(self) -> None:
        if self.n_up is not None and int(self.n_up) < 1:
            raise ValueError(f"n_up must be >= 1, got {self.n_up}")
        if self.budget is not None and self.threshold is not None:
            raise ValueError("give either a threshold (threshold mode) or a budget (budget mode), not both")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or int(self.max_tokens) < 2):
            raise ValueError(f"max_tokens must be an integer >= 2, got {self.max_tokens!r}")
        if self.max_fraction is not None and not 0 < float(self.max_fraction) <= 1:
            raise ValueError(f"max_fraction must be in (0, 1], got {self.max_fraction!r}")
        if self.pool is not None:
            check_pool(self.pool, "pool")
        if self.floor is not None:
            check_floor(self.floor, "floor")
        if self.extra_tokens is not None and (isinstance(self.extra_tokens, bool)
                                              or int(self.extra_tokens) != self.extra_tokens or self.extra_tokens < 0):
            raise ValueError(f"extra_tokens must be an integer >= 0, got {self.extra_tokens!r}")
        if self.extra_tokens and self.budget is not None:
            raise ValueError("extra_tokens applies to threshold mode; in budget mode raise the budget instead")
        if self.budget is not None and not isinstance(self.budget, Budget):
            Budget(self.budget)  # validates now, before any model is loaded
        if self.scorer is not None:
            make_scorer(self.scorer, 1)
        self.loaded_checkpoint: NAMMCheckpoint | None = None
        self.population: Tensor | None = None
        if self.checkpoint is not None:
            self._load(self.checkpoint)

    def bind(self, model) -> None:
        """Resolve the default checkpoint for ``model`` (the one shipped for it) if none is loaded,
        and check that the checkpoint can run on it. A checkpoint runs on any decoder (zero-shot
        transfer, docs/algorithm.md §11): its parameters are shared by every layer and head and its
        features depend only on attention and token distances."""
        if self.loaded_checkpoint is None:
            from namm.models import registry_name

            self._load(shipped_namm_for(registry_name(model)))
        context = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 1 << 30)
        if context <= self.n_up:
            source = self.loaded_checkpoint.provenance.get("model", "its source model")
            raise ValueError(f"this NAMM (from {source}) updates every {self.n_up} tokens but the model's context "
                             f"is {context} tokens, so it would never run; pass a smaller n_up")

    def _load(self, checkpoint: str | NAMMCheckpoint) -> None:
        if isinstance(checkpoint, NAMMCheckpoint):
            ckpt = checkpoint
        elif checkpoint == "zeros":
            ckpt = zeros_checkpoint(self.scorer or "bam")
        else:
            ckpt = load_namm_checkpoint(checkpoint)
        net = ckpt.scorer
        if self.scorer is not None:
            wanted = make_scorer(self.scorer, net.in_dim).config()
            if wanted["kind"] != net.kind or (isinstance(self.scorer, dict) and wanted != net.config()):
                raise ValueError(f"scorer {self.scorer!r} does not match the checkpoint's scorer {net.config()}")
        features = ckpt.features
        if self.n_up is not None:
            features = replace(features, n_up=int(self.n_up))
        self.features = features
        self.n_up = features.n_up
        self.query_window = features.n_up
        self.checkpoint_threshold = float(ckpt.config.get("selection", {}).get("threshold", 0.0)
                                          if self.threshold is None else self.threshold)
        self.threshold = self.checkpoint_threshold
        if self.pool is None:
            self.pool = int(ckpt.config.get("selection", {}).get("pool", 1))
        if self.floor is None:
            self.floor = ckpt.config.get("selection", {}).get("floor")
        schedule = ckpt.config.get("selection", {}).get("schedule")
        if schedule is not None and "_schedule" not in self.__dict__:  # an explicit schedule wins
            self.schedule = schedule
        self.caps = [Budget(int(self.max_tokens))] if self.max_tokens is not None else []
        self.caps += [Budget(float(self.max_fraction))] if self.max_fraction is not None else []
        self._budget_cap = None
        self.set_budget(self.budget)
        self.net = net
        self.params = ckpt.params.float().clone()
        self.normalization: Normalization = ckpt.normalization
        self.loaded_checkpoint = ckpt

    def set_budget(self, budget: float | int | str | Budget | None) -> None:
        """Switch to budget mode at ``budget`` (top-scored tokens within it), or with None back to
        threshold mode at the checkpoint's (or the given) threshold."""
        self.caps = [c for c in self.caps if c is not self._budget_cap]
        if budget is None:
            self.budget, self._budget_cap = None, None
            self.threshold = self.checkpoint_threshold
            return
        cap = budget if isinstance(budget, Budget) else Budget(budget)
        self.budget, self._budget_cap = cap, cap
        self.caps.append(cap)
        self.threshold = float("-inf")

    @property
    def mode(self) -> str:
        """"budget" or "threshold"."""
        return "threshold" if self.budget is None else "budget"

    @property
    def num_params(self) -> int:
        """Length of the scorer's flat parameter vector (4,172 for the paper's BAM)."""
        return self.net.num_params

    def config(self) -> dict:
        """The checkpoint config of this policy (features, scorer, selection with its schedule)."""
        config = namm_config(self.features, self.net.config(), self.checkpoint_threshold, self.pool, self.floor)
        config["selection"]["schedule"] = self.schedule
        return config

    def set_population(self, params: Tensor | None) -> None:
        """Give batch row b the parameters ``params[b]`` ((P, num_params); the batch size must then
        be P), or with None go back to the checkpoint's vector for every row."""
        if params is None:
            self.population = None
            return
        params = torch.as_tensor(params, dtype=torch.float32)
        if params.dim() != 2 or params.shape[1] != self.num_params:
            raise ValueError(f"population must be (P, {self.num_params}) parameters, got {tuple(params.shape)}")
        if not bool(torch.isfinite(params).all()):
            raise ValueError("population parameters hold NaN or infinite values")
        self.population = params

    def reset(self, batch_size: int) -> None:
        if self.population is not None and batch_size != self.population.shape[0]:
            raise ValueError(f"a NAMM population of {self.population.shape[0]} members needs a batch of "
                             f"{self.population.shape[0]} rows, got {batch_size}")

    def row_params(self, rows: Tensor) -> Tensor:
        """(B, num_params) parameters of the given batch rows."""
        if self.population is None:
            self.params = self.params.to(rows.device)  # moved to the model's device once
            return self.params.expand(len(rows), -1)
        self.population = self.population.to(rows.device)
        return self.population.index_select(0, rows)

    def cap(self, tokens_seen: Tensor) -> Tensor | None:
        """(B,) most tokens a layer may keep per head, or None without a cap."""
        caps = [budget.capacity(tokens_seen) for budget in self.caps]
        return torch.stack(caps).amin(0) if caps else None

    def floor_count(self, tokens_seen: Tensor) -> Tensor | None:
        """(B,) fewest tokens a layer keeps per head in threshold mode, or None without a floor."""
        if self.floor is None or self.mode == "budget":
            return None
        return Budget(float(self.floor)).capacity(tokens_seen)

    def token_features(self, view: LayerView) -> Tensor:
        """(B, H, K, dim) feature vectors of a layer's tokens; updates the carried state in the view."""
        self.normalization = self.normalization.to(view.positions.device)  # moved to the model's device once
        return token_features(layer_features(view, self.features), self.normalization, self.features)

    def scores(self, view: LayerView) -> Tensor:
        """(B, H, K) scores of a layer's tokens."""
        return self.net.score(self.token_features(view), view.valid, self.row_params(view.rows))

    def select(self, view: LayerView) -> Tensor:
        scores, cap = pooled_scores(self.scores(view), view.valid, self.pool), self.cap(view.tokens_seen)
        if view.sliding_window is not None:
            window = torch.full_like(view.tokens_seen, int(view.sliding_window))
            scores, cap = out_of_window(scores, view.valid, view.positions, view.tokens_seen, window, cap)
        return select_tokens(scores, view.valid, self.threshold, cap, self.floor_count(view.tokens_seen),
                             int(self.extra_tokens or 0))
