"""Weights kept in their quantized blocks and widened only while a layer runs.

A GGUF file stores each matrix as blocks (Q8_0: 32 int8 values + one fp16 scale, 34 bytes for 32 weights, see
llama.cpp ``ggml/src/ggml-common.h``). ``QuantizedWeight`` holds those bytes (a read-only view of the memory-mapped
file, so they cost no RAM until touched) and dequantizes with the ``gguf`` package (``gguf.quants.dequantize``, pure
NumPy). ``LazyLayer`` is one BLOOM block whose sub-modules (``self_attention``, ``mlp``, the LayerNorms) are built
on each ``__getitem__``: ``minibloom.model.block`` reads ``p["self_attention"]`` once, uses the float weights, and
drops them when it returns, so at most one sub-module of one layer is ever held in floating point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ...errors import MinibloomError


class QuantizedWeight:
    """A GGUF tensor still in its blocks: ``dequantize(dtype)`` -> float array with the NumPy (out, in) shape.

    ``post`` is applied to the float result (e.g. the inverse of llama.cpp's QKV regrouping).
    """

    def __init__(self, data: np.ndarray, qtype, shape: tuple[int, ...], name: str,
                 post: Callable[[np.ndarray], np.ndarray] | None = None):
        self.data, self.qtype, self.shape, self.name, self.post = data, qtype, tuple(shape), name, post

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        w = dequantize(self.data, self.qtype, self.name)
        if w.shape != self.shape:
            raise MinibloomError(f"{self.name}: dequantized to shape {list(w.shape)}, expected {list(self.shape)}")
        if self.post is not None:
            w = self.post(w)
        return w.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.name}, {getattr(self.qtype, 'name', self.qtype)}, {list(self.shape)})"


def dequantize(data: np.ndarray, qtype, name: str = "tensor") -> np.ndarray:
    """GGUF block bytes (or an F32/F16 array) -> float32, through ``gguf.quants.dequantize``; errors name ``name``."""
    from gguf import quants

    try:
        out = quants.dequantize(np.asarray(data), qtype)
    except NotImplementedError:
        raise MinibloomError(f"{name}: GGUF type {getattr(qtype, 'name', qtype)} has no dequantizer "
                             "in the installed gguf package") from None
    except (ValueError, AssertionError) as e:
        raise MinibloomError(f"{name}: cannot dequantize {getattr(qtype, 'name', qtype)} data ({e})") from None
    return np.asarray(out, dtype=np.float32)


def _materialize(node, dtype, asarray):
    if isinstance(node, QuantizedWeight):
        return asarray(node.dequantize(dtype))
    if isinstance(node, dict):
        return {k: _materialize(v, dtype, asarray) for k, v in node.items()}
    return node


class LazyLayer(Mapping):
    """One transformer block whose quantized matrices are dequantized on access.

    ``layer["self_attention"]`` returns a fresh dict of float arrays (``dtype``, moved to the backend by
    ``asarray``); nothing is cached, so the floats live only as long as the caller holds them.
    """

    def __init__(self, tree: dict, dtype, asarray: Callable = np.asarray):
        self._tree, self._dtype, self._asarray = tree, np.dtype(dtype), asarray

    def __getitem__(self, key):
        return _materialize(self._tree[key], self._dtype, self._asarray)

    def __iter__(self):
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    @property
    def quantized_bytes(self) -> int:
        """Bytes of the blocks this layer keeps (what it costs in RAM once the file pages are touched)."""
        def walk(n):
            if isinstance(n, QuantizedWeight):
                return n.nbytes
            if isinstance(n, dict):
                return sum(walk(v) for v in n.values())
            return int(getattr(n, "nbytes", 0))
        return walk(self._tree)

    def __repr__(self) -> str:
        return f"LazyLayer({list(self._tree)})"
