"""Where minibloom finds its files (the clone or installed copy, its ``weights/`` folder), and how an output
directory is replaced whole (``new_dir`` beside it, then ``swap_in``)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from .errors import MinibloomError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = "tinyshakespeare.txt"  # data/: the default model's training text (public domain)
DEFAULT_MODEL = "default"  # weights/default: the small Shakespeare BLOOM (trained by `minibloom train`)


def weights_dir() -> str:
    """Where checkpoints live: $MINIBLOOM_WEIGHTS, else the repository's ``weights/`` (or the installed copy)."""
    env = os.environ.get("MINIBLOOM_WEIGHTS")
    if env:
        return env
    for d in (os.path.join(REPO_ROOT, "weights"), os.path.join(sys.prefix, "share", "minibloom", "weights")):
        if os.path.isdir(d):
            return d
    return os.path.join(REPO_ROOT, "weights")


def default_model_path() -> str:
    return os.path.join(weights_dir(), DEFAULT_MODEL)


def corpus_path() -> str:
    """The bundled training text (Tiny Shakespeare): the clone's ``data/`` or the installed copy."""
    for d in (os.path.join(REPO_ROOT, "data"), os.path.join(sys.prefix, "share", "minibloom", "data")):
        if os.path.isfile(os.path.join(d, CORPUS)):
            return os.path.join(d, CORPUS)
    return os.path.join(REPO_ROOT, "data", CORPUS)


def new_dir(parent: str, prefix: str) -> str:
    """A new empty directory in ``parent`` with the permissions of any other (``mkdtemp``'s would be private)."""
    import secrets

    while True:
        path = os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def swap_in(new: str, out: str, keep: tuple = (), what: str = "out") -> None:
    """Directory ``new`` becomes ``out``; the old ``out`` (if any) is removed, bar its sub-directories ``keep``. A
    failure leaves the old ``out`` as it was (a MinibloomError naming ``what``)."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise MinibloomError(f"{what}: {out} exists and is not a directory; it is not replaced")
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.rename(out, old)  # onto the empty directory just made (POSIX rename replaces an empty one)
    try:
        os.rename(new, out)
    except OSError as e:
        os.rename(old, out)
        raise MinibloomError(f"{what}: cannot replace {out} ({e.strerror or e}); it is unchanged") from None
    for name in keep:
        if os.path.isdir(os.path.join(old, name)) and not os.path.lexists(os.path.join(out, name)):
            os.rename(os.path.join(old, name), os.path.join(out, name))
    shutil.rmtree(old, ignore_errors=True)
