"""Four machine-code loops that widen 16-bit floats with the CPU's own conversion instructions (x86-64, AVX2 + F16C).

NumPy converts binary16 one element at a time and has no instruction-level path for it in its portable wheels;
``widen.py``'s four vectorized NumPy passes are faster but still four trips through memory. The CPU can do better:
``vcvtph2ps`` (F16C, every x86-64 CPU since 2012) turns 8 binary16 into 8 float32 per instruction, exactly, and a
bfloat16 is the top half of a float32 (``vpmovzxwd`` + ``vpslld 16``). The loops below stream the source once, at
memory speed (``benchmarks/widen.py`` measures them beside the NumPy passes).

They are shipped as bytes, assembled once from ``ASSEMBLY`` (GNU ``as``; ``tests/test_widen.py`` re-assembles the
listing where ``as`` exists and checks the bytes match), copied into a private page that is then made executable
(``mmap`` + ``mprotect``), and called through ``ctypes``, which releases the GIL for the call. Each
``kernel(src, dst, n)`` widens ``n`` elements (``n`` a positive multiple of 16), and returns 1 if any of them was inf
or NaN (exponent all ones), so the caller can redo that block with NumPy's conversion: the kernels are exact for
every finite value, and NaN payloads then come out exactly as NumPy's cast makes them.

Used only where all of this holds: Linux on x86-64, ``avx2`` and ``f16c`` in ``/proc/cpuinfo``, the page can be made
executable, the kernels equal NumPy's conversion on all 65536 bit patterns (checked once, at first use), and the
environment variable ``MINIBLOOM_NATIVE`` does not turn them off (``0``, ``off``, ``false``, ``no``, any case; an
unrecognised value is a warning naming the variable, and the default, on, applies). Otherwise ``kernel`` returns None
and the NumPy passes run. The caller hands a kernel only whole 16-element blocks of a 16-bit source: it reads
``2 n`` bytes from ``src`` and nothing beyond (``widen._widen_native``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import threading

import numpy as np

from ..backend import cpu_flags

# System V AMD64 ABI: rdi = src (uint16 *), rsi = dst (float * or double *), rdx = n; the result in eax.
ASSEMBLY = """
.intel_syntax noprefix
.text
.macro PROLOGUE mask                    # ymm7 = the exponent mask in every 16-bit lane, ymm6 = 0, i = 0
    mov eax, \\mask
    vmovd xmm7, eax
    vpbroadcastd ymm7, xmm7
    vpxor ymm6, ymm6, ymm6              # lanes seen with an all-ones exponent (inf / NaN)
    xor ecx, ecx
.endm
.macro LOAD16                           # ymm4 = 16 elements from src[i]; note those with an all-ones exponent
    vmovdqu ymm4, [rdi + rcx*2]
    vpand ymm5, ymm4, ymm7
    vpcmpeqw ymm5, ymm5, ymm7
    vpor ymm6, ymm6, ymm5
.endm
.macro STORE64                          # float32 ymm0 (elements 0..7), ymm1 (8..15) -> 16 float64 at dst[i] (exact)
    vcvtps2pd ymm2, xmm0
    vextractf128 xmm0, ymm0, 1
    vcvtps2pd ymm3, xmm0
    vmovupd [rsi + rcx*8], ymm2
    vmovupd [rsi + rcx*8 + 32], ymm3
    vcvtps2pd ymm2, xmm1
    vextractf128 xmm1, ymm1, 1
    vcvtps2pd ymm3, xmm1
    vmovupd [rsi + rcx*8 + 64], ymm2
    vmovupd [rsi + rcx*8 + 96], ymm3
.endm
.macro NEXT                             # i += 16; loop while i < n; return 1 if any inf / NaN was seen
    add rcx, 16
    cmp rcx, rdx
    jb 1b
    xor eax, eax
    vptest ymm6, ymm6
    setnz al
    vzeroupper
    ret
.endm
.macro F16_TO_F32                       # binary16 ymm4 -> float32 ymm0, ymm1 (F16C)
    vcvtph2ps ymm0, xmm4
    vextracti128 xmm4, ymm4, 1
    vcvtph2ps ymm1, xmm4
.endm
.macro BF16_TO_F32                      # bfloat16 ymm4 -> float32 ymm0, ymm1: zero-extend, << 16
    vpmovzxwd ymm0, xmm4
    vpslld ymm0, ymm0, 16
    vextracti128 xmm4, ymm4, 1
    vpmovzxwd ymm1, xmm4
    vpslld ymm1, ymm1, 16
.endm

# int f16_f32(const uint16_t *src, float *dst, size_t n)   n > 0, a multiple of 16
.globl f16_f32
f16_f32:
    PROLOGUE 0x7c007c00                 # binary16 exponent mask, twice
1:
    LOAD16
    F16_TO_F32
    vmovups [rsi + rcx*4], ymm0
    vmovups [rsi + rcx*4 + 32], ymm1
    NEXT
# int f16_f64(const uint16_t *src, double *dst, size_t n)
.globl f16_f64
f16_f64:
    PROLOGUE 0x7c007c00
1:
    LOAD16
    F16_TO_F32
    STORE64
    NEXT
# int bf16_f32(const uint16_t *src, float *dst, size_t n)
.globl bf16_f32
bf16_f32:
    PROLOGUE 0x7f807f80                 # bfloat16 exponent mask, twice
1:
    LOAD16
    BF16_TO_F32
    vmovdqu [rsi + rcx*4], ymm0
    vmovdqu [rsi + rcx*4 + 32], ymm1
    NEXT
# int bf16_f64(const uint16_t *src, double *dst, size_t n)
.globl bf16_f64
bf16_f64:
    PROLOGUE 0x7f807f80
1:
    LOAD16
    BF16_TO_F32
    STORE64
    NEXT
"""

# ``as`` + ``objcopy -O binary --only-section=.text`` of ASSEMBLY, and where each function starts (``nm``)
CODE = bytes.fromhex(
    "b8007c007cc5f96ef8c4e27d58ffc5cdeff631c9c5fe6f244fc5dddbefc5d575efc5cdebf5c4e27d13c4c4e37d39e401c4e27d13cc"
    "c5fc11048ec5fc114c8e204883c1104839d172cb31c0c4e27d17f60f95c0c5f877c3b8007c007cc5f96ef8c4e27d58ffc5cdeff631"
    "c9c5fe6f244fc5dddbefc5d575efc5cdebf5c4e27d13c4c4e37d39e401c4e27d13ccc5fc5ad0c4e37d19c001c5fc5ad8c5fd1114ce"
    "c5fd115cce20c5fc5ad1c4e37d19c901c5fc5ad9c5fd1154ce40c5fd115cce604883c1104839d172a331c0c4e27d17f60f95c0c5f8"
    "77c3b8807f807fc5f96ef8c4e27d58ffc5cdeff631c9c5fe6f244fc5dddbefc5d575efc5cdebf5c4e27d33c4c5fd72f010c4e37d39"
    "e401c4e27d33ccc5f572f110c5fe7f048ec5fe7f4c8e204883c1104839d172c131c0c4e27d17f60f95c0c5f877c3b8807f807fc5f9"
    "6ef8c4e27d58ffc5cdeff631c9c5fe6f244fc5dddbefc5d575efc5cdebf5c4e27d33c4c5fd72f010c4e37d39e401c4e27d33ccc5f5"
    "72f110c5fc5ad0c4e37d19c001c5fc5ad8c5fd1114cec5fd115cce20c5fc5ad1c4e37d19c901c5fc5ad9c5fd1154ce40c5fd115cce"
    "604883c1104839d1729931c0c4e27d17f60f95c0c5f877c3")
ENTRY = {("F16", "float32"): 0x00, ("F16", "float64"): 0x57, ("BF16", "float32"): 0xD6, ("BF16", "float64"): 0x137}
BLOCK = 16  # elements per loop iteration: ``n`` must be a multiple

Kernel = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_lock = threading.Lock()
_kernels: dict | None = None
_pages: list = []  # every executable page mapped, kept for the life of the process (a kernel may outlive a reload)
reason = "not tried yet"  # why the kernels are off, for benchmarks and bug reports


def reference(src: np.ndarray, code: str, dtype) -> np.ndarray:
    """The plain conversion the fast ones must equal (these loops and ``widen``'s NumPy passes): NumPy's cast
    (binary16) or the 16-bit shift (bfloat16)."""
    if code == "BF16":
        with np.errstate(invalid="ignore"):
            return (src.astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)
    return src.view(np.float16).astype(dtype)


def _self_check(kernels: dict) -> bool:
    """Every kernel equals NumPy's conversion on all 65536 bit patterns (finite ones bit for bit) and flags exactly
    the blocks that hold an inf or NaN."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):
        for (code, dtype), fn in kernels.items():
            ref = reference(patterns, code, dtype)
            finite = np.isfinite(ref)
            out = np.empty(patterns.size, dtype)
            if fn(patterns.ctypes.data, out.ctypes.data, patterns.size) != 1:
                return False
            bits = np.uint32 if dtype == "float32" else np.uint64
            if not np.array_equal(out[finite].view(bits), ref[finite].view(bits)):
                return False
            ok = np.ascontiguousarray(patterns[finite][: (int(finite.sum()) // BLOCK) * BLOCK])
            if fn(ok.ctypes.data, out.ctypes.data, ok.size) != 0:
                return False
    return True


OFF = ("0", "off", "false", "no")
ON = ("", "1", "on", "true", "yes")


def enabled() -> bool:
    """Whether ``MINIBLOOM_NATIVE`` allows the kernels (unset: yes); an unknown value warns, naming the variable."""
    value = os.environ.get("MINIBLOOM_NATIVE", "").strip().lower()
    if value in OFF:
        return False
    if value not in ON:
        import warnings

        warnings.warn(f"MINIBLOOM_NATIVE={os.environ['MINIBLOOM_NATIVE']!r} is not one of {', '.join(ON[1:])} or "
                      f"{', '.join(OFF)}; the machine-code widening stays on where the CPU allows", RuntimeWarning,
                      stacklevel=3)
    return True


def _load() -> dict:
    global reason
    if not enabled():
        reason = f"MINIBLOOM_NATIVE={os.environ.get('MINIBLOOM_NATIVE')}"
        return {}
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        reason = f"not Linux on x86-64 ({sys.platform}, {platform.machine()})"
        return {}
    missing = {"avx2", "f16c"} - cpu_flags()
    if missing:
        reason = f"the CPU lacks {sorted(missing)}"
        return {}
    try:
        page = mmap.mmap(-1, max(mmap.PAGESIZE, len(CODE)), prot=mmap.PROT_READ | mmap.PROT_WRITE)
        page.write(CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(address, len(page), mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            reason = f"cannot make a page executable ({os.strerror(ctypes.get_errno())})"
            return {}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        reason = f"cannot load the kernels ({e})"
        return {}
    _pages.append(page)  # never unmapped: kernels from an earlier load still point into their page
    kernels = {key: Kernel(address + offset) for key, offset in ENTRY.items()}
    if not _self_check(kernels):
        reason = "the kernels disagree with NumPy on this machine"
        return {}
    reason = "in use"
    return kernels


def kernel(code: str, dtype):
    """The machine-code loop widening ``code`` ("F16" / "BF16") to ``dtype`` (float32 / float64), or None."""
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                _kernels = _load()
    try:
        return _kernels.get((code, np.dtype(dtype).name))
    except Exception:  # not a dtype (NumPy raises TypeError, ValueError, even SyntaxError) or code unhashable
        return None
