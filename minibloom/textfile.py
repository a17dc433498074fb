"""Reading a user's text file (a corpus to score or train on): every way it can be unusable is a MinibloomError."""

from __future__ import annotations

import os

from .errors import MinibloomError


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; a missing, unreadable, binary or empty file is a MinibloomError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MinibloomError(f"{path}: is a directory; give a text file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise MinibloomError(f"{path}: no such file") from None
    except OSError as e:
        raise MinibloomError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinibloomError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if "\x00" in text:
        raise MinibloomError(f"{path}: not a text file (it holds NUL bytes)")
    if not text.strip():
        raise MinibloomError(f"{path}: the file is empty")
    return text
