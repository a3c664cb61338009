"""Errors of the data pipeline and the vocabulary check.

Every problem with data (a missing file, a malformed line, a shard that does not match its metadata)
raises :class:`DataError`, a ``ValueError`` whose message names the file (and line) at fault.

Usage::

    from lmlab.data import DataError, check_vocab
    check_vocab(tokenizer, model_vocab_size=cfg.model.vocab_size)   # DataError if the ids would not fit
"""

from __future__ import annotations

from typing import Any

__all__ = ["DataError", "check_vocab"]


class DataError(ValueError):
    """Data that cannot be used: the message says what is wrong and where (file, line, pattern)."""


def check_vocab(tokenizer: Any, model_vocab_size: int | None) -> None:
    """Raise :class:`DataError` when ``tokenizer`` can emit ids that an embedding of ``model_vocab_size`` rows lacks.

    ``None`` means the model takes the tokenizer's size, which always fits.
    """
    if model_vocab_size is None:
        return
    vocab = int(tokenizer.vocab_size)
    if vocab > int(model_vocab_size):
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has {vocab} ids (specials included) but the model's vocab_size "
            f"is {model_vocab_size}: set model.vocab_size >= {vocab} (or null to use the tokenizer's size)"
        )
