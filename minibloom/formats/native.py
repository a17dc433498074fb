"""The optional C speedup for ``widen``: ``minibloom.formats._widen``, built from ``_widen.c`` where a compiler exists.

``widen.py``'s vectorized NumPy passes are the portable path: several trips through memory per block. The C
extension (``_widen.c``, compiled by ``setup.py`` at install; ``optional=True`` skips it where there is no compiler)
streams the source once instead, with the CPU's own conversion instructions where the CPU has them (x86-64 with AVX2
and F16C: ``_mm256_cvtph_ps``, chosen at run time; ``benchmarks/widen.py`` measures both paths). This is the pattern
of PyYAML, msgpack or simplejson: an optional compiled module beside a pure-Python path that gives the same results.

Each kernel is ``fn(src, dst) -> bool``: ``src`` a C-contiguous array of 2-byte bit patterns (callers pass a uint16
view), ``dst`` a writable C-contiguous float32 or float64 array with as many elements. The extension takes both
through the buffer protocol and checks them (a wrong argument raises ValueError / TypeError / BufferError; it never
reads or writes outside the two arrays) and converts without holding the GIL. It returns True if any element was inf
or NaN (exponent all ones): every finite value comes out exactly, and the caller converts a flagged block again with
``reference`` so that NaN payloads come out as NumPy's cast makes them.

Used only where all of this holds: the extension imports, it reports the SIMD loops (``_widen.simd``; on other CPUs
its plain C loops would not beat the NumPy passes), the kernels equal ``reference`` on all 65536 bit patterns
(checked once, at first use), and the environment variable ``MINIBLOOM_NATIVE`` does not turn them off (``0``,
``off``, ``false``, ``no``, any case, read at every call; an unrecognised value is a warning naming the variable,
and the default, on, applies). Otherwise ``kernel`` returns None and the NumPy passes run; with the switch off the
extension is not even imported.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import numpy as np

Kernel = Callable[[np.ndarray, np.ndarray], bool]

_lock = threading.Lock()
_kernels: dict | None = None  # (code, dtype name) -> kernel once loaded and checked ({} if unusable); None: not yet
reason = "not tried yet"  # why the kernels are off, for benchmarks and bug reports
_loaded = "not tried yet"  # the reason the last load gave (``reason`` again once the switch is back on)

OFF = ("0", "off", "false", "no")
ON = ("", "1", "on", "true", "yes")


def reference(src: np.ndarray, code: str, dtype) -> np.ndarray:
    """The plain conversion the fast ones must equal (the C kernels and ``widen``'s NumPy passes): NumPy's cast
    (binary16) or the 16-bit shift (bfloat16)."""
    if code == "BF16":
        with np.errstate(invalid="ignore"):
            return (src.astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)
    return src.view(np.float16).astype(dtype)


def _switch() -> str:
    return os.environ.get("MINIBLOOM_NATIVE", "").strip().lower()


def enabled() -> bool:
    """Whether ``MINIBLOOM_NATIVE`` allows the kernels (unset: yes); an unknown value warns, naming the variable."""
    value = _switch()
    if value in OFF:
        return False
    if value not in ON:
        import warnings

        warnings.warn(f"MINIBLOOM_NATIVE={os.environ['MINIBLOOM_NATIVE']!r} is not one of {', '.join(ON[1:])} or "
                      f"{', '.join(OFF)}; the C widening stays on where it is built", RuntimeWarning, stacklevel=3)
    return True


def _self_check(kernels: dict) -> bool:
    """Every kernel equals ``reference`` on all 65536 bit patterns (finite ones bit for bit) and flags exactly the
    inputs that hold an inf or NaN."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):
        for (code, dtype), fn in kernels.items():
            ref = reference(patterns, code, dtype)
            finite = np.isfinite(ref)
            out = np.empty(patterns.size, dtype)
            if fn(patterns, out) is not True:
                return False
            bits = np.uint32 if dtype == "float32" else np.uint64
            if not np.array_equal(out[finite].view(bits), ref[finite].view(bits)):
                return False
            ok = np.ascontiguousarray(patterns[finite])
            if fn(ok, out[:ok.size]) is not False:
                return False
    return True


def _load() -> tuple[dict, str]:
    """The checked kernels ({} if they cannot be used) and why they are (or are not) in use."""
    if not enabled():
        return {}, f"MINIBLOOM_NATIVE={os.environ.get('MINIBLOOM_NATIVE')}"
    try:
        from . import _widen
    except ImportError as e:
        return {}, f"the C extension minibloom.formats._widen is not built ({e}): the NumPy passes run"
    if getattr(_widen, "simd", "c") == "c":
        return {}, "the CPU lacks AVX2 + F16C (the extension's plain C loops would not beat the NumPy passes)"
    kernels = {("F16", "float32"): _widen.f16_f32, ("F16", "float64"): _widen.f16_f64,
               ("BF16", "float32"): _widen.bf16_f32, ("BF16", "float64"): _widen.bf16_f64}
    try:
        good = _self_check(kernels)
    except (TypeError, ValueError, BufferError) as e:  # an extension from another build with other signatures
        return {}, f"the C extension does not take this version's arguments ({e})"
    if not good:
        return {}, "the C kernels disagree with NumPy on this machine"
    return kernels, f"in use ({_widen.simd})"


def kernel(code: str, dtype) -> Kernel | None:
    """The C loop widening ``code`` ("F16" / "BF16") to ``dtype`` (float32 / float64), or None (see the module doc)."""
    global _kernels, _loaded, reason
    if _switch() in OFF:  # read at every call: switching it off later in the process takes effect at once
        reason = f"MINIBLOOM_NATIVE={os.environ.get('MINIBLOOM_NATIVE')}"
        return None
    if _kernels is None:
        with _lock:
            if _kernels is None:
                _kernels, _loaded = _load()
    reason = _loaded
    try:
        return _kernels.get((code, np.dtype(dtype).name))
    except Exception:  # not a dtype (NumPy raises TypeError, ValueError, even SyntaxError) or code unhashable
        return None
