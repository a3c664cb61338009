"""Reading JSON Lines files with errors that name the file and line.

Lines end at "\\n" only: ``str.splitlines()`` would also cut at U+0085, U+2028 and friends, which
``json.dumps(..., ensure_ascii=False)`` leaves unescaped inside strings.

Usage::

    for lineno, obj in iter_jsonl(path):            # blank lines skipped
        ...
    rows = list(iter_jsonl(path, text=already_read, error=DataError))
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(
    path: str | os.PathLike, text: str | None = None, error: type[Exception] = ValueError
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line; a malformed line raises ``error("FILE:LINE: ...")``."""
    if text is None:
        text = Path(path).read_text(encoding="utf-8")
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
