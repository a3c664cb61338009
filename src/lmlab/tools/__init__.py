"""Tools the model calls in token space during generation.

A :class:`Tool` turns the text of a call into the text of an answer. The engine watches each sequence for
the tool's ``trigger`` token (the begin token of the answer turn, e.g. ``<|database|>``): when the model
emits it, the engine takes the assistant's current message, asks :meth:`Tool.extract` for the call in it,
runs the tool in a worker thread (with a timeout), then appends the answer and ``<|assistant|>`` and lets
the model continue. A failing or slow tool gives an ``error: ...`` answer; it never stops the batch.

Usage::

    from lmlab.tools import CodeBlockTool
    tool = CodeBlockTool(lambda sql: run_query(sql), language="sql")   # trigger <|database|>
    tool.extract("Let me look.\\n```sql\\nSELECT 1\\n```")               # -> "SELECT 1"
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from lmlab.tokenizers import DATABASE

__all__ = ["CodeBlockTool", "Tool"]


@runtime_checkable
class Tool(Protocol):
    """``trigger``: special token (string) after which the tool answers. ``extract(message)``: the call in the
    assistant's message, or None when it holds none (the answer is then an error text). ``__call__(call)``:
    the answer text (may raise; the engine turns errors into an error answer)."""

    trigger: str

    def extract(self, message: str) -> str | None: ...

    def __call__(self, call: str) -> str: ...


class CodeBlockTool:
    """A tool whose call is the last fenced code block of a language in the message (```sql ... ```)."""

    def __init__(self, fn: Callable[[str], str], language: str = "sql", trigger: str = DATABASE) -> None:
        self.fn, self.language, self.trigger = fn, language, trigger
        self._pattern = re.compile(r"```" + re.escape(language) + r"[ \t]*\n?(.*?)```", re.DOTALL)

    def extract(self, message: str) -> str | None:
        blocks = self._pattern.findall(message)
        return blocks[-1].strip() if blocks else None

    def __call__(self, call: str) -> str:
        return str(self.fn(call))

    def __repr__(self) -> str:
        return f"CodeBlockTool({self.language!r}, trigger={self.trigger!r})"
