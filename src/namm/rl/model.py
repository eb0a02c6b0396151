"""A small Decision Transformer (Chen et al., 2021, arXiv 2106.01345) on a transformers decoder.

The sequence of an episode is ``R_0, s_0, a_0, R_1, s_1, a_1, ...`` (return-to-go, state,
action), one token each, at absolute positions ``3t, 3t+1, 3t+2``. Returns and states get linear
embeddings; actions (discrete) use the decoder's own token embedding, and its LM head, with one
output per action, reads the action logits at every state token. The decoder is a plain
``LlamaForCausalLM`` fed ``inputs_embeds`` with rotary positions in place of the paper's
timestep embedding, so namm's memory runtime runs it unmodified: the token embeddings of a step
are fed to :class:`~namm.memory.driver.MemoryRunner` like token ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig

FORMAT = "namm-decision-transformer"
SHIPPED = "cartpole-dt"
TOKENS_PER_STEP = 3  # return-to-go, state, action


@dataclass
class DTConfig:
    """Architecture, input normalisation and provenance of a Decision Transformer."""

    state_dim: int = 4  # of the environment's states; the DT sees the components in ``observed``
    observed: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    n_actions: int = 2
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    max_steps: int = 500
    return_scale: float = 500.0  # returns-to-go are divided by this
    state_mean: list[float] = field(default_factory=lambda: [0.0] * 4)  # of the observed components
    state_std: list[float] = field(default_factory=lambda: [1.0] * 4)
    env: str = "CartPole-v1"
    provenance: dict = field(default_factory=dict)

    def decoder_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.n_actions, hidden_size=self.hidden, intermediate_size=4 * self.hidden,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            head_dim=self.hidden // self.heads, max_position_embeddings=TOKENS_PER_STEP * self.max_steps,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )


class DecisionTransformer(nn.Module):
    """Return, state and action embeddings around a Llama decoder whose LM head scores actions."""

    def __init__(self, config: DTConfig):
        super().__init__()
        self.config = config
        self.decoder = AutoModelForCausalLM.from_config(config.decoder_config(), attn_implementation="sdpa",
                                                        dtype=torch.float32)
        self.decoder.generation_config.eos_token_id = None
        self.embed_return = nn.Linear(1, config.hidden)
        self.embed_state = nn.Linear(len(config.observed), config.hidden)
        self.register_buffer("observed", torch.tensor(config.observed, dtype=torch.long), persistent=False)
        self.register_buffer("state_mean", torch.tensor(config.state_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("state_std", torch.tensor(config.state_std, dtype=torch.float32), persistent=False)

    def embed(self, returns_to_go: Tensor, states: Tensor, actions: Tensor) -> Tensor:
        """(B, T, 3, hidden) embeddings of steps: raw returns-to-go (B, T), the environment's raw
        states (B, T, state_dim), of which only the ``observed`` components are seen, and actions
        (B, T) (any value where an action is not known yet)."""
        r = self.embed_return((returns_to_go / self.config.return_scale).unsqueeze(-1))
        s = self.embed_state((states.index_select(-1, self.observed) - self.state_mean) / self.state_std)
        a = self.decoder.get_input_embeddings()(actions.clamp(0, self.config.n_actions - 1))
        return torch.stack([r, s, a], dim=2)

    def sequence(self, returns_to_go: Tensor, states: Tensor, actions: Tensor) -> Tensor:
        """(B, 3T, hidden) interleaved token embeddings ``R_0, s_0, a_0, R_1, ...`` of episodes."""
        emb = self.embed(returns_to_go, states, actions)
        return emb.flatten(1, 2)

    def forward(self, returns_to_go: Tensor, states: Tensor, actions: Tensor,
                mask: Tensor | None = None) -> Tensor:
        """(B, T, n_actions) action logits read at every state token, by a plain forward of the
        whole sequence (``mask`` (B, T): real steps; right padding only)."""
        tokens = self.sequence(returns_to_go, states, actions)
        attention = None if mask is None else mask.repeat_interleave(TOKENS_PER_STEP, dim=1).long()
        logits = self.decoder(inputs_embeds=tokens, attention_mask=attention).logits
        return logits[:, 1::TOKENS_PER_STEP]


def save_dt(model: DecisionTransformer, path: str | Path) -> tuple[Path, Path]:
    """Write ``PATH.safetensors`` (weights) and ``PATH.json`` (config); returns both paths."""
    stem = Path(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors, config = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tensors))
    config.write_text(json.dumps({"format": FORMAT, "tensors": tensors.name, "config": asdict(model.config)},
                                 indent=2) + "\n", encoding="utf-8")
    return tensors, config


def load_dt(path: str | Path = SHIPPED) -> DecisionTransformer:
    """A saved Decision Transformer: the shipped name, or a path to its ``.json`` / ``.safetensors``
    (or their common stem)."""
    stem = Path(path)
    if str(path) == SHIPPED:
        stem = Path(str(resources.files("namm.rl") / "checkpoints" / SHIPPED))
    elif stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    config_file = stem.with_suffix(".json")
    if not config_file.is_file():
        raise FileNotFoundError(f"no Decision Transformer at {path} (expected {config_file}); "
                                "rebuild the shipped one with `namm rl train`")
    meta = json.loads(config_file.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_file} is not a namm Decision Transformer (format {meta.get('format')!r})")
    model = DecisionTransformer(DTConfig(**meta["config"]))
    model.load_state_dict(load_file(str(config_file.with_name(meta["tensors"]))))
    return model.eval()
