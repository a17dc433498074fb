"""Array backends: where the forward pass runs.

The compute path (``minibloom.model``) only calls array-API functions on the namespace of its inputs
(``x.__array_namespace__()``), so the same code runs on NumPy, on CuPy (GPU) and on ``array_api_strict``, the
reference implementation of the Python array API standard that CI uses to keep the other two honest. Loading and
file parsing always happen in NumPy; a backend only moves finished arrays to its device and back.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import threading

import numpy as np

from .errors import MinibloomError

BACKENDS = ("numpy", "cupy", "array_api_strict")


class Backend:
    """``name``, its array namespace ``xp``, and the two crossings ``asarray`` (to device) / ``to_numpy``."""

    def __init__(self, name: str = "numpy"):
        if name not in BACKENDS:
            raise MinibloomError(f"backend: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
        self.name = name
        if name == "numpy":
            self.xp = np
        elif name == "cupy":
            try:
                import cupy
            except ImportError:
                raise MinibloomError("backend 'cupy': the cupy package is not installed "
                                     "(pip install 'minibloom[cupy]', needs an NVIDIA GPU)") from None
            try:
                n = cupy.cuda.runtime.getDeviceCount()
            except Exception as e:  # cupy raises its own CUDARuntimeError
                raise MinibloomError(f"backend 'cupy': no usable GPU ({e})") from None
            if n == 0:
                raise MinibloomError("backend 'cupy': no GPU found")
            self.xp = cupy
        else:
            try:
                import array_api_strict
            except ImportError:
                raise MinibloomError("backend 'array_api_strict': pip install array-api-strict") from None
            self.xp = array_api_strict

    def asarray(self, a):
        if self.name == "numpy":
            return np.asarray(a)
        return self.xp.asarray(np.ascontiguousarray(a))

    def to_numpy(self, a) -> np.ndarray:
        if self.name == "numpy":
            return np.asarray(a)
        if self.name == "cupy":
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def anonymous_memory(nbytes: int) -> mmap.mmap:
    """``nbytes`` of private anonymous memory in 4 KiB pages (``mmap(-1, n)`` alone would be MAP_SHARED)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    return mmap.mmap(-1, nbytes, flags=flags) if flags else mmap.mmap(-1, nbytes)  # Windows: no flags argument


def empty_private(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised NumPy array; from 1 MiB up, in its own private anonymous mapping of 4 KiB pages.

    ``np.empty`` asks the kernel for transparent huge pages on big arrays, and where THP defrag is "madvise" (a common
    default) that means synchronous memory compaction on every large allocation, which slows loading several times
    over and buys no decode speed. Weights are allocated once and live long, so a mapping per tensor costs nothing.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes < (1 << 20):
        return np.empty(shape, dtype)
    return np.frombuffer(anonymous_memory(nbytes), dtype).reshape(shape)


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process heap for reuse (glibc's ``mallopt``), instead of a fresh mapping per large
    array that the kernel must fault in page by page again.

    A training step allocates and frees the same large activations (probabilities [B, H, T, T], logits [B, T, V])
    every step; above glibc's mmap threshold (at most 32 MiB) each one is a new mapping. Raising the threshold and the
    trim threshold makes them come from, and go back to, the heap. Process-wide; returns False where the C library
    is not glibc (nothing changes there)."""
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 31))


_blas_lock = threading.Lock()


@contextlib.contextmanager
def blas_threads(n: int):
    """Run the block with OpenBLAS limited to ``n`` threads, then restore its count (process-wide: OpenBLAS keeps
    one count for all threads; NumPy's wheels bundle OpenBLAS, found in /proc/self/maps).

    For the low-memory products: each widening thread multiplies its own small block, and if OpenBLAS also fanned
    each of those products out to its threads, the two kinds of thread would fight over the same cores (a 16-row
    block product runs at half speed). The caller's own thread waits meanwhile. Other BLAS libraries, or an OpenBLAS
    without these functions, are left as they are."""
    get, set_ = _openblas_function("get_num_threads"), _openblas_function("set_num_threads")
    if get is None or set_ is None:
        yield
        return
    with _blas_lock:
        before = get()
        set_(n)
        try:
            yield
        finally:
            set_(before)


_one_thread = {"holders": 0, "before": None}
_one_lock = threading.Lock()  # not _blas_lock: a caller may be inside blas_threads already


@contextlib.contextmanager
def one_blas_thread():
    """Run the block with OpenBLAS on one thread, whatever other threads of this process do meanwhile: the first of
    several overlapping blocks (window tasks on a pool or on a Dask worker's threads) sets the count to 1, the last
    one to leave restores it. Unlike ``blas_threads`` no lock is held inside the block, so the blocks run side by
    side (and a ``blas_threads(1)`` inside one finds the count at 1 and leaves it there; one inside a
    ``blas_threads`` block restores that block's count).

    What for: OpenBLAS may split a product differently with another thread count, and float32 results can then differ
    in the last bits; one thread everywhere makes a window's logits the same on this process and on any worker."""
    get, set_ = _openblas_function("get_num_threads"), _openblas_function("set_num_threads")
    if get is None or set_ is None:
        yield
        return
    with _one_lock:
        if _one_thread["holders"] == 0:
            _one_thread["before"] = get()
            set_(1)
        _one_thread["holders"] += 1
    try:
        yield
    finally:
        with _one_lock:
            _one_thread["holders"] -= 1
            if _one_thread["holders"] == 0:
                set_(_one_thread["before"])


def openblas_threads() -> int | None:
    """OpenBLAS's current thread count in this process, or None where NumPy uses another BLAS."""
    get = _openblas_function("get_num_threads")
    return None if get is None else int(get())


@functools.cache
def _openblas_function(what: str):
    """OpenBLAS's ``openblas_<what>`` (under any of the names its builds export) from the OpenBLAS this process has
    loaded, or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    names = [f"{prefix}openblas_{what}{suffix}" for prefix in ("", "scipy_") for suffix in ("", "64_", "_64")]
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int] if what.startswith("set") else []
                fn.restype = None if what.startswith("set") else ctypes.c_int
                return fn
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (``avx2``, ``avx512_vnni`` ...); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
