"""Where minibloom finds its files: the clone (or installed copy) and its ``weights/`` folder."""

from __future__ import annotations

import os
import sys

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
