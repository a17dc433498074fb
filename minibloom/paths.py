"""Where minibloom finds its files: the clone (or installed copy) and its ``weights/`` folder."""

from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = "default"  # weights/default: the small Shakespeare BLOOM trained by scripts/train_default.py


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
