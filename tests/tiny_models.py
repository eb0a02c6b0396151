"""Tiny random decoder models built from configs (no downloads), one per architecture family."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

VOCAB = 256


def tiny_model(kind: str = "llama-gqa", seed: int = 0):
    """A small randomly initialised causal LM of the given family, float32, SDPA, eval mode."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    if kind == "llama-gqa":
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)
    elif kind == "llama-mha":
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, head_dim=16, **common)
    elif kind == "qwen2":
        config = Qwen2Config(num_attention_heads=4, num_key_value_heads=1, **common)
    elif kind == "gemma3":
        config = Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=48,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  query_pre_attn_scalar=16, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def random_prompt(length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (length,), generator=gen)


KINDS = ["llama-gqa", "llama-mha", "qwen2", "gemma3"]
