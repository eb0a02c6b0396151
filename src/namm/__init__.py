"""namm: Neural Attention Memory Models — evolved KV-cache memory for Hugging Face transformers.

    import namm
    model, tokenizer = namm.load_model("smollm2-135m")
    out = namm.generate(model, tokenizer, prompt, policy=namm.make_policy("h2o", budget=0.25))
    ids = model.generate(input_ids, cache=namm.cache(model, "h2o"), prefill_chunk_size=128)  # transformers' own
"""

from namm.memory.driver import memory_cache as cache
from namm.memory.generation import GenerationOutput, generate
from namm.models import load_model
from namm.policies import Budget, LayerView, MemoryPolicy, make_policy, policy_names

__all__ = [
    "Budget", "GenerationOutput", "LayerView", "MemoryPolicy", "cache", "generate", "load_model", "make_policy",
    "policy_names",
]
__version__ = "0.1.0"
