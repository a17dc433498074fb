"""16-bit -> 32/64-bit widening (``minibloom.formats.widen``): bit for bit what NumPy's cast and the bfloat16 shift
give, for every one of the 65536 patterns, on every path (one block, several blocks on several threads, strided
sources), and the finite check names the first bad value. Those tests run twice: with the optional C extension's
kernels (``minibloom.formats.native`` / ``_widen.c``, where it is built and this CPU runs them) and with the NumPy
passes they replace. Then the extension itself: bad arguments raise (never a crash, even for a source that ends at an
unreadable page), ``MINIBLOOM_NATIVE`` switches it off, and the package works without it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from minibloom.errors import MinibloomError
from minibloom.formats import native
from minibloom.formats import widen as W
from minibloom.formats.safetensors import bf16_to_f32

PATTERNS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@pytest.fixture(params=["native", "numpy"])
def path(request, monkeypatch):
    """Which conversion widens: the C kernels or the NumPy passes (the tests that name it run with each)."""
    if request.param == "numpy":
        monkeypatch.setattr(native, "kernel", lambda code, dtype: None)
    elif native.kernel("F16", np.float32) is None:
        pytest.skip(f"no C kernels here: {native.reason}")
    return request.param


def expected(bits: np.ndarray, code: str, dtype) -> np.ndarray:
    """The plain conversions, written out here: NumPy's binary16 cast, or bfloat16 as the top half of a float32."""
    if code == "F16":
        return bits.view(np.float16).astype(dtype)
    with np.errstate(invalid="ignore"):
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(dtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> None:
    ints = {4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(ints), b.view(ints))


@pytest.mark.parametrize("code", ["F16", "BF16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_bit_pattern(path, code, dtype):
    src = PATTERNS.view(np.float16) if code == "F16" else PATTERNS
    same_bits(W.widen(src, code, dtype), expected(PATTERNS, code, dtype))
    # inf, NaN (payloads and signalling NaNs too), subnormals, signed zeros among them
    if code == "F16":
        special = np.array([0x0000, 0x8000, 0x0001, 0x83FF, 0x7C00, 0xFC00, 0x7C01, 0x7E00, 0xFFFF], np.uint16)
        same_bits(W.widen(special.view(np.float16), code, dtype), expected(special, code, dtype))


@pytest.mark.parametrize("code", ["F16", "BF16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_blocks_on_threads_and_strided_sources(path, code, dtype, monkeypatch):
    monkeypatch.setattr(W, "CHUNK", 4096)  # 16 patterns' worth of blocks per thread, a short last one
    rng = np.random.default_rng(0)
    bits = rng.permutation(np.tile(PATTERNS, 3))[:150_001]
    src = bits.view(np.float16) if code == "F16" else bits
    same_bits(W.widen(src, code, dtype, threads=3), expected(bits, code, dtype))
    grid = bits[:150_000].reshape(300, 500)
    sub = (grid.view(np.float16) if code == "F16" else grid)[:, 17:230]  # a column slice: not contiguous
    out = np.empty(sub.shape, dtype)
    assert W.widen_into(sub, code, out) is out
    same_bits(out, expected(grid[:, 17:230], code, dtype))


@pytest.mark.parametrize("code", ["F16", "BF16"])
def test_finite_check_names_the_first_bad_value(path, code, monkeypatch):
    monkeypatch.setattr(W, "CHUNK", 1000)
    values = np.linspace(-2, 2, 10_000).astype(np.float32)
    bits = values.astype(np.float16).view(np.uint16) if code == "F16" else (values.view(np.uint32) >> 16).astype(
        np.uint16)
    bad = bits.copy()
    bad[7321] = 0x7C00 if code == "F16" else 0x7F80  # +inf
    bad[8000] = 0xFE00 if code == "F16" else 0xFFC0  # a NaN later on
    src = bad.view(np.float16) if code == "F16" else bad
    with pytest.raises(MinibloomError, match=r"tensor 'w': holds inf at flat index 7321 \(weights must be finite\)"):
        W.widen(src, code, np.float32, where="tensor 'w'", threads=2)
    good = bits.view(np.float16) if code == "F16" else bits
    same_bits(W.widen(good, code, np.float64, where="tensor 'w'"), expected(bits, code, np.float64))
    # 65504, binary16's largest finite value, is not mistaken for the inf the fast path has to redo
    top = np.array([0x7BFF, 0xFBFF] * 3000, np.uint16)
    if code == "F16":
        same_bits(W.widen(top.view(np.float16), code, np.float32, where="w"), expected(top, code, np.float32))


def test_bad_arguments(path):
    with pytest.raises(MinibloomError, match="not a 16-bit float code"):
        W.widen(PATTERNS, "F32", np.float32)
    with pytest.raises(MinibloomError, match="cannot widen"):
        W.widen_into(PATTERNS, "BF16", np.empty(5, np.float32))
    with pytest.raises(MinibloomError, match="cannot widen"):
        W.widen_into(PATTERNS, "BF16", np.empty(PATTERNS.shape, np.float16))


def test_bf16_to_f32_is_the_shift():
    same_bits(bf16_to_f32(PATTERNS), expected(PATTERNS, "BF16", np.float32))
    same_bits(bf16_to_f32(PATTERNS.reshape(256, 256))[3], expected(PATTERNS[768:1024], "BF16", np.float32))


def extension():
    """The built C extension, or a skip saying why there is none."""
    if native.kernel("F16", np.float32) is None:
        pytest.skip(f"no C kernels here: {native.reason}")
    from minibloom.formats import _widen

    return _widen


KERNELS = [("F16", np.float32, "f16_f32"), ("F16", np.float64, "f16_f64"), ("BF16", np.float32, "bf16_f32"),
           ("BF16", np.float64, "bf16_f64")]


@pytest.mark.parametrize("code, dtype, name", KERNELS)
def test_the_c_kernels_on_every_bit_pattern(code, dtype, name):
    """Called directly: every finite value bit for bit as NumPy converts it (subnormals and signed zeros among them),
    and the result flags exactly the inputs holding an inf or NaN (whose payloads ``widen`` then takes from NumPy)."""
    fn = getattr(extension(), name)
    want = expected(PATTERNS, code, dtype)
    finite = np.isfinite(want)
    out = np.full(PATTERNS.size, 7, dtype)
    assert fn(PATTERNS, out) is True
    ints = {4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize]
    np.testing.assert_array_equal(out[finite].view(ints), want[finite].view(ints))
    assert np.isnan(out[np.isnan(want)]).all() and np.array_equal(out[np.isinf(want)], want[np.isinf(want)])
    for n in (0, 1, 15, 16, 17, 33, 1000):  # SIMD steps of 16 and the plain-C tail; all finite: not flagged
        src = np.ascontiguousarray(PATTERNS[finite][5:5 + n])
        got = np.empty(n, dtype)
        assert fn(src, got) is False
        same_bits(got, expected(src, code, dtype))
    special = np.array([0x7E00, 0x7C01, 0xFC00] if code == "F16" else [0x7FC0, 0x7F81, 0xFF80], np.uint16)
    for i in range(3):  # one inf / NaN anywhere among finite values is flagged, in a SIMD step or in the tail
        src = np.ones(40, np.uint16)
        src[[3, 20, 39][i]] = special[i]
        assert fn(src, np.empty(40, dtype)) is True


@pytest.mark.parametrize("code, dtype, name", KERNELS)
def test_the_c_kernels_refuse_bad_arguments(code, dtype, name):
    fn = getattr(extension(), name)
    bits = np.arange(64, dtype=np.uint16)
    other = np.float64 if np.dtype(dtype) == np.float32 else np.float32
    bad = [
        ((bits[::2], np.empty(32, dtype)), "contiguous"),  # strided source
        ((bits, np.empty(128, dtype)[::2]), "contiguous"),  # strided destination
        ((bits, np.empty(63, dtype)), "64 source items but room for 63"),
        ((bits, np.empty(64, other)), "destination must hold"),
        ((bits, np.empty(64, np.dtype(dtype).newbyteorder(">"))), "destination must hold"),
        ((bits.astype(np.float32), np.empty(64, dtype)), "source must hold"),
        ((np.zeros(63, np.uint8), np.empty(31, dtype)), "source must hold"),  # raw bytes, an odd count
        ((bits.astype(">u2"), np.empty(64, dtype)), "source must hold"),
        ((bits, np.empty(64, dtype)[None].repeat(2, 0).T), "contiguous"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            fn(*args)
    ro = np.empty(64, dtype)
    ro.flags.writeable = False
    with pytest.raises((ValueError, BufferError)):
        fn(bits, ro)
    with pytest.raises(TypeError):
        fn("not a buffer", np.empty(64, dtype))
    with pytest.raises(TypeError):
        fn(bits)


END_OF_MAPPING = """
import ctypes, mmap, sys
import numpy as np
from minibloom.errors import MinibloomError
from minibloom.formats import native
from minibloom.formats.widen import widen
P = mmap.PAGESIZE
buf = mmap.mmap(-1, P, prot=mmap.PROT_READ | mmap.PROT_WRITE)  # one page: the next one is not ours
raw = np.frombuffer(buf, np.uint8)
raw[:] = 0x3C  # finite patterns
ok = 0
for name in ("f16_f32", "f16_f64", "bf16_f32", "bf16_f64"):
    fn = native.kernel(name.split("_")[0].upper(), np.float32 if name.endswith("32") else np.float64)
    for nbytes in (1, 3, 33, P - 1):  # odd: the last item would reach past the mapping
        try:
            fn(raw[P - nbytes:], np.empty(nbytes, np.float32))
        except ValueError:
            ok += 1
        try:
            widen(raw[P - nbytes:], "F16", np.float32)
        except MinibloomError:
            ok += 1
    for nbytes in (2, 34, P):  # even: exactly the bytes the array holds are read
        src = raw[P - nbytes:].view(np.uint16)
        dst = np.empty(src.size, np.float32 if name.endswith("32") else np.float64)
        assert fn(src, dst) is False
        ok += int(np.array_equal(dst, native.reference(src, name.split("_")[0].upper(), dst.dtype)))
print(ok)
"""


def test_a_source_at_the_end_of_a_mapping_raises_and_the_process_survives():
    """A uint8 array that ends at the last byte of a one-page mapping, with an odd length, is refused (a kernel
    would have to read past the mapping to take it as 16-bit items); with an even length exactly its bytes are read.
    Run in a child process: a crash there is a failing return code here, not a lost test run."""
    extension()
    r = subprocess.run([sys.executable, "-c", END_OF_MAPPING], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == [str(4 * 4 * 2 + 4 * 3)]


@pytest.mark.parametrize("value", ["0", "off", "OFF", " False ", "no"])
def test_minibloom_native_switches_the_extension_off(value):
    """With the switch off in a fresh process the extension is never imported, and ``widen`` still gives NumPy's
    results."""
    code = ("import sys, numpy as np; from minibloom.formats import native, widen; "
            "h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16); "
            "same = np.array_equal(widen.widen(h, 'F16', np.float32), h.astype(np.float32), equal_nan=True); "
            "print(native.kernel('F16', np.float32) is None, 'minibloom.formats._widen' in sys.modules, same); "
            "print(native.reason)")
    env = {**os.environ, "MINIBLOOM_NATIVE": value}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    flags, why = r.stdout.splitlines()
    assert flags.split() == ["True", "False", "True"] and why == f"MINIBLOOM_NATIVE={value}"


def test_switching_off_later_in_the_process_takes_effect(monkeypatch):
    assert extension() is not None and native.kernel("BF16", np.float64) is not None
    monkeypatch.setenv("MINIBLOOM_NATIVE", "off")
    assert native.kernel("BF16", np.float64) is None and "MINIBLOOM_NATIVE" in native.reason
    monkeypatch.setenv("MINIBLOOM_NATIVE", "1")
    assert native.kernel("BF16", np.float64) is not None and native.reason.startswith("in use")


def test_the_package_works_without_the_extension(monkeypatch):
    """An install without a compiler has no ``_widen``: ``kernel`` says so and ``widen`` runs the NumPy passes."""
    import minibloom.formats

    monkeypatch.setattr(native, "_kernels", None)
    monkeypatch.setattr(native, "_loaded", native._loaded)  # restored afterwards with the kernels
    monkeypatch.setitem(sys.modules, "minibloom.formats._widen", None)  # importing it now raises ImportError
    monkeypatch.delattr(minibloom.formats, "_widen", raising=False)
    monkeypatch.delenv("MINIBLOOM_NATIVE", raising=False)
    assert native.kernel("F16", np.float32) is None and "not built" in native.reason
    for code in ("F16", "BF16"):
        src = PATTERNS.view(np.float16) if code == "F16" else PATTERNS
        same_bits(W.widen(src, code, np.float32), expected(PATTERNS, code, np.float32))
