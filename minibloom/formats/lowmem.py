"""Low-memory mode: a memory budget, the layers that fit it widened once, the rest widened block by block as used.

A BLOOM checkpoint stored in float16/bfloat16 takes twice its file size in float32 (four times in float64), so
bloom-7b1 (~14 GB in float16) does not fit a 24 GB machine once widened. ``load(..., low_memory=True,
max_memory="16GB")`` (the spirit of accelerate's ``max_memory``) splits the weights instead:

- the small tensors (biases, LayerNorms) and, in layer order, as many whole layers as fit the budget are read and
  widened at load, as in the normal mode, and stay resident;
- every other weight matrix (and the embedding / tied head unless it fits after all the layers) stays in the memory
  map in its stored dtype as a ``LazyMatrix``. The linear primitive's ``x @ W.mT`` on it widens a block of W's rows
  into a reused buffer that stays in cache, multiplies it, and goes on to the next block (``LazyMatrix.rmatmul_t``);
  a whole matrix is never widened. Few input rows (decoding) are memory-bound: each core takes its share of the rows,
  one block at a time, widening it (straight through ``native``'s C kernel where there is one, which also
  flags inf and NaN) and multiplying it on that core alone (``backend.blas_threads``). Many rows
  (a long prompt) are compute-bound: every core widens a bigger block together and BLAS multiplies it on all cores.
  The embedding rows a forward pass needs are gathered from the map.

The budget counts what the weights hold in RAM (resident tensors and the widening buffers); activations, the KV cache
and the logits come on top. Without ``max_memory`` the budget keeps the process within 80% of physical memory less a
margin and leaves room in the page cache for the 16-bit rest of the file, which each forward pass reads again. To
keep that rest cached, loading tells the kernel that a resident tensor's 16-bit bytes are not needed any more, and
that the lazy ones are (``posix_fadvise``; the next load reads the resident ones from disk again, as it would once
decoding had pushed them out of the cache anyway).

Numbers are those of the normal mode: the same conversions (``widen``), and a block of rows changes no dot product
(each output is still one product over C; BLAS may round a narrower product differently). Only the NumPy backend is
supported (the point is host RAM).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from ..backend import blas_threads
from ..config import BloomConfig
from ..errors import MinibloomError, shown
from .weights import LAYER_TENSORS, Checkpoint, _progress, check_finite, check_tensors, nest
from . import native
from .widen import THREADS, pool, scratch, widen_into

FEW_BLOCK_BYTES = 1 << 20  # widened bytes per block for few input rows: one block per core, in its L2 cache
MANY_BLOCK_BYTES = 128 << 20  # ... for many input rows: big enough for BLAS to run near full speed
RELEASE_BYTES = 64 << 20  # mapped 16-bit bytes a thread reads before handing their pages back (see _rows)
MANY_ROWS = 32  # from this many input rows on, a product is compute-bound (see the module doc)
MARGIN = 2 << 30  # what the default budget leaves to the system and the rest of the process
RSS_SHARE = 0.8  # the default budget stays under this share of physical memory (less MARGIN)
MATRICES = ("self_attention.query_key_value.weight", "self_attention.dense.weight", "mlp.dense_h_to_4h.weight",
            "mlp.dense_4h_to_h.weight")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


MAX_MEMORY = 2**60  # bytes: a budget above this (an exbibyte) is no budget a machine has; refused, never overflowed


def parse_memory(value) -> int:
    """``max_memory`` as bytes: an int (bytes) or a string such as "18GB", "18GiB", "500MB", "1.5 GB", at most
    ``MAX_MEMORY``. The string is matched with bounded digits, so "9" * 400 + "GB" is refused, not an overflow."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([KMGT]I?B|B)?\s*", value.upper(), flags=re.ASCII)
        if not m:
            raise MinibloomError(f"max_memory: {shown(value)} is not a size (use bytes, or a string like '18GB', "
                                 "'18GiB', '500MB')")
        whole, _, frac = m.group(1).partition(".")
        unit = _UNITS[m.group(2) or ""]
        n = int(whole) * unit + (int(frac) * unit) // 10 ** len(frac) if frac else int(whole) * unit
    else:
        raise MinibloomError(f"max_memory: expected bytes (int) or a string like '18GB', got {type(value).__name__}")
    if n < 0:
        raise MinibloomError(f"max_memory: must not be negative, got {shown(value)}")
    if n > MAX_MEMORY:
        raise MinibloomError(f"max_memory: {shown(value)} is more than {MAX_MEMORY} bytes (2^60), more than any "
                             "machine has")
    return n


def physical_memory() -> int:
    """This machine's RAM in bytes (or the cgroup's memory.max, if lower)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap != "max":
            ram = min(ram, int(cap))
    except (OSError, ValueError):
        pass
    return ram


def default_budget(file_bytes: int, widening: float, ram: int | None = None) -> int:
    """The budget when none is given: at most ``RSS_SHARE`` of RAM less ``MARGIN``, and small enough that the
    resident widened tensors plus the 16-bit bytes left in the file (``file_bytes`` of lazily widened candidates,
    each byte resident costs ``widening`` bytes) fit in RAM less ``MARGIN``: those are read again on every pass."""
    ram = physical_memory() if ram is None else ram
    cap = RSS_SHARE * ram - MARGIN
    # R resident widened bytes leave file_bytes - R / widening bytes to the page cache: R + that <= ram - MARGIN
    fit = (ram - MARGIN - file_bytes) / (1 - 1 / widening) if widening > 1 else cap
    return int(max(0.0, min(cap, fit)))


class LazyMatrix:
    """A ``[rows, cols]`` weight left in the memory map in its stored dtype, widened block by block as it is used.

    Supports what the forward pass asks of a weight matrix: ``shape``, ``dtype`` (the compute dtype), ``x @ m.mT``
    (``rmatmul_t``, in row blocks), ``take(ids, axis=0)`` (gather rows, widened; the embedding) and ``m[:, a:b]``
    (a column slice, still lazy; the ``pretraining_tp`` products). NumPy defers ``@`` to us because
    ``__array_ufunc__`` is None. Values are checked finite the first time each block is widened.
    """

    __array_ufunc__ = None

    def __init__(self, ckpt: Checkpoint, name: str, dtype, raw: np.ndarray | None = None):
        self.ckpt, self.name = ckpt, name
        self.stored = ckpt.info(name).dtype
        self.raw = ckpt.raw(name) if raw is None else raw
        self.shape = tuple(self.raw.shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 2
        self.where = ckpt.describe(name)
        self.full = raw is None  # the whole tensor (not a column slice): its row blocks are whole pages of the map
        self.checked = False  # every value seen finite by a full product

    def __array_namespace__(self, api_version=None):
        return np

    def __repr__(self) -> str:
        return f"LazyMatrix({self.name!r}, shape={self.shape}, stored {self.stored}, computes in {self.dtype})"

    @property
    def nbytes(self) -> int:
        """Bytes the matrix would take widened."""
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def _widen(self, src: np.ndarray, out: np.ndarray, check: bool, threads: int | None = 1, row: int = 0):
        """``src`` (rows from ``row`` on) widened into ``out``, checked finite if ``check``."""
        if self.stored in ("F16", "BF16"):
            return widen_into(src, self.stored, out, where=self.where if check else None, threads=threads,
                              finite=not check, offset=row * self.shape[1])
        np.copyto(out, src)
        return check_finite(out, self.where) if check else out

    def take(self, indices, axis=None, out=None, mode="raise"):
        if axis != 0 or out is not None:
            raise MinibloomError(f"{self.name}: low-memory matrices support take(ids, axis=0) only")
        rows = self.raw[np.asarray(indices)]  # fancy indexing copies just these rows out of the map
        return self._widen(rows, np.empty(rows.shape, self.dtype), check=True)

    def __getitem__(self, key):
        if (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)):
            part = LazyMatrix(self.ckpt, self.name, self.dtype, self.raw[key])
            part.checked = self.checked
            part.where = f"{self.where} (columns {key[1].start}:{key[1].stop}; flat index within them)"
            return part
        raise MinibloomError(f"{self.name}: low-memory matrices support m[:, a:b] only, not {key!r}")

    def __array__(self, dtype=None, copy=None):
        raise MinibloomError(f"{self.name}: refusing to widen the whole {self.shape} matrix in low-memory mode")

    @property
    def mT(self) -> "_Transposed":
        return _Transposed(self)

    @property
    def T(self) -> "_Transposed":
        return _Transposed(self)

    def _release(self, lo: int, hi: int) -> None:
        """Drop the mapped pages of rows lo:hi from our RSS (the page cache keeps them); a column slice's rows are
        not contiguous in the file, so it drops the whole tensor's at the end of each product instead."""
        if self.full:
            self.ckpt.release(self.name, lo * self.raw.strides[0], hi * self.raw.strides[0])

    def _rows(self, xt: np.ndarray, out: np.ndarray, lo: int, hi: int, step: int, check: bool) -> None:
        """out[lo:hi] = W[lo:hi] @ xt for xt [cols, N] (out [rows, N]), one block of ``step`` rows at a time in this
        thread's reused buffer (OpenBLAS runs a block times a few columns faster than a few rows times a transposed
        block)."""
        cols = self.shape[1]
        buf = scratch(step * cols, self.dtype, "lazy")
        done = lo  # rows up to here have had their mapped pages released
        batch = max(step, RELEASE_BYTES // max(1, self.raw.strides[0]))
        # whole blocks go straight to the C kernel (if there is one): per-block Python work is what two threads
        # contend for (the GIL) while the kernel itself runs at memory speed. The kernel flags a block holding an
        # inf or NaN, which the general path then widens again and names (so it checks as it goes)
        fn = native.kernel(self.stored, self.dtype) if self.full and self.stored in ("F16", "BF16") else None
        if fn is not None:
            bits, whole = self.raw.view(np.uint16), buf.reshape(step, cols)
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            if fn is not None and b - a == step and not fn(bits[a:b], whole):
                block = whole
            else:  # the general path (it also names an inf / NaN found in a flagged block)
                block = self._widen(self.raw[a:b], buf[:(b - a) * cols].reshape(b - a, cols), check or fn is not None,
                                    row=a)
            np.matmul(block, xt, out=out[a:b])
            if b - done >= batch or b == hi:  # in batches: each release interrupts the other cores (TLB shootdown)
                self._release(done, b)
                done = b

    def rmatmul_t(self, x: np.ndarray) -> np.ndarray:
        """``x @ self.T`` for x [N, cols] -> [N, rows], a block of the matrix's rows at a time (see the module doc)."""
        rows, cols = self.shape
        if x.ndim != 2 or x.shape[1] != cols:
            raise MinibloomError(f"{self.name}: cannot multiply {x.shape} by the transposed {self.shape} matrix")
        dtype = np.result_type(x.dtype, self.dtype)
        x = np.ascontiguousarray(x, dtype)
        check = not self.checked
        if x.shape[0] < MANY_ROWS:
            step = max(1, FEW_BLOCK_BYTES // (cols * self.dtype.itemsize))
            k = min(THREADS, -(-rows // step))
            bounds = [rows * j // k // step * step for j in range(k)] + [rows]
            xt, out_t = np.ascontiguousarray(x.T), np.empty((rows, x.shape[0]), dtype)  # [cols, N], [rows, N]
            if k == 1:
                self._rows(xt, out_t, 0, rows, step, check)
            else:
                with blas_threads(1):  # each thread's block product on that thread alone (see blas_threads)
                    jobs = [pool().submit(self._rows, xt, out_t, a, b, step, check)
                            for a, b in zip(bounds, bounds[1:])]
                    for job in jobs:
                        job.result()
            out = np.ascontiguousarray(out_t.T)  # no copy for one row (decoding)
        else:
            out = np.empty((x.shape[0], rows), dtype)
            step = max(1, MANY_BLOCK_BYTES // (cols * self.dtype.itemsize))
            buf = scratch(min(rows, step) * cols, self.dtype, "lazy-many")
            for a in range(0, rows, step):
                b = min(rows, a + step)
                block = self._widen(self.raw[a:b], buf[:(b - a) * cols].reshape(b - a, cols), check, None, a)
                np.matmul(x, block.T, out=out[:, a:b])
                self._release(a, b)
        if not self.full:
            self.ckpt.release(self.name)
        self.checked = True
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
            raise MinibloomError(f"{self.m.name}: low-memory products expect [tokens, C] inputs, got {x.shape}")
        return self.m.rmatmul_t(x)


class LazyLayers(Sequence):
    """``params["h"]``: one dict per layer, its matrices arrays (resident) or ``LazyMatrix`` (widened per use)."""

    def __init__(self, layers: list[dict], resident: int):
        self.layers, self.resident = layers, resident

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self) -> str:
        return f"LazyLayers({len(self)} layers, {self.resident} of them resident)"


def widened_bytes(ckpt: Checkpoint, names, np_dtype) -> int:
    """Bytes the tensors ``names`` take in the compute dtype."""
    return sum(int(np.prod(ckpt.info(n).shape, dtype=np.int64)) for n in names) * np.dtype(np_dtype).itemsize


def lazy_params(ckpt: Checkpoint, cfg: BloomConfig, np_dtype, backend=None, max_memory: int | None = None,
                progress=None) -> dict:
    """The parameter tree of ``read_params`` with the weights that do not fit ``max_memory`` bytes left in the
    memory map (see the module doc); ``None``: the default budget (``default_budget``)."""
    if backend is not None and getattr(backend, "name", "numpy") != "numpy":
        raise MinibloomError(f"low_memory: only the numpy backend is supported, not {backend.name!r}")
    check_tensors(ckpt, cfg, ckpt.files[0].path)
    itemsize = np.dtype(np_dtype).itemsize
    layer_names = [[f"h.{i}.{name}" for name, _ in LAYER_TENSORS] for i in range(cfg.n_layer)]
    head = ["word_embeddings.weight"] + (["lm_head.weight"] if not cfg.tie_word_embeddings and "lm_head.weight"
                                         in ckpt.where else [])
    small = ["word_embeddings_layernorm.weight", "word_embeddings_layernorm.bias", "ln_f.weight", "ln_f.bias"]
    small += [n for names in layer_names for n in names if n.split(".", 2)[2] not in MATRICES]
    big = [[n for n in names if n.split(".", 2)[2] in MATRICES] for names in layer_names] + [head]
    if max_memory is None:
        stored = sum(ckpt.info(n).nbytes for names in big for n in names)
        max_memory = default_budget(stored, sum(widened_bytes(ckpt, names, np_dtype) for names in big) / stored)
    left = max_memory - widened_bytes(ckpt, small, np_dtype)
    left -= THREADS * FEW_BLOCK_BYTES + MANY_BLOCK_BYTES + (MANY_BLOCK_BYTES if itemsize > 4 else 0)  # buffers
    resident: set[str] = set()
    for names in big:  # layers in order, then the head
        need = widened_bytes(ckpt, names, np_dtype)
        if need > left:
            break
        resident.update(names)
        left -= need
    keep = small + [n for names in big for n in names if n in resident]
    bar = _progress(sum(ckpt.info(n).nbytes for n in keep), "loading resident weights", progress)
    flat = {}
    lazy = [n for names in big for n in names if n not in resident]
    for name in keep:
        flat[name] = ckpt.get(name, np_dtype, checked=True)
        if name in resident and lazy:  # its 16-bit bytes are not read again: make room for those that will be
            ckpt.advise(name, need=False)
        bar.update(ckpt.info(name).nbytes)
    bar.close()
    for name in lazy:  # read into the page cache in the background, while the first tokens run on resident layers
        ckpt.advise(name, need=True)
    for names in big:
        for name in names:
            if name not in resident:
                flat[name] = LazyMatrix(ckpt, name, np_dtype)
    params = nest(flat)
    params["h"] = LazyLayers(params["h"], sum(all(n in resident for n in names) for names in big[:-1]))
    return params
