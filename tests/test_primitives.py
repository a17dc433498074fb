"""Every NumPy primitive (``minibloom.fast.PRIMITIVES``) against its reference (``minibloom.model.REFERENCE``), at
function level (llm.c's validate-every-kernel habit), then the whole model through both tables.

Bounds: float64 within ``FP64_SELF`` (1e-12), float32 within float32 rounding (``F32_ROUNDING``, 1e-6 of the
reference's scale); bitwise where ``minibloom/fast.py`` says the operations are the same.
"""

from __future__ import annotations

import numpy as np
import pytest

import minibloom
from minibloom import fast
from minibloom import model as M
from minibloom.testing import FP64_SELF, assert_rel_close
from factory import left_pad, make_model, random_ids, save

F32_ROUNDING = 1e-6
F32_MODEL = 1e-5  # hidden states and probabilities through every layer (sums of up to 140 float32 terms)
REF, NP = M.REFERENCE, fast.PRIMITIVES


def tol(dtype):
    return FP64_SELF if np.dtype(dtype) == np.float64 else F32_ROUNDING


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---- elementwise and products ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_is_bitwise_the_reference(rng, dtype):
    x = (rng.standard_normal((2, 5, 48)) * 3 + 1).astype(dtype)
    w, b = rng.standard_normal(48).astype(dtype), rng.standard_normal(48).astype(dtype)
    np.testing.assert_array_equal(NP.layer_norm(x, w, b, 1e-5), REF.layer_norm(x, w, b, 1e-5))
    np.testing.assert_array_equal(NP.layer_norm(x[0], w, b, 1e-5), REF.layer_norm(x[0], w, b, 1e-5))  # 2-D rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 2, 7, 128, 129, 300])  # 1 and > 128: x @ W.T; 2..128: (W @ x.T).T
def test_linear_both_orientations(rng, dtype, rows):
    x = rng.standard_normal((rows, 64)).astype(dtype)
    w, b = rng.standard_normal((96, 64)).astype(dtype), rng.standard_normal(96).astype(dtype)
    got, ref = NP.linear(x, w, b), REF.linear(x, w, b)
    assert got.shape == (rows, 96) and got.dtype == dtype and got.flags.c_contiguous
    if rows == 1 or rows > fast.SKINNY_ROWS:
        np.testing.assert_array_equal(got, ref)  # the same product, the same bias add
    else:
        assert_rel_close(got, ref, tol(dtype), f"linear, {rows} rows")
    x3 = x.reshape(1, rows, 64)
    np.testing.assert_array_equal(NP.linear(x3, w, b), got.reshape(1, rows, 96))  # [B, T, C] in, [B, T, out] out


def test_linear_sliced_products_follow_the_reference(rng):
    x = rng.standard_normal((2, 9, 64))
    w, b = rng.standard_normal((48, 64)), rng.standard_normal(48)
    np.testing.assert_array_equal(NP.linear(x, w, b, tp=4), REF.linear(x, w, b, tp=4))
    assert not np.array_equal(REF.linear(x, w, b, tp=4), REF.linear(x, w, b))  # the slicing changes the rounding


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 40, 200])
def test_linear_gelu(rng, dtype, rows, monkeypatch):
    monkeypatch.setattr(fast, "GELU_BLOCK_ELEMS", 5 * 192)  # blocks of 5 rows: the last one short
    x = rng.standard_normal((rows, 48)).astype(dtype)
    w, b = rng.standard_normal((192, 48)).astype(dtype), rng.standard_normal(192).astype(dtype)
    got, ref = NP.linear_gelu(x, w, b), REF.linear_gelu(x, w, b)
    if rows == 1 or rows > fast.SKINNY_ROWS:
        np.testing.assert_array_equal(got, ref)
    else:
        assert_rel_close(got, ref, tol(dtype), "linear_gelu")
    # with the same product the in-place GeLU is bitwise the reference's
    np.testing.assert_array_equal(fast.gelu_(x.copy()), M.gelu(x))


def test_residual_add_writes_into_its_first_argument(rng):
    a, x = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    want = REF.residual_add(a, x)
    got = NP.residual_add(a, x)
    assert got is a
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 20, 200])
def test_head(rng, dtype, rows, monkeypatch):
    x = rng.standard_normal((2, rows, 32)).astype(dtype)
    w = rng.standard_normal((300, 32)).astype(dtype)
    ref = REF.head(x, w)
    got = NP.head(x, w)
    assert got.shape == (2, rows, 300)
    assert_rel_close(got, ref, tol(dtype), "head")
    monkeypatch.setattr(fast, "BUFFERS", fast.BufferPool(min_bytes=1))  # into pooled memory: the same numbers
    np.testing.assert_array_equal(NP.head(x, w), got)


# ---- attention -------------------------------------------------------------------------------------------------
def attention_inputs(rng, mask, T, H=6, D=8, dtype=np.float64):
    """q for the last T positions of ``mask`` [B, S], k and v for all S, ALiBi and the causal mask as the model
    builds them."""
    B, S = mask.shape
    q = rng.standard_normal((B, H, T, D)).astype(dtype)
    k = rng.standard_normal((B, H, S, D)).astype(dtype)
    v = rng.standard_normal((B, H, S, D)).astype(dtype)
    slopes = M.alibi_slopes(H, np.float64 if dtype == np.float64 else np.float32)
    alibi = M.alibi_bias(mask, slopes).astype(dtype)
    return q, k, v, alibi, M.causal_mask(mask, T)


MASKS = {
    "full": [[1] * 13, [1] * 13],
    "left": [[1] * 13, [0] * 5 + [1] * 8],
    "right": [[1] * 13, [1] * 9 + [0] * 4],
    "hole": [[1] * 13, [0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("T", [13, 4, 1])  # a prompt, a chunk after a cache, one decode step
@pytest.mark.parametrize("blocks", ["one", "small"])
def test_attend(rng, dtype, mask_name, T, blocks, monkeypatch):
    if blocks == "small":  # blocks of 2 heads x a few queries: block edges cut heads, queries and the padding
        monkeypatch.setattr(fast, "SCORE_BLOCK_ELEMS", 2 * 3 * 13)
        monkeypatch.setattr(fast, "HEADS_PER_BLOCK", 2)
    mask = np.array(MASKS[mask_name])
    q, k, v, alibi, allowed = attention_inputs(rng, mask, T, dtype=dtype)
    ctx, probs = NP.attend(q, k, v, alibi, allowed, True)
    ref_ctx, ref_probs = REF.attend(q, k, v, alibi, allowed, True)
    assert ctx.shape == ref_ctx.shape == (2, T, 6, 8) and probs.shape == ref_probs.shape == (2, 6, T, 13)
    real = mask[:, 13 - T:].astype(bool)  # the queries at real positions
    assert_rel_close(ctx[real], ref_ctx[real], tol(dtype), "context at real queries")
    assert_rel_close(ctx, ref_ctx, tol(dtype), "context everywhere (pad queries attend uniformly, as the reference)")
    assert_rel_close(probs, ref_probs, tol(dtype), "attention probabilities")
    ctx_only, none = NP.attend(q, k, v, alibi, allowed, False)
    assert none is None and REF.attend(q, k, v, alibi, allowed, False)[1] is None
    np.testing.assert_array_equal(ctx_only, ctx)


def test_attend_can_fail(rng):
    """The comparison is sensitive: one key moved by 1e-9 of its scale is seen."""
    mask = np.array(MASKS["left"])
    q, k, v, alibi, allowed = attention_inputs(rng, mask, 13)
    k2 = k.copy()
    k2[1, 2, 7] *= 1 + 1e-9
    with pytest.raises(AssertionError):
        assert_rel_close(NP.attend(q, k2, v, alibi, allowed)[0], REF.attend(q, k, v, alibi, allowed)[0], FP64_SELF)


# ---- BufferPool ------------------------------------------------------------------------------------------------
def test_pooled_memory_is_reused_only_once_released(rng):
    pool = fast.BufferPool(min_bytes=1)
    a = pool.empty((4, 100), np.float32)
    a[:] = 1.0
    address = a.ctypes.data
    view = a[1:3]
    del a
    b = pool.empty((4, 100), np.float32)
    assert b.ctypes.data != address  # the view keeps the first array's memory taken
    assert np.all(view == 1.0)
    del view
    c = pool.empty((4, 100), np.float32)
    assert c.ctypes.data == address  # gone entirely: reused
    del c
    assert pool.empty((3,), np.float32).ctypes.data != address  # a much smaller request: its own memory
    assert pool.empty((4, 100), np.float32).ctypes.data == address  # the spare waits for one that fits


# ---- the model through both tables ----------------------------------------------------------------------------
pytest.importorskip("torch")

CONFIGS = {
    "6-heads": dict(hidden=48, n_head=6, n_layer=3),
    "12-heads": dict(hidden=96, n_head=12, n_layer=2),
    "post-ln": dict(hidden=48, n_head=6, n_layer=2, post_ln=True),
    "tp2": dict(hidden=48, n_head=6, n_layer=2, tp=2, slow=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def path(request, tmp_path_factory):
    return save(make_model(seed=5, **CONFIGS[request.param]), tmp_path_factory.mktemp(request.param))


def both(m, ids, mask=None, **kw):
    """(numpy, reference) outputs of one call of the one model."""
    return tuple(m.forward(ids, mask, primitives=ops, **kw) for ops in (NP, REF))


def prompts(length: int):
    """Two rows, the second left-padded."""
    return left_pad([random_ids(256, length, seed=1).tolist(), random_ids(256, length - 5, seed=2).tolist()])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("length", [17, 140])  # 140 rows per sequence: the ordinary GEMM branch of every product
def test_forward_through_both_tables(path, dtype, length, record):
    m = minibloom.load(path, dtype=dtype)
    ids, mask = prompts(length)
    a, b = both(m, ids, mask, output_hidden_states=True, output_attentions=True)
    assert a.logits.dtype == b.logits.dtype == np.dtype(dtype)
    bound = FP64_SELF if dtype == "float64" else F32_MODEL
    real = mask.astype(bool)
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        assert_rel_close(x[real], y[real], bound, f"hidden state {i}")
    for i, (x, y) in enumerate(zip(a.attentions, b.attentions)):
        assert_rel_close(np.moveaxis(x, 1, 2)[real], np.moveaxis(y, 1, 2)[real], bound, f"probabilities {i}")
    record(f"numpy vs reference {dtype}, {length} tokens",
           assert_rel_close(a.logits[real], b.logits[real], tol(dtype), "logits"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_last_and_no_logits(path, dtype):
    m = minibloom.load(path, dtype=dtype)
    ids, mask = prompts(12)
    full = m.forward(ids, mask, primitives=REF).logits
    for ops in (NP, REF):
        last = m.forward(ids, mask, logits="last", primitives=ops).logits
        assert last.shape == (2, 1, full.shape[-1])
        assert_rel_close(last, full[:, -1:], FP64_SELF if dtype == "float64" else F32_MODEL, f"last ({ops.name})")
        assert m.forward(ids, mask, logits="none", primitives=ops).logits is None


@pytest.mark.parametrize("ops", [NP, REF], ids=["numpy", "reference"])
def test_cached_decode_equals_the_full_pass(path, ops):
    m = minibloom.load(path, dtype="float64")
    ids, mask = prompts(10)
    cache = m.new_cache(2, 14)
    steps, full_ids, full_mask = [m.forward(ids, mask, cache=cache, primitives=ops).logits], ids, mask
    for t in range(4):
        nxt = random_ids(256, (2, 1), seed=10 + t)
        full_ids = np.concatenate([full_ids, nxt], axis=1)
        full_mask = np.concatenate([full_mask, np.ones((2, 1), np.int64)], axis=1)
        steps.append(m.forward(nxt, full_mask, cache=cache, primitives=ops).logits)
    got = np.concatenate(steps, axis=1)
    want = m.forward(full_ids, full_mask, primitives=REF).logits
    real = full_mask.astype(bool)
    assert_rel_close(got[real], want[real], FP64_SELF, f"cached decode ({ops.name}) vs full pass")


def test_bloom_picks_its_table_by_backend(path):
    assert minibloom.load(path).primitives is NP
    pytest.importorskip("array_api_strict")
    assert minibloom.load(path, backend="array_api_strict").primitives is REF


def test_the_table_is_what_runs(path):
    """No detection of patched functions: the primitives passed are the ones called."""
    import dataclasses

    m = minibloom.load(path, dtype="float64")
    ids = random_ids(256, (1, 6), seed=9)
    doubled = dataclasses.replace(REF, head=lambda x, w: 2.0 * REF.head(x, w))
    want = 2.0 * m.forward(ids, primitives=REF).logits
    np.testing.assert_array_equal(m.forward(ids, primitives=doubled).logits, want)
