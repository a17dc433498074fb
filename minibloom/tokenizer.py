"""BLOOM's tokenizer: ``tokenizer.json`` run by the ``tokenizers`` library, plus what generation needs around it.

BLOOM's tokenizer is a byte-level BPE (a Split regex pre-tokenizer, then ByteLevel; no normalizer) whose
post-processor adds nothing: no BOS, no EOS (``"fox</s>"`` ends in 2 only because ``</s>`` is written). Special
tokens: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3; batches are padded on the LEFT (hub ``tokenizer_config.json``
``padding_side: "left"``).

``StreamDecoder`` turns a growing list of ids into text pieces that never end inside a UTF-8 character: byte-level
tokens often carry only part of a multi-byte character (``"日"`` is three tokens), and decoding such a prefix yields
U+FFFD. It keeps a small window of ids and holds text back until the window decodes cleanly.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from .errors import MinibloomError, shown
from .jsonfile import read_json

SPECIAL_DEFAULTS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
REPLACEMENT = "\ufffd"


def _token_text(value) -> str | None:
    """``tokenizer_config.json`` spells special tokens as strings or as ``{"content": ...}`` objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    d = read_json(path)
    return d if isinstance(d, dict) else {}


def _utf8(text: str, name: str) -> str:
    """``text`` if it can be encoded as UTF-8 (a lone surrogate such as ``"\\udcff"`` cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MinibloomError(f"{name}: not valid Unicode text ({e.reason} at position {e.start})") from None
    return text


PADDING_SIDES = ("left", "right")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> ``(input_ids, attention_mask)`` [batch, longest], shorter rows padded with ``pad_id`` on
    ``side``: "left" (BLOOM's tokenizer: every row's last token sits in the last column) or "right" (every row starts
    in column 0; the pads come after its last token). The mask is 1 on real tokens and 0 on pads."""
    if side not in PADDING_SIDES:
        raise MinibloomError(f"padding side: expected 'left' or 'right', got {side!r}")
    if len(rows) == 0:
        raise MinibloomError("rows: nothing to pad (no rows)")
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < 2**63:
        raise MinibloomError(f"pad_token_id: must be a token id (an integer from 0), got {shown(pad_id)}")
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for i, r in enumerate(rows):
        cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, cols] = r
        mask[i, cols] = 1
    return ids, mask


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> ``(input_ids, attention_mask)`` [batch, longest], shorter rows padded on the left (BLOOM's
    tokenizer pads on the left, so every row's last token sits in the last column)."""
    return pad_rows(rows, pad_id, "left")


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> ``(input_ids, attention_mask)`` [batch, longest], shorter rows padded on the right (every row
    starts in column 0; its real positions see the same ALiBi positions and keys as the row alone)."""
    return pad_rows(rows, pad_id, "right")


def _row_side(row: np.ndarray) -> str:
    real = np.flatnonzero(row)
    if real.size == row.size:
        return "none"
    if real.size == 0 or real[-1] - real[0] + 1 != real.size:
        return "mixed"  # no real token, or a hole between real tokens
    if real[-1] == row.size - 1:
        return "left"
    return "right" if real[0] == 0 else "mixed"  # pads on both sides: mixed


def padding_side(attention_mask) -> str:
    """Which side an attention mask ([seq] or [batch, seq] of 0/1) pads on: "none" (all ones), "left" or "right"
    (every padded row's real tokens are one run that ends in the last / starts in the first column), else "mixed"
    (rows padded on different sides, on both sides, with holes, or with no real token). The inverse of ``pad_rows``."""
    m = np.atleast_2d(np.asarray(attention_mask))
    sides = {_row_side(row) for row in m} - {"none"}
    if not sides:
        return "none"
    return sides.pop() if len(sides) == 1 else "mixed"


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with BLOOM's conventions: no implicit special tokens, left padding, special ids.

    ``encode(text) -> list[int]``; ``encode(list_of_texts) -> list[list[int]]``; ``encode_batch(texts)`` -> left-padded
    ``(ids, attention_mask)`` NumPy arrays; ``decode(ids, skip_special_tokens=False)``; ``stream_decoder()``.
    ``config`` holds ``tokenizer_config.json`` (``chat_template`` lives there when a model has one).
    """

    def __init__(self, tokenizer, config: dict | None = None, path: str | None = None):
        self._tk = tokenizer
        self.config = dict(config or {})
        self.path = path
        self.special_tokens: dict[str, str] = {}
        for name, default in SPECIAL_DEFAULTS.items():
            text = _token_text(self.config.get(name)) or default
            if self._tk.token_to_id(text) is not None:
                self.special_tokens[name] = text

    # ---- special ids -----------------------------------------------------------------------------------------
    def _special_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self._tk.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def all_special_ids(self) -> list[int]:
        ids = {self._tk.token_to_id(t.content) for t in self._tk.get_added_tokens_decoder().values() if t.special}
        ids.update(i for i in (self._special_id(n) for n in SPECIAL_DEFAULTS) if i is not None)
        return sorted(i for i in ids if i is not None)

    @property
    def vocab_size(self) -> int:
        """Entries of the vocabulary, added tokens included (250680 for BLOOM; the embedding has 250880 rows)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self):
        """The ``chat_template`` of ``tokenizer_config.json`` (a Jinja string, a list of named ones, or None)."""
        return self.config.get("chat_template")

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(int(i))

    # ---- text <-> ids ------------------------------------------------------------------------------------------
    def encode(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
        """Token ids of ``text`` (no BOS/EOS added; special tokens written in the text, like ``</s>``, are matched)."""
        if isinstance(text, str):
            return self._tk.encode(_utf8(text, "text"), add_special_tokens=False).ids
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise MinibloomError(f"text: expected a string or a list of strings, got {type(text).__name__}")
        texts = [_utf8(t, f"text[{i}]") for i, t in enumerate(text)]
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def encode_batch(self, texts: Sequence[str], pad_token_id: int | None = None, *,
                     padding_side: str = "left") -> tuple[np.ndarray, np.ndarray]:
        """Padded ``(input_ids, attention_mask)`` [batch, longest] for ``texts``: on the left by default (BLOOM's
        ``padding_side``), on the right with ``padding_side="right"``."""
        rows = self.encode(list(texts))
        if not rows or any(len(r) == 0 for r in rows):
            raise MinibloomError("texts: every text must encode to at least one token")
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        if pad is None:
            raise MinibloomError(f"{self.path}: the tokenizer has no <pad> token; pass pad_token_id=")
        if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad < self.vocab_size:
            raise MinibloomError(f"pad_token_id: must be a token id (0 .. {self.vocab_size - 1}), got {shown(pad)}")
        return pad_rows(rows, pad, padding_side)

    def decode(self, ids, skip_special_tokens: bool = False):
        """Text of ``ids`` ([seq] -> str, [batch, seq] -> list of str). Special tokens are kept unless skipped."""
        if isinstance(ids, (str, bytes)):
            raise MinibloomError(f"ids: expected token ids (a list or an array of integers), got {type(ids).__name__}")
        try:
            a = np.asarray(ids)
        except (ValueError, TypeError, OverflowError):
            a = None
        if a is None or (a.size and a.dtype.kind not in "iu" and not (
                a.dtype == object and all(isinstance(i, int) and not isinstance(i, bool) for i in a.reshape(-1)))):
            raise MinibloomError(f"ids: expected integers, got {shown(ids)}")
        if a.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in a]
        if a.ndim > 2:
            raise MinibloomError(f"ids: expected [seq] or [batch, seq], got {a.ndim} dimensions")
        flat = [int(i) for i in a.reshape(-1)]
        bad = next((i for i in flat if not 0 <= i < 2**32), None)
        if bad is not None:  # ids past the vocabulary (a model's padded embedding rows) decode to nothing, as in HF
            raise MinibloomError(f"ids: {bad} is not a token id (ids are integers from 0)")
        return self._tk.decode(flat, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenization: ``push(id)`` returns the new text that is certainly complete (maybe ``""``).

    Keeps ids from ``prefix`` on; ``read`` marks where the already-returned text ends. The text of
    ``ids[prefix:]`` minus the text of ``ids[prefix:read]`` is new; it is held back while it ends in U+FFFD (an
    incomplete UTF-8 character). Decoding a window instead of one token at a time keeps byte-level merges and
    leading spaces right. ``flush()`` returns whatever is left at the end (a genuinely broken tail included).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._text(self.ids[self.prefix:self.read])
        text = self._text(self.ids[self.prefix:])
        if text.endswith(REPLACEMENT) or len(text) <= len(done):
            return ""  # wait for the rest of the character
        new = text[len(done):]
        self.prefix, self.read = self.read, len(self.ids)
        return new

    def extend(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """The held-back tail, if any (call once generation has ended)."""
        done = self._text(self.ids[self.prefix:self.read])
        text = self._text(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


def load_tokenizer(directory: str) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory (``tokenizer.json`` + optional ``tokenizer_config.json`` and
    ``special_tokens_map.json``), or None when there is no ``tokenizer.json``."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer as _Tokenizer

    try:
        tk = _Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception subclass
        raise MinibloomError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
    config = _read_json(os.path.join(directory, "special_tokens_map.json"))
    config.update(_read_json(os.path.join(directory, "tokenizer_config.json")))
    return Tokenizer(tk, config, path)
