"""Reading a user's files (a corpus to score or train on, conversations, a trainer state): every way one can be
unusable is a MinibloomError naming it.

Only regular files are opened: a FIFO would block ``open`` forever, ``/dev/zero`` never ends, a directory or a
socket cannot be read. The file is opened without blocking (``O_NONBLOCK``: opening a FIFO then returns at once) and
checked with ``fstat`` on the opened descriptor, so what is read is what was checked. A whole-file read is bounded
(``MAX_TEXT_BYTES`` for text) before anything is read.
"""

from __future__ import annotations

import os
import stat

from .errors import MinibloomError

MAX_TEXT_BYTES = 1 << 30  # 1 GiB: a text file read whole (and decoded to a str several times its size) stays below


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: str | os.PathLike, what: str = "") -> str:
    """``path`` (as a str) if it names an existing regular file (symlinks followed); a MinibloomError naming it (and
    ``what``, e.g. "--data") otherwise. Nothing is opened."""
    path = _fspath(path, what)
    label = f"{what}: {path}" if what else path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MinibloomError(f"{label}: no such file") from None
    except (OSError, ValueError) as e:
        raise MinibloomError(f"{label}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise MinibloomError(f"{label}: is {_kind(st.st_mode)}; give a regular file")
    return path


def _fspath(path, what: str) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise MinibloomError(f"{what or 'path'}: expected a file path, got {type(path).__name__}") from None
    if isinstance(path, bytes):
        try:
            path = os.fsdecode(path)
        except (UnicodeDecodeError, ValueError):
            raise MinibloomError(f"{what or 'path'}: {path!r} is not a usable file name") from None
    if not path or "\x00" in path:
        raise MinibloomError(f"{what or 'path'}: {path!r} is not a usable file name")
    return path


def read_bytes(path: str | os.PathLike, max_bytes: int, what: str = "") -> bytes:
    """The whole of the regular file ``path``, refused (before reading) when it holds more than ``max_bytes``."""
    path = check_regular(path, what)  # stat first: a socket or a device is named as such, never opened
    label = f"{what}: {path}" if what else path
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MinibloomError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise MinibloomError(f"{label}: is a directory; give a regular file") from None
    except (OSError, ValueError) as e:
        raise MinibloomError(f"{label}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MinibloomError(f"{label}: is {_kind(st.st_mode)}; give a regular file")
        if st.st_size > max_bytes:
            raise MinibloomError(f"{label}: {st.st_size} bytes, more than the {max_bytes} read whole at most")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise MinibloomError(f"{label}: cannot read it ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:  # it grew after the check
        raise MinibloomError(f"{label}: more than the {max_bytes} bytes read whole at most")
    return raw


def read_text(path: str | os.PathLike, what: str = "", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 text file's contents; a missing, unreadable, special (FIFO, device, directory), too large, binary or
    empty file is a MinibloomError naming it (and ``what``, the option that gave it)."""
    path = _fspath(path, what)
    label = f"{what}: {path}" if what else path
    raw = read_bytes(path, max_bytes, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinibloomError(f"{label}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if "\x00" in text:
        raise MinibloomError(f"{label}: not a text file (it holds NUL bytes at offset {raw.index(0)})")
    if not text.strip():
        raise MinibloomError(f"{label}: the file is empty")
    return text
