"""Inference: a preallocated KV cache, sampling, and batched generation (a full engine comes later).

Usage::

    from lmlab.inference import SamplingParams, generate_text
    texts = generate_text(model, tokenizer, ["ROMEO:"], SamplingParams(max_new_tokens=100, seed=0))
"""

from lmlab.inference.kv_cache import KVCache, KVCacheStep
from lmlab.inference.sampling import (
    Sampler,
    SamplingParams,
    filtered_probs,
    generate,
    generate_reference,
    generate_text,
    read_prompts,
)

__all__ = [
    "KVCache",
    "KVCacheStep",
    "Sampler",
    "SamplingParams",
    "filtered_probs",
    "generate",
    "generate_reference",
    "generate_text",
    "read_prompts",
]
