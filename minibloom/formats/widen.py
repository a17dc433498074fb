"""16-bit floats (IEEE binary16 and bfloat16) widened to float32/float64, exactly and fast, into memory the caller owns.

Both formats embed in IEEE binary32 (IEEE 754-2008, section 3.6; bfloat16 is by definition the top half of a float32):

- bfloat16 bits ``b`` -> float32 bits ``b << 16``: one shift, exact for every pattern;
- binary16 bits ``h`` (sign s, exponent e, mantissa m) -> float32: the sign-extended 32-bit integer ``h << 13``
  masked with ``0x8FFFE000`` holds s at bit 31 and (e, m) at bits 23..22-9, i.e. the float32 ``2^(e-127) * 1.m`` (or
  a float32 subnormal when e = 0); multiplying it by ``2^112`` rebiases the exponent (15 -> 127) and turns the
  subnormals into the normal numbers they stand for, exactly (F. Giesen, "half to float done quic", 2016). Inf and
  NaN (e = 31) come out as finite numbers of magnitude >= 65536 instead, above every finite binary16 (<= 65504): a
  block that holds one is redone with NumPy's own cast.

NumPy's ``astype`` converts binary16 one element at a time; the four vectorized passes above, run on blocks that
stay in the L2 cache and on every core (NumPy releases the GIL inside each pass), are faster, and are the portable
path. Where the optional C extension is built and the CPU has AVX2 + F16C, ``native``'s kernels do each block
instead, with the conversion instructions themselves, in one pass (``benchmarks/widen.py`` measures every candidate,
``ml_dtypes``' bfloat16 cast too; ``MINIBLOOM_NATIVE=0`` switches the kernels off).
float64 goes through float32 (exact: every float32 is a float64), the block still in cache. The results equal
``astype`` bit for bit, NaN payloads included (``tests/test_widen.py`` checks all 65536 patterns of both formats).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import MinibloomError
from . import native
from .native import reference  # the plain conversion every fast path must equal

CHUNK = 1 << 18  # elements widened per step: 1 MiB of float32 stays in a core's L2 cache with its 16-bit source
THREADS = max(1, min(8, os.cpu_count() or 1))  # threads that widen big arrays (each takes a contiguous range)
_F16_SCALE = np.float32(2.0 ** 112)  # 2^(127 - 15): binary16's exponent bias -> float32's
_F16_MASK = np.uint32(0x8FFFE000)  # sign, exponent and mantissa of a binary16 shifted left by 13
_F16_LIMIT = np.float32(65536.0)  # the fast path maps inf/NaN to magnitudes >= this; finite binary16 stay below

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """The process's widening threads (created on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="minibloom-widen")
        return _pool


def scratch(n: int, dtype, slot: str = "widen") -> np.ndarray:
    """``n`` elements of this thread's reusable buffer ``slot`` (grown when needed, never shrunk)."""
    dtype = np.dtype(dtype)
    key = (slot, dtype.str)
    buf = getattr(_local, "bufs", None)
    if buf is None:
        buf = _local.bufs = {}
    a = buf.get(key)
    if a is None or a.size < n:
        a = buf[key] = np.empty(max(n, CHUNK), dtype)
    return a[:n]


def _f16_to_f32(h: np.ndarray, f: np.ndarray, finite: bool = False) -> bool:
    """binary16 ``h`` (any 16-bit view) -> float32 ``f`` (same size, contiguous); False if it held inf or NaN
    (then ``f`` is wrong: the caller converts again with ``reference``). ``finite``: the caller knows it holds
    neither (checked before), so the check is skipped."""
    i = f.view(np.int32)
    np.copyto(i, h.view(np.int16), casting="unsafe")  # sign-extended
    np.left_shift(i, np.int32(13), out=i)
    np.bitwise_and(f.view(np.uint32), _F16_MASK, out=f.view(np.uint32))
    np.multiply(f, _F16_SCALE, out=f)
    return finite or not (f.size and (np.max(f) >= _F16_LIMIT or np.min(f) <= -_F16_LIMIT))


def _bf16_to_f32(b: np.ndarray, f: np.ndarray) -> None:
    u = f.view(np.uint32)
    np.copyto(u, b.view(np.uint16), casting="unsafe")
    np.left_shift(u, np.uint32(16), out=u)


def check_finite(a: np.ndarray, where: str) -> np.ndarray:
    """``a`` itself, once it is known to hold no NaN or inf (a MinibloomError naming ``where`` otherwise).

    A sum is one pass over memory with no temporary array and is finite exactly when every value is, unless finite
    values overflow it; only then (or for a real NaN / inf) are the values checked one block at a time."""
    flat = np.reshape(a, -1)
    acc = np.float32 if flat.dtype == np.float16 else None
    with np.errstate(over="ignore", invalid="ignore"):
        if flat.size == 0 or np.isfinite(np.add.reduce(flat, dtype=acc)):
            return a
    step = 1 << 22
    for lo in range(0, flat.size, step):
        bad = ~np.isfinite(flat[lo:lo + step])
        if bad.any():
            i = lo + int(np.argmax(bad))
            raise MinibloomError(f"{where}: holds {flat[i]} at flat index {i} (weights must be finite)")
    return a


def _nonfinite(flat: np.ndarray, where: str, offset: int) -> None:
    """Raise for the first inf/NaN of the widened block ``flat`` (flat index ``offset + i`` of its tensor), if any."""
    bad = ~np.isfinite(flat)
    if bad.any():
        i = int(np.argmax(bad))
        raise MinibloomError(f"{where}: holds {flat[i]} at flat index {offset + i} (weights must be finite)")


def _widen_native(fn: native.Kernel, src: np.ndarray, code: str, out: np.ndarray, where: str | None,
                  offset: int) -> None:
    """``_widen_range`` with a C kernel (``native``); a block it flags (inf/NaN) is redone with NumPy."""
    bits = src.view(np.uint16)  # the stored patterns (the kernel checks the size and contiguity of both arrays)
    for lo in range(0, src.size, CHUNK):
        hi = min(src.size, lo + CHUNK)
        if fn(bits[lo:hi], out[lo:hi]):
            out[lo:hi] = reference(src[lo:hi], code, out.dtype)
            if where is not None:
                _nonfinite(out[lo:hi], where, offset + lo)


def _widen_range(src: np.ndarray, code: str, out: np.ndarray, where: str | None, offset: int,
                 finite: bool = False) -> None:
    """Widen the flat 1-d ``src`` into the flat contiguous ``out`` block by block (one thread)."""
    fn = native.kernel(code, out.dtype) if src.flags.c_contiguous and out.flags.c_contiguous \
        and src.itemsize == 2 else None
    if fn is not None:
        return _widen_native(fn, src, code, out, where, offset)
    wide = out.dtype != np.float32
    for lo in range(0, src.size, CHUNK):
        hi = min(src.size, lo + CHUNK)
        f = scratch(hi - lo, np.float32) if wide else out[lo:hi]
        if code == "BF16":
            _bf16_to_f32(src[lo:hi], f)
            exact = True
            if where is not None:  # a sum is finite exactly when every term is (bar overflow: then look closer)
                with np.errstate(over="ignore", invalid="ignore"):
                    if not np.isfinite(np.add.reduce(f)):
                        _nonfinite(f, where, offset + lo)
        else:
            exact = _f16_to_f32(src[lo:hi], f, finite)
        if not exact:
            out[lo:hi] = reference(src[lo:hi], code, out.dtype)
            if where is not None:
                _nonfinite(out[lo:hi], where, offset + lo)
        elif wide:
            with np.errstate(invalid="ignore"):  # a signalling NaN of bfloat16 quietens, as in ``reference``
                np.copyto(out[lo:hi], f)


def widen_into(src: np.ndarray, code: str, out: np.ndarray, *, where: str | None = None,
               threads: int | None = None, finite: bool = False, offset: int = 0) -> np.ndarray:
    """Write ``src`` (stored 16-bit values: ``code`` "F16" or "BF16", any shape and strides) widened into ``out``
    (float32 or float64, C-contiguous, the same shape) and return ``out``.

    ``where``: check that every value is finite, raising a MinibloomError naming ``where`` and the flat index
    (plus ``offset``: where ``src`` starts in its tensor) otherwise. ``threads``: how many threads share the work
    (default: all cores for arrays of several blocks; 1 from code that already runs on a worker thread).
    ``finite``: ``src`` is known to hold no inf or NaN (it was checked before), which saves binary16 the pass that
    looks for them.
    """
    if not isinstance(code, str) or code not in ("F16", "BF16"):
        raise MinibloomError(f"widen: {code!r} is not a 16-bit float code")
    src = as_16bit(src)
    if threads is not None and (not isinstance(threads, (int, np.integer)) or isinstance(threads, bool)
                                or not 1 <= threads <= 1024):
        raise MinibloomError(f"widen: threads must be an integer in [1, 1024] or None, got {threads!r}"[:200])
    if not isinstance(offset, (int, np.integer)) or isinstance(offset, bool) or offset < 0:
        raise MinibloomError(f"widen: offset must be a non-negative integer, got {offset!r}"[:200])
    if where is not None and not isinstance(where, str):
        raise MinibloomError(f"widen: where must be a str (a name for messages) or None, got {type(where).__name__}")
    if not isinstance(out, np.ndarray) or out.shape != src.shape or out.dtype not in (np.float32, np.float64) \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise MinibloomError(f"widen: cannot widen {src.shape} into {getattr(out, 'dtype', type(out).__name__)} "
                             f"{getattr(out, 'shape', '')} (a writable C-contiguous float32/float64 array of the "
                             "source's shape)")
    flat_out = out.reshape(-1)
    flat = src.reshape(-1)  # a copy only for a strided source (a column slice)
    n = flat.size
    k = min(THREADS if threads is None else max(1, threads), max(1, n // CHUNK))
    if k == 1:
        _widen_range(flat, code, flat_out, where, offset, finite)
        return out
    bounds = [n * j // k // CHUNK * CHUNK for j in range(k)] + [n]
    jobs = [pool().submit(_widen_range, flat[a:b], code, flat_out[a:b], where, offset + a, finite)
            for a, b in zip(bounds, bounds[1:])]
    for job in jobs:
        job.result()
    return out


def widen(src: np.ndarray, code: str, dtype, *, where: str | None = None, threads: int | None = None,
          finite: bool = False) -> np.ndarray:
    """``src`` widened to ``dtype`` in a new array; see ``widen_into``."""
    src = as_16bit(src)
    try:
        dtype = np.dtype(dtype)
    except Exception:  # NumPy raises TypeError, ValueError, even SyntaxError (a comma string such as ",")
        raise MinibloomError(f"widen: {dtype!r} is not a dtype (float32 or float64)") from None
    if dtype not in (np.float32, np.float64):
        raise MinibloomError(f"widen: widens to float32 or float64, not {dtype}")
    return widen_into(src, code, np.empty(src.shape, dtype), where=where, threads=threads, finite=finite)


def as_16bit(src) -> np.ndarray:
    """The stored 16-bit values of ``src``: an array of any 2-byte type (uint16, int16, float16, bfloat16) as it is;
    raw bytes (uint8 / int8, the last axis of even length) as the uint16 values they hold (that axis halved). Any
    other dtype (float64, int32 ...) would be read as 16-bit patterns it does not hold: a MinibloomError naming it."""
    if not isinstance(src, np.ndarray):
        raise MinibloomError(f"widen: the source must be a NumPy array of 16-bit values, got {type(src).__name__}")
    dt = src.dtype
    if dt.fields is not None or dt.subdtype is not None or dt.hasobject:
        raise MinibloomError(f"widen: the source's dtype {dt} is not a 16-bit type")
    if dt.itemsize == 2 and dt.kind in "uifV":
        return src
    if dt.itemsize == 1 and dt.kind in "uiV" and src.ndim >= 1 and src.shape[-1] % 2 == 0:
        return np.ascontiguousarray(src).view(np.uint16)  # reads exactly the bytes the array holds
    if dt.itemsize == 1 and dt.kind in "uiV":
        raise MinibloomError(f"widen: a {dt} source holds raw bytes of 16-bit values: its last axis must have an "
                             f"even length, got shape {src.shape}")
    raise MinibloomError(f"widen: the source's dtype {dt} is not a 16-bit type (give the stored uint16 / float16 / "
                         "bfloat16 values, or their bytes as uint8)")
