"""Low-memory mode: keep the checkpoint memory-mapped in its stored (16-bit) dtype and widen one layer at a time.

A BLOOM checkpoint stored in float16/bfloat16 takes twice its file size in float32 (four times in float64), so
bloom-7b1 (~14 GB in float16) does not fit a 24 GB machine once widened. ``load(..., low_memory=True)`` builds the
parameter tree lazily instead; the maths is unchanged (the forward pass is ``minibloom.model.forward``):

- ``params["h"]`` is a sequence of layers; reading layer ``i`` converts its tensors from the memory map to the
  compute dtype (the same conversion ``read_params`` does) and the caller drops them after use. Iterating over it
  (what the forward pass does) also returns the mapped pages of the finished layer to the page cache, so the
  process holds about one widened layer at a time.
- the embedding ``[V, C]`` is never widened in full: the input rows are gathered from the map on demand, and the
  tied output head ``x @ E.T`` is computed in blocks of rows, each widened, used and dropped.

Numbers are those of the normal mode: the same conversions, and the head's blocks split the output columns only (each
logit is still one dot product over C). Only the NumPy backend is supported (the point is host RAM).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..config import BloomConfig
from ..errors import MinibloomError
from .safetensors import bf16_to_f32
from .weights import LAYER_TENSORS, Checkpoint, check_finite, check_tensors, nest

HEAD_BLOCK_BYTES = 64 * 2**20  # widened bytes per block of the output head


def _widen(raw: np.ndarray, stored: str, dtype) -> np.ndarray:
    """Stored values (BF16 as uint16 bit patterns) -> a new array of ``dtype``."""
    if stored == "BF16":
        return bf16_to_f32(raw).astype(dtype, copy=False)
    return raw.astype(dtype)


class LazyMatrix:
    """A ``[V, C]`` matrix (the embedding / output head) left in the memory map in its stored dtype.

    Supports what the forward pass asks of it: ``shape``, ``dtype`` (the compute dtype), ``take(ids, axis=0)``
    (gather rows, widened) and ``x @ m.mT`` (computed in row blocks of the matrix). NumPy defers ``@`` to us
    because ``__array_ufunc__`` is None.
    """

    __array_ufunc__ = None

    def __init__(self, ckpt: Checkpoint, name: str, dtype):
        self.ckpt, self.name = ckpt, name
        self.stored = ckpt.info(name).dtype
        self.raw = ckpt.raw(name)
        self.shape = tuple(self.raw.shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 2

    def __array_namespace__(self, api_version=None):
        return np

    def __repr__(self) -> str:
        return f"LazyMatrix({self.name!r}, shape={self.shape}, stored {self.stored}, computes in {self.dtype})"

    def take(self, indices, axis=None, out=None, mode="raise"):
        if axis != 0 or out is not None:
            raise MinibloomError(f"{self.name}: low-memory matrices support take(ids, axis=0) only")
        rows = self.raw[np.asarray(indices)]  # fancy indexing copies just these rows out of the map
        return check_finite(_widen(rows, self.stored, self.dtype), self.ckpt.describe(self.name))

    def __array__(self, dtype=None, copy=None):
        raise MinibloomError(f"{self.name}: refusing to widen the whole {self.shape} matrix in low-memory mode")

    @property
    def mT(self) -> "_Transposed":
        return _Transposed(self)

    def rmatmul_t(self, x: np.ndarray) -> np.ndarray:
        """``x @ self.T`` for x [N, C] -> [N, V], one block of rows of the matrix at a time."""
        V, C = self.shape
        out = np.empty((x.shape[0], V), dtype=np.result_type(x.dtype, self.dtype))
        step = max(1, HEAD_BLOCK_BYTES // (C * self.dtype.itemsize))
        itemsize = self.raw.dtype.itemsize
        for lo in range(0, V, step):
            hi = min(V, lo + step)
            block = check_finite(_widen(self.raw[lo:hi], self.stored, self.dtype), self.ckpt.describe(self.name))
            np.matmul(x, block.T, out=out[:, lo:hi])
            self.ckpt.release(self.name, lo * C * itemsize, hi * C * itemsize)
        return out


class _Transposed:
    __array_ufunc__ = None

    def __init__(self, m: LazyMatrix):
        self.m = m
        self.shape = m.shape[::-1]
        self.dtype = m.dtype

    def __rmatmul__(self, x):
        x = np.asarray(x)
        if x.ndim != 2:
            raise MinibloomError(f"{self.m.name}: low-memory head expects [tokens, C] inputs, got {x.shape}")
        return self.m.rmatmul_t(x)


class LazyLayers(Sequence):
    """``params["h"]``: layer ``i`` is widened from the memory map when read; iterate to stream through them."""

    def __init__(self, ckpt: Checkpoint, cfg: BloomConfig, dtype):
        self.ckpt, self.cfg, self.dtype = ckpt, cfg, np.dtype(dtype)

    def __len__(self) -> int:
        return self.cfg.n_layer

    def names(self, i: int) -> list[str]:
        return [f"h.{i}.{name}" for name, _ in LAYER_TENSORS]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"layer {i} out of range for {len(self)} layers")
        layer = nest({name.split(".", 2)[2]: check_finite(self.ckpt.get(name, self.dtype), self.ckpt.describe(name))
                      for name in self.names(i)})
        del layer["h"]  # nest() always adds the (here empty) layer list
        return layer

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
            for name in self.names(i):  # the caller has moved on: drop this layer's mapped pages from our RSS
                self.ckpt.release(name)

    def __repr__(self) -> str:
        return f"LazyLayers({len(self)} layers, widened to {self.dtype} on access)"


def lazy_params(ckpt: Checkpoint, cfg: BloomConfig, np_dtype, backend=None) -> dict:
    """The parameter tree of ``read_params`` with layers and embedding left in the memory map (see module doc)."""
    if backend is not None and getattr(backend, "name", "numpy") != "numpy":
        raise MinibloomError(f"low_memory: only the numpy backend is supported, not {backend.name!r}")
    check_tensors(ckpt, cfg, ckpt.files[0].path)
    small = ("word_embeddings_layernorm.weight", "word_embeddings_layernorm.bias", "ln_f.weight", "ln_f.bias")
    params = nest({name: check_finite(ckpt.get(name, np_dtype), ckpt.describe(name)) for name in small})
    params["word_embeddings"] = {"weight": LazyMatrix(ckpt, "word_embeddings.weight", np_dtype)}
    if not cfg.tie_word_embeddings and "lm_head.weight" in ckpt.where:
        params["lm_head"] = {"weight": LazyMatrix(ckpt, "lm_head.weight", np_dtype)}
    params["h"] = LazyLayers(ckpt, cfg, np_dtype)
    return params
