"""Inference: the generation engine (continuous batching, paged KV pool, prefix cache, tools), the one decode
path, and the sampling primitives it uses.

Usage::

    from lmlab.inference import Engine, Request, SamplingParams
    engine = Engine(model, tokenizer, pool_tokens=8192, max_batch=32)       # or Engine.from_config(..., cfg.engine)
    results = engine.generate([Request(prompt=ids, params=SamplingParams(max_new_tokens=100, seed=0))])
    texts = engine.generate_text(["ROMEO:"], SamplingParams(max_new_tokens=100, seed=0))
"""

from lmlab.inference.engine import Engine, ModelRunner, Request, Result, StreamEvent
from lmlab.inference.pool import DecodeBatch, DecodeStep, PagedStep, PagePool, Segment
from lmlab.inference.prefix_cache import PrefixCache
from lmlab.inference.sampling import (
    Sampler,
    SamplingParams,
    TextStream,
    filtered_probs,
    read_prompts,
    row_params,
    text_params,
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
    "Sampler",
    "SamplingParams",
    "TextStream",
    "filtered_probs",
    "read_prompts",
    "row_params",
    "text_params",
]
