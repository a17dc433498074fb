"""A training run's options (``TrainConfig``) and the checks of train()'s arguments, each a MinibloomError naming
the option before any work is done.

The defaults are the default model's run; the bounds are far beyond any NumPy run and small enough never to
overflow (the hostile-input tests of ``tests/test_hostile_training.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import MinibloomError, shown
from .optim import number

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, as in BLOOM


@dataclass
class TrainConfig:
    """Every choice of a run; saved in ``trainer_state.json`` and the model card. Defaults: the default model's."""

    steps: int = 458
    batch: int = 16  # sequences per optimizer step (split into ``accumulate`` micro-batches)
    accumulate: int = 1
    ctx: int = 256  # tokens per training window
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    seed: int = 1234
    dtype: str = "float32"
    val_fraction: float = 0.1  # the last 10% of the text's characters are held out
    eval_every: int = 0  # 0: evaluate at the end only
    eval_windows: int = 32  # held-out windows of a periodic evaluation (the final one uses all)
    save_every: int = 0
    # a new model (ignored when fine-tuning)
    vocab: int = 2000
    vocab_rows: int = 2048
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    post_ln: bool = False
    init_std: float = 0.02  # transformers' initializer_range

    def check(self) -> None:
        """Every field typed and within its bounds (a MinibloomError naming the field otherwise), before any work."""
        for name, (low, high) in INT_BOUNDS.items():
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or not low <= v <= high:
                raise MinibloomError(f"{name}: must be an integer in [{low}, {high}], got {shown(v)}")
            setattr(self, name, int(v))
        if self.batch % self.accumulate:
            raise MinibloomError(f"accumulate: {self.accumulate} does not divide batch {self.batch}")
        if self.ctx < 2:
            raise MinibloomError(f"ctx: a window needs at least 2 tokens, got {self.ctx}")
        for name in ("lr", "weight_decay", "eps", "grad_clip", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v) or v < 0:
                raise MinibloomError(f"{name}: must be a finite number >= 0, got {shown(v)}")
            setattr(self, name, float(v))
        self.min_lr_ratio = number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise MinibloomError(f"betas: must be a pair of numbers in [0, 1), got {shown(self.betas)}")
        self.betas = tuple(number("betas", b, 0.0, 1.0, hi_open=True) for b in self.betas)
        self.val_fraction = number("val_fraction", self.val_fraction, 0.0, 1.0)
        if not 0 < self.val_fraction < 1:
            raise MinibloomError(f"val_fraction: must be between 0 and 1, got {self.val_fraction!r}")
        if not isinstance(self.dtype, str) or self.dtype not in ("float32", "float64"):
            raise MinibloomError(f"dtype: train in 'float32' or 'float64', not {shown(self.dtype)}")
        if not isinstance(self.post_ln, (bool, np.bool_)):
            raise MinibloomError(f"post_ln: must be true or false, got {shown(self.post_ln)}")
        if self.hidden % self.heads:
            raise MinibloomError(f"hidden: {self.hidden} is not divisible by heads {self.heads}")
        if self.vocab < MIN_VOCAB:
            raise MinibloomError(f"vocab: {self.vocab} entries cannot hold the byte-level alphabet (256 bytes and "
                                 f"{len(SPECIAL_TOKENS)} special tokens: at least {MIN_VOCAB})")
        if self.vocab_rows < self.vocab:
            raise MinibloomError(f"vocab_rows: {self.vocab_rows} rows cannot hold a {self.vocab}-token vocabulary")
        n = self.vocab_rows * self.hidden + self.layers * 12 * self.hidden * (self.hidden + 1)
        if n > MAX_NEW_PARAMS:
            raise MinibloomError(f"hidden/layers/vocab_rows: a new model of {n:,} parameters is more than the "
                                 f"{MAX_NEW_PARAMS:,} minibloom trains in NumPy")


INT_BOUNDS = {  # (low, high) of every integer field: far beyond any NumPy run, small enough never to overflow
    "steps": (1, 10**9), "batch": (1, 2**16), "accumulate": (1, 2**16), "ctx": (1, 2**20),
    "eval_windows": (1, 10**9), "vocab": (1, 2**24), "vocab_rows": (1, 2**24), "hidden": (1, 2**16),
    "layers": (1, 2**12), "heads": (1, 2**12), "warmup": (0, 10**9), "eval_every": (0, 10**9),
    "save_every": (0, 10**9), "seed": (0, 2**63 - 1)}
MIN_VOCAB = 256 + 4  # the 256 byte tokens and SPECIAL_TOKENS
MAX_NEW_PARAMS = 2 * 10**10  # a new model's parameters (embedding + blocks) at most


def check_int(name: str, v, lo: int, hi: int) -> int:
    """``v`` as an int if it is an integer (not a bool) in [lo, hi]; a MinibloomError naming ``name`` otherwise."""
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or not lo <= v <= hi:
        raise MinibloomError(f"{name}: must be an integer in [{lo}, {hi}], got {shown(v)}")
    return int(v)


def path_arg(v, what: str) -> str:
    """``v`` as a str path (bytes decoded, ``os.PathLike`` resolved); an empty, NUL-holding or non-UTF-8 path, or
    anything else, is a MinibloomError naming ``what``."""
    if isinstance(v, bytes):
        try:
            v = os.fsdecode(v)
        except (UnicodeDecodeError, ValueError):
            raise MinibloomError(f"{what}: {v!r} is not a usable path") from None
    if not isinstance(v, (str, os.PathLike)):
        raise MinibloomError(f"{what}: expected a path, got {shown(v)}")
    v = os.fspath(v)
    if isinstance(v, bytes):
        return path_arg(v, what)
    if not v or "\x00" in v:
        raise MinibloomError(f"{what}: {v!r} is not a usable path")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise MinibloomError(f"{what}: {v!r} is not a usable path (not UTF-8)") from None
    return v


def check_memory(cfg: TrainConfig, hidden: int, layers: int, heads: int, vocab_rows: int) -> None:
    """Refuse a run that cannot fit this machine's memory, before anything is allocated: the weights, their gradients
    and AdamW's two moments, plus a lower estimate of one micro-batch's activations (a few per layer, the attention
    scores, the logits and their gradient). Each is a MinibloomError naming the options that set it."""
    from ..formats.lowmem import physical_memory

    item = np.dtype(cfg.dtype).itemsize
    n_params = vocab_rows * hidden + layers * 12 * hidden * (hidden + 1)
    micro, ctx = cfg.batch // cfg.accumulate, cfg.ctx
    weights = 4 * n_params * item
    acts = item * (micro * ctx * (layers * 10 * hidden + 2 * vocab_rows) + layers * micro * heads * ctx * ctx)
    ram = physical_memory()
    if weights + acts > ram:
        raise MinibloomError(f"batch/ctx/model size: a training step needs at least {(weights + acts) / 2**30:.1f} "
                             f"GiB ({weights / 2**30:.1f} GiB of weights, gradients and moments, "
                             f"{acts / 2**30:.1f} GiB of activations for {micro} x {ctx} tokens), more than this "
                             f"machine's {ram / 2**30:.1f} GiB: lower batch or ctx, or raise accumulate")
