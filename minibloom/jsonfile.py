"""JSON from files minibloom does not trust (config.json, safetensors headers, shard indexes, tokenizer configs,
generation configs, bitsandbytes quant states, trace metadata): bounded in size and nesting before it is parsed,
strict about ``NaN``/``Infinity`` and duplicate keys, and every failure a ``MinibloomError`` naming the source.

Python's ``json`` recurses once per nesting level, so ``'[' * 100000`` raises ``RecursionError`` (not a
``ValueError``) from deep inside the parser; ``check_depth`` walks the text once, outside strings, and refuses it
first. Callers then check the fields they use with ``field``.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np

from .errors import MinibloomError, shown
from .textfile import read_bytes  # a regular file only (a FIFO would block), its size checked before reading

MAX_DEPTH = 64  # real BLOOM configs nest 3 levels deep, tokenizer.json about 6
MAX_BYTES = 64 * 2**20  # several times BLOOM's own tokenizer.json (250880 tokens)


def check_depth(text: str, where: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse JSON text nested deeper than ``max_depth`` (brackets counted outside string literals, in C speed: the
    strings are cut out by a regular expression and the running depth is a cumulative sum)."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    bare = _STRING.sub("", text).encode("utf-8", "replace")
    b = np.frombuffer(bare, np.uint8)
    step = (b == ord("[")).astype(np.int64) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
    if step.size and int(np.cumsum(step).max()) > max_depth:
        raise MinibloomError(f"{where}: JSON nested deeper than {max_depth} levels")


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def _no_duplicates(where: str):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise MinibloomError(f"{where}: duplicate key {k!r}")
            out[k] = v
        return out
    return hook


class _Constant:
    """What a ``NaN`` / ``Infinity`` / ``-Infinity`` literal parses to, so the error can name the key holding it."""

    def __init__(self, name: str):
        self.name = name


def _no_constant(where: str):
    return _Constant


def parse_json(text: str | bytes, where: str, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON ``text``; ``where`` (a file name, "trace meta" ...) names it in every error."""
    if len(text) > max_bytes:
        raise MinibloomError(f"{where}: {len(text)} bytes of JSON, more than the {max_bytes} allowed")
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MinibloomError(f"{where}: not valid JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    check_depth(text, where, max_depth)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates(where), parse_constant=_no_constant(where))
    except RecursionError:
        raise MinibloomError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        if isinstance(e, MinibloomError):
            raise
        raise MinibloomError(f"{where}: not valid JSON ({e})") from None
    _check_floats(value, where)
    return value


def _bad_number(v: Any) -> bool:
    return isinstance(v, _Constant) or (isinstance(v, float) and not math.isfinite(v))


def _check_floats(value: Any, where: str) -> None:
    """No ``NaN`` / ``Infinity`` literal (parsed to ``_Constant``) and no huge exponent (``1e999`` parses to inf
    without going through ``parse_constant``); the error names the key that holds it (found by a second walk, so
    a good file pays for no key paths)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if _bad_number(v):
            _raise_bad_number(value, where)
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _raise_bad_number(value: Any, where: str) -> None:
    stack = [(value, "")]
    while stack:
        v, key = stack.pop()
        if _bad_number(v):
            if isinstance(v, _Constant):
                raise MinibloomError(f"{where}: {key + ' = ' if key else ''}{v.name} is not valid JSON (only finite "
                                     "numbers are)")
            raise MinibloomError(f"{where}: {key + ': ' if key else ''}a number out of range (only finite numbers "
                                 "are allowed)")
        if isinstance(v, dict):
            stack.extend((x, f"{key}.{k}" if key else str(k)) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, f"{key}[{i}]") for i, x in enumerate(v))


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in file ``path`` (size checked before reading)."""
    path = os.fspath(path)
    raw = read_bytes(path, max_bytes)
    return parse_json(raw, path, max_bytes=max_bytes, max_depth=max_depth)


def read_json_object(path: str | os.PathLike, **kw) -> dict:
    """``read_json`` for files that must hold a JSON object (config.json and friends)."""
    value = read_json(path, **kw)
    if not isinstance(value, dict):
        raise MinibloomError(f"{os.fspath(path)}: expected a JSON object, found {type(value).__name__}")
    return value


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
          dict: "an object"}


def field(obj: dict, key: str, kind: type, where: str, *, default: Any = ..., lo: float | None = None,
          hi: float | None = None) -> Any:
    """``obj[key]`` checked to be of ``kind`` (int excludes bool; float accepts int) and within ``[lo, hi]``."""
    if key not in obj or obj[key] is None:
        if default is ...:
            raise MinibloomError(f"{where}: {key!r} is missing")
        return default
    v = obj[key]
    ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else \
        (isinstance(v, (int, float)) and not isinstance(v, bool)) if kind is float else isinstance(v, kind)
    if not ok:
        raise MinibloomError(f"{where}: {key!r} must be {_KINDS.get(kind, kind.__name__)}, got {shown(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise MinibloomError(f"{where}: {key!r} = {shown(v)} is outside [{lo}, {hi}]")
    return v
