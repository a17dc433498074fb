"""BLOOM hyper-parameters, read from a Hugging Face ``config.json``.

Follows ``transformers/models/bloom/configuration_bloom.py``. Two spellings exist in the wild: what
``save_pretrained`` writes today (``hidden_size``, ``n_head``, ``dtype``) and the original bigscience hub files
(``n_embed``, ``num_attention_heads``, ``torch_dtype``, plus keys HF ignores such as ``offset_alibi``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import MinibloomError, shown
from .jsonfile import read_json_object

DTYPES = {"float32": np.float32, "float64": np.float64}  # the compute dtypes a model loads in

# canonical name -> other spellings accepted (first match wins)
_ALIASES = {
    "hidden_size": ("hidden_size", "n_embed", "n_embd"),
    "n_head": ("n_head", "num_attention_heads"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "torch_dtype": ("dtype", "torch_dtype"),
}


# Upper bounds on a config's sizes, checked before anything is built from them. Each admits every released BLOOM
# (bloom-176b: vocab 250880, hidden 14336, 70 layers, 112 heads) with a wide margin, and keeps a forged value (10^9
# layers, a 2^40 vocabulary) from turning into minutes of work or an impossible allocation.
MAXIMA = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "n_layer": 1 << 12, "n_head": 1 << 12,
          "pretraining_tp": 1 << 12}
MAX_EPSILON = 1.0  # layer_norm_epsilon: a constant added to a variance; BLOOMs use 1e-5


@dataclass(frozen=True)
class BloomConfig:
    """The numbers that fix a BLOOM model's shape and numerics (HF ``BloomConfig`` field names)."""

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    pretraining_tp: int = 1
    slow_but_exact: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 3
    unk_token_id: int | None = 0
    torch_dtype: str | None = None
    quantization_config: dict | None = field(default=None, compare=False)
    name_or_path: str = ""

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    def n_params(self, vocab_size: int | None = None) -> int:
        """Parameter count (embedding counted once: the head is tied)."""
        V, C, L = vocab_size or self.vocab_size, self.hidden_size, self.n_layer
        per_layer = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
        return V * C + 2 * C + L * per_layer + 2 * C

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> "BloomConfig":
        """Build and validate a config from a ``config.json`` dict; errors name ``source``."""
        if not isinstance(d, dict):
            raise MinibloomError(f"{source}: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type", "bloom")
        if mt not in ("bloom", None):
            raise MinibloomError(f"{source}: model_type is {mt!r}, not 'bloom'")
        kw: dict[str, Any] = {}
        for name in ("vocab_size", "layer_norm_epsilon", "apply_residual_connection_post_layernorm",
                     "pretraining_tp", "slow_but_exact", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                     "pad_token_id", "unk_token_id", "quantization_config"):
            if name in d:
                kw[name] = d[name]
        for name, spellings in _ALIASES.items():
            for s in spellings:
                if s in d and d[s] is not None:
                    kw[name] = d[s]
                    break
        for name in ("hidden_size", "n_head", "n_layer"):
            if name not in kw:
                raise MinibloomError(f"{source}: missing {' / '.join(_ALIASES[name])}")
        if kw.get("torch_dtype") is not None:
            kw["torch_dtype"] = str(kw["torch_dtype"]).replace("torch.", "")
        cfg = cls(**kw)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BloomConfig":
        path = os.fspath(path)
        return cls.from_dict(read_json_object(path), source=path)

    def validate(self, source: str = "config") -> None:
        def pos_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise MinibloomError(f"{source}: {name} must be a positive integer, got {v!r}")
            if v > MAXIMA[name]:
                raise MinibloomError(f"{source}: {name} = {v} is larger than any BLOOM (at most {MAXIMA[name]})")

        for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "pretraining_tp"):
            pos_int(name)
        if self.pretraining_tp > self.hidden_size:
            raise MinibloomError(f"{source}: pretraining_tp {self.pretraining_tp} is more slices than hidden_size "
                                 f"{self.hidden_size} has columns")
        if self.hidden_size % self.pretraining_tp:  # BLOOM was trained on tp slices of equal width
            raise MinibloomError(f"{source}: hidden_size {self.hidden_size} is not divisible by pretraining_tp "
                                 f"{self.pretraining_tp}")
        if self.hidden_size % self.n_head:
            raise MinibloomError(f"{source}: hidden_size {self.hidden_size} is not divisible by n_head {self.n_head}")
        eps = self.layer_norm_epsilon
        # an int of hundreds of digits cannot become a float (OverflowError): compare before converting
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= MAX_EPSILON or \
                not math.isfinite(float(eps)):
            raise MinibloomError(f"{source}: layer_norm_epsilon must be a number in (0, {MAX_EPSILON:g}], got "
                                 f"{shown(eps)}")
        for name in ("apply_residual_connection_post_layernorm", "slow_but_exact", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise MinibloomError(f"{source}: {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            v = getattr(self, name)
            # an id the vocabulary does not hold would fail only when generation first stops or pads
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size):
                raise MinibloomError(f"{source}: {name} must be a token id (0 .. {self.vocab_size - 1}) or "
                                     f"null, got {v!r}")
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise MinibloomError(f"{source}: quantization_config must be an object")
