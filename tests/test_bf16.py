"""bfloat16 rounding, written once (``minibloom.formats.safetensors.f32_to_bf16``), against torch's own cast."""

from __future__ import annotations

import numpy as np
import pytest

from minibloom.formats.safetensors import bf16_to_f32, f32_to_bf16, round_to_bf16

torch = pytest.importorskip("torch")


def torch_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def edge_values() -> np.ndarray:
    f = np.finfo(np.float32)
    bf16_max = float(bf16_to_f32(np.array([0x7F7F], np.uint16))[0])
    halfway = np.array([0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001], np.uint32).view(np.float32)  # ties, near
    values = [0.0, -0.0, 1.0, -1.0, f.max, -f.max, f.tiny, f.tiny / 3, -f.tiny / 7, f.smallest_subnormal,
              np.inf, -np.inf, bf16_max, np.nextafter(bf16_max, np.float32(np.inf), dtype=np.float32),
              3.3e38, 3.39e38, 3.4e38]
    return np.concatenate([np.array(values, np.float32), halfway, -halfway])


@pytest.mark.parametrize("scale", [1e-40, 1e-3, 1.0, 1e30])
def test_random_values_round_like_torch(scale):
    x = (np.random.default_rng(0).standard_normal(200_000) * scale).astype(np.float32)
    np.testing.assert_array_equal(f32_to_bf16(x), torch_bits(x))


def test_ties_subnormals_infinities_and_overflow_round_like_torch():
    x = edge_values()
    np.testing.assert_array_equal(f32_to_bf16(x), torch_bits(x))
    assert np.isinf(round_to_bf16(np.array([3.4e38], np.float32)))[0]  # past bfloat16's largest value: inf


def test_every_bit_pattern_near_the_rounding_boundaries():
    """All low halves 0x7FF0..0x8010 under a few high halves: the round-half-to-even boundary, bit by bit."""
    hi = np.array([0x0000, 0x0001, 0x3F80, 0x3F81, 0x7F7F, 0x8000, 0xBF80, 0xFF7F], np.uint32) << 16
    lo = np.arange(0x7FF0, 0x8011, dtype=np.uint32)
    x = (hi[:, None] | lo[None, :]).reshape(-1).view(np.float32)
    np.testing.assert_array_equal(f32_to_bf16(x), torch_bits(x))


def test_nan_stays_nan_with_its_sign():
    x = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF], np.uint32).view(np.float32)
    out = round_to_bf16(x)
    assert np.isnan(out).all()
    assert list(np.signbit(out)) == list(np.signbit(x))


def test_round_trip_of_bfloat16_values_is_exact():
    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    x = bf16_to_f32(bits)
    finite = np.isfinite(x)
    np.testing.assert_array_equal(f32_to_bf16(x)[finite], bits[finite])
