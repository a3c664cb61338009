"""Named weight-initialisation schemes, selected by ``model.init.scheme``.

Each scheme gives, for every block, the standard deviation of its "input" projections (q, k, v, gate,
up), of its residual "output" projections (attention out, MLP down) and of the embedding and head.
Biases start at zero and norm gains at one. Modules apply them in their own ``reset_parameters``; this
module only decides the numbers, so a scheme is one small function.

- ``normal``: every matrix ~ N(0, std).
- ``gpt2``: as normal, but residual output projections use ``std / sqrt(2 * n_layers)`` (GPT-2 paper),
  so the residual stream's variance does not grow with depth.
- ``small``: width-scaled "small init" (Nguyen & Salazar, 2019): every matrix ~ N(0, sqrt(2 / (5 * dim))),
  independent of ``std``.
- ``depth``: residual output projections of block ``l`` (0-based) use ``std / sqrt(2 * (l + 1))``
  (the "current depth" rule used by OLMo and Lingua).
- ``width``: every matrix ~ N(0, 1 / sqrt(dim)), independent of ``std`` (the init of the in-tool learning paper's
  own code, arXiv 2508.20755). For tiny models a fixed ``std = 0.02`` is far below ``1 / sqrt(dim)`` (0.25 at
  width 16): attention starts uniform and memorisation sets in much later.

Usage::

    model = Transformer(cfg)            # already initialised with cfg.init
    init_stds(cfg, layer_id=0)          # InitStds(embed=..., inp=..., out=..., head=...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmlab.config import ModelConfig

SCHEMES = ("normal", "gpt2", "small", "depth", "width")


@dataclass(frozen=True)
class InitStds:
    embed: float
    inp: float
    out: float
    head: float


def init_stds(cfg: ModelConfig, layer_id: int = 0) -> InitStds:
    """Standard deviations of each weight role in block ``layer_id`` under ``cfg.init.scheme``."""
    scheme, std = cfg.init.scheme, cfg.init.std
    if scheme == "normal":
        return InitStds(std, std, std, std)
    if scheme == "gpt2":
        return InitStds(std, std, std / math.sqrt(2 * cfg.n_layers), std)
    if scheme == "small":
        s = math.sqrt(2.0 / (5.0 * cfg.dim))
        return InitStds(s, s, s, s)
    if scheme == "depth":
        return InitStds(std, std, std / math.sqrt(2 * (layer_id + 1)), std)
    if scheme == "width":
        s = 1.0 / math.sqrt(cfg.dim)
        return InitStds(s, s, s, s)
    raise ValueError(f"model.init.scheme: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
