"""The NumPy primitives at decoding's shapes (one new token per row: T = 1, B = 1 or 8, S from 1 to a few hundred
keys, left padding) against ``minibloom.model.REFERENCE``, with the bounds of ``tests/test_primitives.py``: bitwise
where ``minibloom/fast.py`` keeps the reference's operations and their order, else float64 within ``FP64_SELF`` and
float32 within float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from minibloom import fast
from minibloom import model as M
from minibloom.testing import FP64_SELF, assert_rel_close

REF, NP = M.REFERENCE, fast.PRIMITIVES
F32_ROUNDING = 1e-6  # tests/test_primitives.py's bound for float32
DTYPES = [np.float16, np.float32, np.float64]


def tol(dtype) -> float:
    return FP64_SELF.rel if np.dtype(dtype) == np.float64 else F32_ROUNDING


def left_padded(B: int, S: int) -> np.ndarray:
    """[B, S] attention mask: row b has b * S // (2 B) pads on the left (row 0 none); the last key is always real."""
    mask = np.ones((B, S), np.int64)
    for b in range(B):
        mask[b, :b * S // (2 * B)] = 0
    return mask


def decode_inputs(rng, B: int, S: int, dtype, H: int = 4, D: int = 16, room: int = 7):
    """What ``model.attention`` passes ``attend`` in a decoding step: q cut out of the fused QKV output (a strided
    view), k and v the filled part of a bigger cache, ALiBi and the mask as ``model.forward`` builds them."""
    mask = left_padded(B, S)
    qkv = rng.standard_normal((B, 1, H, 3, D)).astype(dtype)
    q = np.transpose(qkv[:, :, :, 0], (0, 2, 1, 3))  # [B, H, 1, D]
    k_buf, v_buf = (rng.standard_normal((B, H, S + room, D)).astype(dtype) for _ in range(2))
    k, v = k_buf[:, :, :S], v_buf[:, :, :S]
    slopes = M.alibi_slopes(H, np.float64 if dtype == np.float64 else np.float32)
    alibi = M.alibi_bias(mask, slopes).astype(dtype)  # [B, H, 1, S]
    return q, k, v, alibi, M.causal_mask(mask, 1)


def assert_same(got, want, dtype, what: str):
    """Bitwise equal (NaNs in the same places)."""
    assert got.shape == want.shape and got.dtype == want.dtype == dtype, what
    np.testing.assert_array_equal(got, want, err_msg=what)


# ---- attend ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("S", [1, 2, 17, 300])
def test_one_query_attention_is_bitwise_the_reference(rng, dtype, B, S):
    q, k, v, alibi, allowed = decode_inputs(rng, B, S, dtype)
    before = [a.copy() for a in (q, k, v, alibi, allowed)]
    ctx, probs = NP.attend(q, k, v, alibi, allowed, True)
    ref_ctx, ref_probs = REF.attend(q, k, v, alibi, allowed, True)
    assert_same(ctx, ref_ctx, dtype, "context")
    assert_same(probs, ref_probs, dtype, "probabilities")
    assert ctx.flags.c_contiguous  # model.attention reshapes it to [B, 1, C] without a copy
    if B > 1 and S > 2:
        assert np.all(probs[~np.broadcast_to(allowed, probs.shape)] == 0) and not allowed.all()  # padding hidden
    alone, none = NP.attend(q, k, v, alibi, allowed, False)
    assert none is None
    assert_same(alone, ctx, dtype, "context without the probabilities")
    for a, b in zip((q, k, v, alibi, allowed), before):
        np.testing.assert_array_equal(a, b)  # inputs untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_query_attention_takes_no_block_and_no_broadcast(rng, dtype, monkeypatch):
    """The decoding step runs ``attend_one``: neither the blocked path nor a broadcast copy of the mask."""
    def refuse(*args, **kwargs):
        raise AssertionError("the blocked path ran for a single query")

    monkeypatch.setattr(fast, "_attend_block", refuse)
    monkeypatch.setattr(fast, "_blockwise", refuse)
    monkeypatch.setattr(np, "broadcast_to", refuse)
    q, k, v, alibi, allowed = decode_inputs(rng, 8, 40, dtype)
    ctx = NP.attend(q, k, v, alibi, allowed)[0]
    monkeypatch.undo()
    assert_same(ctx, REF.attend(q, k, v, alibi, allowed)[0], dtype, "context")


def hostile(rng, dtype):
    """One-query inputs outside ``model.forward``'s habits: (q, k, v, alibi, allowed)."""
    q, k, v, alibi, allowed = decode_inputs(rng, 3, 9, dtype)
    dead = allowed.copy()
    dead[1] = False  # a row that sees nothing: uniform weights in the reference
    nan_bias = alibi.copy()
    nan_bias[0, 1, 0, 3] = np.nan
    inf_bias = alibi.copy()
    inf_bias[2, :, 0, :] = -np.inf  # every score -inf: NaN rows in the reference
    wide = np.float64 if dtype == np.float32 else np.float32
    return {
        "dead-row": (q, k, v, alibi, dead),
        "nan-bias": (q, k, v, nan_bias, allowed),
        "minus-inf-bias": (q, k, v, inf_bias, allowed),
        "int-mask": (q, k, v, alibi, allowed.astype(np.int64)),
        "float-mask-with-nan": (q, k, v, alibi, np.where(allowed, np.nan, 0.0)),
        "mask-and-alibi-for-the-batch": (q, k, v, alibi[:1], allowed[:1]),
        "mask-per-head": (q, k, v, alibi, rng.random((3, 4, 1, 9)) < 0.7),
        "2d-mask": (q, k, v, alibi, allowed[0, 0]),
        "mixed-dtypes": (q, k, v, alibi.astype(wide), allowed),
        "kv-broadcast-over-batch": (q, k[:1], v[:1], alibi, allowed),
        "alibi-per-query-wider": (q, k, v, np.repeat(alibi, 2, axis=2), allowed),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("which", ["dead-row", "nan-bias", "minus-inf-bias", "int-mask", "float-mask-with-nan",
                                   "mask-and-alibi-for-the-batch", "mask-per-head", "2d-mask", "mixed-dtypes",
                                   "kv-broadcast-over-batch", "alibi-per-query-wider"])
def test_one_query_attention_on_any_input_the_reference_accepts(rng, dtype, which):
    q, k, v, alibi, allowed = hostile(rng, dtype)[which]
    with np.errstate(invalid="ignore"):
        ctx, probs = NP.attend(q, k, v, alibi, allowed, True)
        ref_ctx, ref_probs = REF.attend(q, k, v, alibi, allowed, True)
    assert ctx.shape == ref_ctx.shape and probs.shape == ref_probs.shape, which
    assert ctx.dtype == ref_ctx.dtype and probs.dtype == ref_probs.dtype, which
    np.testing.assert_array_equal(np.isnan(ctx), np.isnan(ref_ctx))
    np.testing.assert_array_equal(np.isnan(probs), np.isnan(ref_probs))
    ok = ~np.isnan(ref_ctx)
    assert ok.any()
    assert_rel_close(ctx[ok], ref_ctx[ok], tol(dtype), f"context, {which}")
    ok = ~np.isnan(ref_probs)
    assert_rel_close(probs[ok], ref_probs[ok], tol(dtype), f"probabilities, {which}")
    if which == "dead-row":
        assert np.all(probs[1] == probs[1, 0, 0, 0])  # uniform over the row's keys, as the reference


def test_one_query_attention_can_fail(rng):
    """The bitwise comparison sees one key moved by one unit in the last place."""
    q, k, v, alibi, allowed = decode_inputs(rng, 8, 17, np.float64)
    k2 = k.copy()
    k2[5, 2, 9, 3] = np.nextafter(k2[5, 2, 9, 3], np.inf)
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(NP.attend(q, k2, v, alibi, allowed)[0], REF.attend(q, k, v, alibi, allowed)[0])


# ---- the rest of a decoding step ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 8])
def test_layer_norm_and_residual_at_decode_shapes_are_bitwise(rng, dtype, B):
    C = 96
    stream = (rng.standard_normal((B, 5, C)) * 3 + 1).astype(dtype)
    w, b = (1 + 0.2 * rng.standard_normal(C)).astype(dtype), (0.1 * rng.standard_normal(C)).astype(dtype)
    for x in (stream[:, :1].copy(), stream[:, -1:]):  # a step's [B, 1, C], and logits="last"'s strided view
        before = x.copy()
        assert_same(NP.layer_norm(x, w, b, 1e-5), REF.layer_norm(x, w, b, 1e-5), dtype, "layer_norm")
        np.testing.assert_array_equal(x, before)
        a = NP.layer_norm(x, w, b, 1e-5)  # a fresh branch output, as the model passes residual_add
        want = REF.residual_add(a, x)
        assert_same(NP.residual_add(a, x), want, dtype, "residual_add")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 8])
def test_linear_gelu_and_head_at_decode_shapes(rng, dtype, B):
    """One row: the reference's orientation (bitwise); a few rows: (W @ x.T).T, within rounding."""
    C, F, V = 64, 256, 1000
    x = rng.standard_normal((B, 1, C)).astype(dtype)
    w1, b1 = (0.1 * rng.standard_normal((F, C))).astype(dtype), (0.1 * rng.standard_normal(F)).astype(dtype)
    head = (0.1 * rng.standard_normal((V, C))).astype(dtype)
    got = {"linear": NP.linear(x, w1, b1), "linear_gelu": NP.linear_gelu(x, w1, b1), "head": NP.head(x, head)}
    want = {"linear": REF.linear(x, w1, b1), "linear_gelu": REF.linear_gelu(x, w1, b1), "head": REF.head(x, head)}
    for name in got:
        assert got[name].shape == want[name].shape and got[name].dtype == dtype, name
        assert got[name].flags.c_contiguous, name
        if B == 1 or dtype == np.float16:  # float16 products are NumPy's own loop in either orientation
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            assert_rel_close(got[name], want[name], tol(dtype), f"{name}, {B} rows")
