"""Inference: the generation engine (continuous batching, paged KV pool, prefix cache, tools), a simple
preallocated KV cache, sampling, and batched generation.

Usage::

    from lmlab.inference import Engine, Request, SamplingParams
    engine = Engine(model, tokenizer, pool_tokens=8192, max_batch=32)       # or Engine.from_config(..., cfg.engine)
    results = engine.generate([Request(prompt=ids, params=SamplingParams(max_new_tokens=100, seed=0))])
    texts = engine.generate_text(["ROMEO:"], SamplingParams(max_new_tokens=100, seed=0))
"""

from lmlab.inference.engine import Engine, ModelRunner, Request, Result, StreamEvent
from lmlab.inference.kv_cache import KVCache, KVCacheStep
from lmlab.inference.pool import DecodeBatch, DecodeStep, PagedStep, PagePool, Segment
from lmlab.inference.prefix_cache import PrefixCache
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
    "DecodeBatch",
    "DecodeStep",
    "Engine",
    "ModelRunner",
    "PagePool",
    "PagedStep",
    "PrefixCache",
    "Request",
    "Result",
    "Segment",
    "StreamEvent",
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
