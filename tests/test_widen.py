"""16-bit -> 32/64-bit widening (``minibloom.formats.widen``): bit for bit what NumPy's cast and the bfloat16 shift
give, for every one of the 65536 patterns, on every path (one block, several blocks on several threads, strided
sources), and the finite check names the first bad value. Every test runs twice: with the machine-code kernels
(``minibloom.formats.native``, where this machine can run them) and with the NumPy passes they replace."""

from __future__ import annotations

import numpy as np
import pytest

from minibloom.errors import MinibloomError
from minibloom.formats import native
from minibloom.formats import widen as W
from minibloom.formats.safetensors import bf16_to_f32

PATTERNS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@pytest.fixture(autouse=True, params=["native", "numpy"])
def path(request, monkeypatch):
    """Which conversion widens: the machine-code kernels or the NumPy passes."""
    if request.param == "numpy":
        monkeypatch.setattr(native, "kernel", lambda code, dtype: None)
    elif native.kernel("F16", np.float32) is None:
        pytest.skip(f"no machine-code kernels here: {native.reason}")
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
def test_every_bit_pattern(code, dtype):
    src = PATTERNS.view(np.float16) if code == "F16" else PATTERNS
    same_bits(W.widen(src, code, dtype), expected(PATTERNS, code, dtype))
    # inf, NaN (payloads and signalling NaNs too), subnormals, signed zeros among them
    if code == "F16":
        special = np.array([0x0000, 0x8000, 0x0001, 0x83FF, 0x7C00, 0xFC00, 0x7C01, 0x7E00, 0xFFFF], np.uint16)
        same_bits(W.widen(special.view(np.float16), code, dtype), expected(special, code, dtype))


@pytest.mark.parametrize("code", ["F16", "BF16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_blocks_on_threads_and_strided_sources(code, dtype, monkeypatch):
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
def test_finite_check_names_the_first_bad_value(code, monkeypatch):
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


def test_bad_arguments():
    with pytest.raises(MinibloomError, match="not a 16-bit float code"):
        W.widen(PATTERNS, "F32", np.float32)
    with pytest.raises(MinibloomError, match="cannot widen"):
        W.widen_into(PATTERNS, "BF16", np.empty(5, np.float32))
    with pytest.raises(MinibloomError, match="cannot widen"):
        W.widen_into(PATTERNS, "BF16", np.empty(PATTERNS.shape, np.float16))


def test_bf16_to_f32_is_the_shift():
    same_bits(bf16_to_f32(PATTERNS), expected(PATTERNS, "BF16", np.float32))
    same_bits(bf16_to_f32(PATTERNS.reshape(256, 256))[3], expected(PATTERNS[768:1024], "BF16", np.float32))


def test_native_bytes_are_the_listing(path, tmp_path):
    """``native.CODE`` is ``native.ASSEMBLY`` assembled, and ``ENTRY`` where each function starts (needs binutils)."""
    import shutil
    import subprocess

    if path == "numpy" or not all(shutil.which(t) for t in ("as", "objcopy", "nm")):
        pytest.skip("checked once, where GNU as / objcopy / nm exist")
    (tmp_path / "k.s").write_text(native.ASSEMBLY)
    subprocess.run(["as", "-o", str(tmp_path / "k.o"), str(tmp_path / "k.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.text", str(tmp_path / "k.o"), str(tmp_path / "k.bin")],
                   check=True)
    assert (tmp_path / "k.bin").read_bytes() == native.CODE
    symbols = dict(line.split()[::-2] for line in subprocess.run(["nm", str(tmp_path / "k.o")], check=True,
                                                                 capture_output=True, text=True).stdout.splitlines())
    names = {("F16", "float32"): "f16_f32", ("F16", "float64"): "f16_f64", ("BF16", "float32"): "bf16_f32",
             ("BF16", "float64"): "bf16_f64"}
    assert {key: int(symbols[name], 16) for key, name in names.items()} == native.ENTRY


def test_native_kernels_can_be_switched_off(path):
    import subprocess
    import sys

    if path == "numpy":
        pytest.skip("one run is enough")
    code = ("from minibloom.formats import native; import numpy as np; "
            "print(native.kernel('F16', np.float32) is None, native.reason)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "MINIBLOOM_NATIVE": "0"}).stdout
    assert out.split() == ["True", "MINIBLOOM_NATIVE=0"]
