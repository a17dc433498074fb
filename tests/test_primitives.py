"""Every NumPy primitive (``minibloom.fast.PRIMITIVES``) against its reference (``minibloom.model.REFERENCE``) at
function level (llm.c's habit: validate every kernel on its own), then the one model (``minibloom.model.forward``)
through both tables, on random checkpoints and on weights/default.

Bounds: float64 within ``FP64_SELF`` (1e-12 relative); float32 within float32 rounding (``F32_ROUNDING``, 1e-6 of
the reference's largest magnitude); bitwise equal where ``minibloom/fast.py`` says the operations are the same.
Float32 attention probabilities carry the rounding of their scores instead (``probs_bound``).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import minibloom
from minibloom import fast
from minibloom import model as M
from minibloom.testing import FP64_SELF, assert_rel_close
from factory import left_pad, make_model, random_ids, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32_ROUNDING = 1e-6
REF, NP = M.REFERENCE, fast.PRIMITIVES
TABLES = {"numpy": NP, "reference": REF}


def tol(dtype) -> float:
    return FP64_SELF.rel if np.dtype(dtype) == np.float64 else F32_ROUNDING


def probs_bound(dtype, S: int) -> float:
    """Attention probabilities: float64 within FP64_SELF. In float32 a score is rounded at its own magnitude, and the
    ALiBi part of a score reaches slope x (S - 1) with every BLOOM slope below 1; a probability is exp(score - max)
    / sum, so it carries twice that rounding relative to itself."""
    if np.dtype(dtype) == np.float64:
        return FP64_SELF.rel
    return max(F32_ROUNDING, 2 * float(np.finfo(np.float32).eps) * (S - 1))


def as_reference_computes(rows: int) -> bool:
    """Whether ``fast`` multiplies ``rows`` rows as ``x @ W.T``, the reference's orientation (bitwise the same)."""
    return rows == 1 or rows > fast.SKINNY_ROWS


def test_the_orientation_boundary_is_what_these_tests_cross():
    assert fast.SKINNY_ROWS == 128  # the row counts below (1, 2, 128, 129 ...) sit on both sides of it


# ---- the axes the tests draw from (hypothesis; profile "ci" in conftest.py: derandomized, bounded) -----------------
FLOATS = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)  # the random inputs' seed: each example draws its own data


def leads(most: int = 300) -> st.SearchStrategy[tuple[int, ...]]:
    """Leading shapes of up to ``most`` rows: 1-D (rows) or 2-D (batch, tokens), on both sides of SKINNY_ROWS."""
    return st.one_of(st.tuples(st.integers(1, most)), st.tuples(st.integers(1, 4), st.integers(1, most // 2)))


def unchanged(*arrays):
    """Copies of the inputs, to check afterwards that a primitive did not write into them."""
    return [a.copy() for a in arrays]


def assert_unchanged(arrays, copies):
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


# ---- layer_norm ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_layer_norm_is_bitwise_the_reference(rng, dtype):
    C = 1920  # wide rows: a float16 running sum rounds differently from np.mean's float32 one (fast._mean)
    x = (rng.standard_normal((2, 5, C)) * 3 + 1).astype(dtype)
    w, b = (1 + 0.2 * rng.standard_normal(C)).astype(dtype), (0.1 * rng.standard_normal(C)).astype(dtype)
    before = unchanged(x, w, b)
    got = NP.layer_norm(x, w, b, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    np.testing.assert_array_equal(got, REF.layer_norm(x, w, b, 1e-5))
    np.testing.assert_array_equal(NP.layer_norm(x[0], w, b, 1e-5), REF.layer_norm(x[0], w, b, 1e-5))  # 2-D rows
    last = x[:, -1:]  # a strided view, as logits="last" slices the stream
    np.testing.assert_array_equal(NP.layer_norm(last, w, b, 1e-5), REF.layer_norm(last, w, b, 1e-5))
    assert_unchanged((x, w, b), before)
    if dtype == np.float16:  # the special case matters: a plain float16 sum would not be bitwise np.mean
        assert not np.array_equal(np.add.reduce(x, axis=-1) / np.float16(C), np.mean(x, axis=-1))


# ---- linear ----------------------------------------------------------------------------------------------------
# leading shapes: 1 row and > 128 rows take x @ W.T; 2..128 rows take (W @ x.T).T; 2-D and 3-D inputs. The examples
# pin each side of the boundary, 1-D and 2-D; the strategy reaches every row count from 1 to 300.
@given(dtype=FLOATS, lead=leads(), seed=SEEDS)
@example(dtype=np.float32, lead=(1,), seed=0)
@example(dtype=np.float64, lead=(2,), seed=0)
@example(dtype=np.float32, lead=(128,), seed=0)
@example(dtype=np.float64, lead=(129,), seed=0)
@example(dtype=np.float64, lead=(1, 1), seed=0)
@example(dtype=np.float32, lead=(4, 32), seed=0)  # 128 rows, 2-D
@example(dtype=np.float64, lead=(3, 43), seed=0)  # 129 rows, 2-D
@example(dtype=np.float32, lead=(2, 150), seed=0)
def test_linear_both_orientations(dtype, lead, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, 64)).astype(dtype)
    w, b = rng.standard_normal((96, 64)).astype(dtype), rng.standard_normal(96).astype(dtype)
    before = unchanged(x, w, b)
    got, ref = NP.linear(x, w, b), REF.linear(x, w, b)
    assert got.shape == (*lead, 96) and got.dtype == dtype and got.flags.c_contiguous
    rows = int(np.prod(lead))
    if as_reference_computes(rows):
        np.testing.assert_array_equal(got, ref)  # the same product, the same bias add
    else:
        assert_rel_close(got, ref, tol(dtype), f"linear, {rows} rows")
    # leading axes are only flattened: the same rows as a 2-D call, bitwise
    np.testing.assert_array_equal(NP.linear(x.reshape(-1, 64), w, b).reshape(got.shape), got)
    assert_unchanged((x, w, b), before)


@given(dtype=FLOATS, lead=leads(most=160), tp=st.sampled_from([2, 4, 8]), seed=SEEDS)
@example(dtype=np.float32, lead=(1,), tp=2, seed=0)
@example(dtype=np.float64, lead=(2, 9), tp=4, seed=0)
@example(dtype=np.float32, lead=(3, 60), tp=4, seed=0)  # 180 rows: the ordinary orientation
@example(dtype=np.float64, lead=(129,), tp=2, seed=0)
def test_linear_sliced_products_are_the_references(dtype, lead, tp, seed):
    """pretraining_tp with slow_but_exact: tp products over slices of the input dimension, summed in order."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, 64)).astype(dtype)
    w, b = rng.standard_normal((48, 64)).astype(dtype), rng.standard_normal(48).astype(dtype)
    got = NP.linear(x, w, b, tp=tp)
    assert got.shape == (*lead, 48) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, REF.linear(x, w, b, tp=tp))
    x2, s = x.reshape(-1, 64), 64 // tp  # the sum written out here
    want = x2[:, :s] @ w[:, :s].T
    for i in range(1, tp):
        want = want + x2[:, i * s:(i + 1) * s] @ w[:, i * s:(i + 1) * s].T
    np.testing.assert_array_equal(got, (want + b).reshape(got.shape))


def test_the_slicing_changes_the_rounding(rng):
    """So the comparisons above can tell the sliced sum from the plain product."""
    x, w, b = rng.standard_normal((2, 9, 64)), rng.standard_normal((48, 64)), rng.standard_normal(48)
    assert not np.array_equal(NP.linear(x, w, b, tp=4), NP.linear(x, w, b))


# ---- linear_gelu -----------------------------------------------------------------------------------------------
# GELU_BLOCK_ELEMS: the default (every input here in one block), whole rows per block (the last block short), or
# less than a row (one row per block)
GELU_BLOCKS = st.one_of(st.none(), st.integers(1, 12).map(lambda rows: rows * 192), st.integers(1, 191))


@given(dtype=FLOATS, lead=leads(most=200), block_elems=GELU_BLOCKS, seed=SEEDS)
@example(dtype=np.float32, lead=(1,), block_elems=None, seed=0)
@example(dtype=np.float64, lead=(37,), block_elems=7 * 192, seed=0)
@example(dtype=np.float32, lead=(200,), block_elems=100, seed=0)
@example(dtype=np.float64, lead=(2, 1), block_elems=100, seed=0)
@example(dtype=np.float32, lead=(4, 10), block_elems=7 * 192, seed=0)
@example(dtype=np.float64, lead=(2, 100), block_elems=None, seed=0)
def test_linear_gelu(dtype, lead, block_elems, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, 48)).astype(dtype)
    w, b = rng.standard_normal((192, 48)).astype(dtype), rng.standard_normal(192).astype(dtype)
    before = unchanged(x, w, b)
    with pytest.MonkeyPatch.context() as mp:
        if block_elems:
            mp.setattr(fast, "GELU_BLOCK_ELEMS", block_elems)
        got, ref = NP.linear_gelu(x, w, b), REF.linear_gelu(x, w, b)
        y = x.reshape(-1, 48)
        no_bias = fast.gelu_(y.copy())
    assert got.shape == (*lead, 192) and got.dtype == dtype and got.flags.c_contiguous
    # the in-place blocked GeLU is the reference's GeLU, bitwise, on the product of the same orientation
    np.testing.assert_array_equal(got, M.gelu(NP.linear(x, w, b)))
    if as_reference_computes(int(np.prod(lead))):
        np.testing.assert_array_equal(got, ref)
    else:
        assert_rel_close(got, ref, tol(dtype), "linear_gelu")
    np.testing.assert_array_equal(no_bias, M.gelu(y))  # no bias: the same blocks, bitwise
    assert_unchanged((x, w, b), before)


# ---- residual_add ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_add_writes_into_its_first_argument(rng, dtype):
    a, x = rng.standard_normal((2, 3, 8)).astype(dtype), rng.standard_normal((2, 3, 8)).astype(dtype)
    want, before = a + x, unchanged(x)
    np.testing.assert_array_equal(REF.residual_add(a, x), want)
    got = NP.residual_add(a, x)
    assert got is a
    np.testing.assert_array_equal(got, want)
    assert_unchanged((x,), before)
    # the stream's last position (a strided view, as block() passes it with logits="last") into a fresh [B, 1, C]
    a1 = rng.standard_normal((2, 1, 8)).astype(dtype)
    np.testing.assert_array_equal(NP.residual_add(a1.copy(), x[:, -1:]), a1 + x[:, -1:])


# ---- head ------------------------------------------------------------------------------------------------------
@given(dtype=FLOATS, bt=st.tuples(st.integers(1, 2), st.integers(1, 200)), pooled=st.booleans(), seed=SEEDS)
@example(dtype=np.float32, bt=(1, 1), pooled=False, seed=0)
@example(dtype=np.float64, bt=(2, 1), pooled=True, seed=0)
@example(dtype=np.float32, bt=(1, 128), pooled=True, seed=0)
@example(dtype=np.float64, bt=(1, 129), pooled=False, seed=0)
@example(dtype=np.float32, bt=(2, 200), pooled=True, seed=0)
def test_head(dtype, bt, pooled, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*bt, 32)).astype(dtype)
    w = rng.standard_normal((300, 32)).astype(dtype)
    before = unchanged(x, w)
    last = x[:, -1:]  # logits="last": a strided view of the last position
    with pytest.MonkeyPatch.context() as mp:
        if pooled:  # every logits array counts as big: > 128 rows go into pooled memory
            mp.setattr(fast, "BUFFERS", fast.BufferPool(min_bytes=1))
        got, ref = NP.head(x, w), REF.head(x, w)
        last_got, last_want = NP.head(last, w), NP.head(np.ascontiguousarray(last), w)
    assert got.shape == (*bt, 300) and got.dtype == dtype and got.flags.c_contiguous
    if as_reference_computes(bt[0] * bt[1]):
        np.testing.assert_array_equal(got, ref)  # pooled or not: the same product
    else:
        assert_rel_close(got, ref, tol(dtype), "head")
    np.testing.assert_array_equal(last_got, last_want)
    assert_unchanged((x, w), before)


def test_pooled_logits_reuse_memory_only_once_released(rng, monkeypatch):
    monkeypatch.setattr(fast, "BUFFERS", fast.BufferPool(min_bytes=1))
    x, w = rng.standard_normal((2, 100, 32)), rng.standard_normal((300, 32))  # 200 rows: the pooled product
    want = REF.head(x, w)
    a = NP.head(x, w)
    np.testing.assert_array_equal(a, want)
    address = a.ctypes.data
    a[:] = 7.0  # a mark: memory handed out again still holds it until the product overwrites it
    view = a[1, 3:5]
    del a
    b = NP.head(x, w)
    assert b.ctypes.data != address and np.all(view == 7.0)  # a view keeps the memory taken
    np.testing.assert_array_equal(b, want)
    del view  # the first array is gone entirely: its memory is the spare (still mapped, so nothing fresh lands there)
    c = NP.head(x, w)
    assert c.ctypes.data == address  # reused ...
    np.testing.assert_array_equal(c, want)  # ... and filled anew


# ---- BufferPool ------------------------------------------------------------------------------------------------
MARK = 3.0


def released(pool, shape):
    """The address of a pooled array of ``shape``, marked with MARK and then released."""
    a = pool.empty(shape, np.float32)
    a[...] = MARK
    return a.ctypes.data


def reused(a, address) -> bool:
    """Whether ``a`` is the released memory: same address and still marked. (The address alone is not enough: a
    fresh mapping may land where an unmapped one was; fresh anonymous memory is zero.)"""
    return a.ctypes.data == address and bool(np.all(a == MARK))


def test_pool_hands_out_c_ordered_arrays_of_the_shape_asked():
    pool = fast.BufferPool(min_bytes=1)
    a = pool.empty((3, 4, 5), np.float64)
    assert a.shape == (3, 4, 5) and a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable
    a[...] = 1.0
    assert a.sum() == 60


def test_pooled_memory_is_reused_only_once_released():
    pool = fast.BufferPool(min_bytes=1)
    a = pool.empty((4, 100), np.float32)
    a[:] = MARK
    address = a.ctypes.data
    view = a[1:3]
    del a
    b = pool.empty((4, 100), np.float32)
    assert b.ctypes.data != address  # the view keeps the first array's memory taken
    assert np.all(view == MARK)
    del view
    assert reused(pool.empty((4, 100), np.float32), address)  # gone entirely: reused


def test_pool_reuses_memory_of_a_similar_size_only():
    pool = fast.BufferPool(min_bytes=1)
    address = released(pool, (4, 100))
    assert not reused(pool.empty((4, 101), np.float32), address)  # bigger than the spare: fresh memory
    address = released(pool, (4, 100))
    small = pool.empty((3,), np.float32)  # much smaller (the spare is over twice its size): its own memory
    assert small.ctypes.data != address
    assert reused(pool.empty((3, 100), np.float32), address)  # 3/4 of the spare while `small` lives: reused


def test_pool_keeps_the_biggest_spare():
    """A smaller pooled array returned after a big one does not evict the big spare (the next long prompt's logits
    reuse it); a bigger one replaces it."""
    pool = fast.BufferPool(min_bytes=1)
    big = released(pool, (4, 100))
    small = released(pool, (1, 100))  # over twice smaller than the spare: its own memory, then returned
    assert small != big
    assert reused(pool.empty((4, 100), np.float32), big)
    pool = fast.BufferPool(min_bytes=1)
    first = released(pool, (4, 100))
    bigger = released(pool, (9, 100))  # does not fit the spare: fresh memory, then returned and kept
    assert bigger != first
    assert reused(pool.empty((8, 100), np.float32), bigger)


def test_pool_leaves_small_arrays_alone():
    pool = fast.BufferPool(min_bytes=1000)
    address = released(pool, (4, 100))  # 1600 bytes: pooled
    tiny = released(pool, (10,))  # 40 bytes: ordinary memory, never the spare
    assert tiny != address
    assert reused(pool.empty((4, 100), np.float32), address)


# ---- attend ----------------------------------------------------------------------------------------------------
def padding_mask(kind: str, S: int) -> np.ndarray:
    """[2, S]: row 0 without padding, row 1 with ``kind`` of padding."""
    row = np.ones(S, np.int64)
    if kind == "left":
        row[:S // 3] = 0
    elif kind == "right":
        row[S - S // 4:] = 0
    elif kind == "hole":  # a pad first and two in the middle (as many as S holds)
        row[[i for i in (0, S // 3, S // 3 + 1) if i < S]] = 0
    return np.stack([np.ones(S, np.int64), row])


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


# (SCORE_BLOCK_ELEMS, HEADS_PER_BLOCK), None for the defaults (every input here in one block). The examples pin
# "small" (2 heads x 3 queries of 13 keys: edges cut heads, queries and the padding) and "uneven" (one query per
# block, 6 heads as 4 + 2); the strategy reaches any block size from one score up, with 1 to 7 heads per block.
SMALL_BLOCKS, UNEVEN_BLOCKS = (2 * 3 * 13, 2), (1, 4)
BLOCKS = st.one_of(st.none(), st.tuples(st.integers(1, 600), st.integers(1, 7)))


def attend_with(blocks, ops, *args):
    """``ops.attend(*args)`` with the attention blocks ``blocks`` (see BLOCKS)."""
    with pytest.MonkeyPatch.context() as mp:
        if blocks:
            mp.setattr(fast, "SCORE_BLOCK_ELEMS", blocks[0])
            mp.setattr(fast, "HEADS_PER_BLOCK", blocks[1])
        return ops.attend(*args)


@st.composite
def prompt_shapes(draw) -> tuple[int, int]:
    """(S, T): S keys of which the last T are queries; the prompt (T = S), a chunk after a past, a decode step."""
    S = draw(st.integers(1, 40))
    return S, draw(st.one_of(st.just(S), st.just(1), st.integers(1, S)))


@given(dtype=FLOATS, padding=st.sampled_from(["none", "left", "right", "hole"]), shape=prompt_shapes(),
       H=st.integers(1, 8), blocks=BLOCKS, seed=SEEDS)
@example(dtype=np.float32, padding="left", shape=(13, 13), H=6, blocks=None, seed=0)  # prompt
@example(dtype=np.float64, padding="hole", shape=(13, 4), H=6, blocks=SMALL_BLOCKS, seed=0)  # chunk after a past
@example(dtype=np.float32, padding="right", shape=(13, 1), H=6, blocks=UNEVEN_BLOCKS, seed=0)  # decode
@example(dtype=np.float64, padding="none", shape=(40, 7), H=6, blocks=SMALL_BLOCKS, seed=0)
@example(dtype=np.float32, padding="hole", shape=(40, 1), H=6, blocks=None, seed=0)
@example(dtype=np.float64, padding="left", shape=(40, 40), H=6, blocks=UNEVEN_BLOCKS, seed=0)
def test_attend(dtype, padding, shape, H, blocks, seed):
    S, T = shape
    rng = np.random.default_rng(seed)
    mask = padding_mask(padding, S)
    q, k, v, alibi, allowed = attention_inputs(rng, mask, T, H=H, dtype=dtype)
    before = unchanged(q, k, v, alibi, allowed)
    ctx, probs = attend_with(blocks, NP, q, k, v, alibi, allowed, True)
    ref_ctx, ref_probs = REF.attend(q, k, v, alibi, allowed, True)
    assert ctx.shape == ref_ctx.shape == (2, T, H, 8) and probs.shape == ref_probs.shape == (2, H, T, S)
    assert ctx.dtype == probs.dtype == dtype
    assert_rel_close(ctx, ref_ctx, tol(dtype), "context (pad queries too)")
    assert_rel_close(probs, ref_probs, tol(dtype), "attention probabilities")
    # what any softmax attention must give, computed here: nothing on keys a query may not see, rows summing to 1
    seen = np.broadcast_to(allowed, probs.shape)
    live = np.broadcast_to(allowed.any(-1, keepdims=True), probs.shape)  # queries that see some key
    assert np.all(probs[~seen & live] == 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=10 * tol(dtype))
    ctx_only, none = attend_with(blocks, NP, q, k, v, alibi, allowed, False)
    assert none is None and REF.attend(q, k, v, alibi, allowed, False)[1] is None
    np.testing.assert_array_equal(ctx_only, ctx)  # asking for the probabilities changes nothing else
    assert_unchanged((q, k, v, alibi, allowed), before)


@given(dtype=FLOATS, name=st.sampled_from(list(TABLES)), blocks=BLOCKS, seed=SEEDS)
@example(dtype=np.float32, name="numpy", blocks=None, seed=0)
@example(dtype=np.float64, name="numpy", blocks=SMALL_BLOCKS, seed=0)
@example(dtype=np.float32, name="numpy", blocks=UNEVEN_BLOCKS, seed=0)
@example(dtype=np.float64, name="reference", blocks=None, seed=0)
def test_fully_masked_pad_queries_attend_uniformly(dtype, name, blocks, seed):
    """A pad query with no real key at or before it sees nothing: every key gets the same finfo.min score, so the
    softmax is uniform over all S keys and the context is the mean value (the reference's and HF's result)."""
    mask = padding_mask("left", 13)
    q, k, v, alibi, allowed = attention_inputs(np.random.default_rng(seed), mask, 13, dtype=dtype)
    dead = ~allowed[:, 0].any(-1)  # [B, T]
    assert dead.sum() == 4 and dead[1, :4].all()
    ctx, probs = attend_with(blocks, TABLES[name], q, k, v, alibi, allowed, True)
    uniform = np.divide(dtype(1), dtype(13))
    assert np.all(np.moveaxis(probs, 1, 2)[dead] == uniform)
    mean_v = v.mean(axis=2)  # [B, H, D], computed here
    for b, t in zip(*np.nonzero(dead)):
        assert_rel_close(ctx[b, t], mean_v[b], 10 * tol(dtype), f"context of dead query {b, t}")


@given(dtype=FLOATS, past=st.integers(0, 20), T=st.integers(1, 12), blocks=BLOCKS, seed=SEEDS)
@example(dtype=np.float32, past=9, T=4, blocks=None, seed=0)
@example(dtype=np.float64, past=9, T=4, blocks=SMALL_BLOCKS, seed=0)
@example(dtype=np.float32, past=0, T=12, blocks=UNEVEN_BLOCKS, seed=0)
def test_attend_on_the_views_the_model_passes(dtype, past, T, blocks, seed):
    """model.attention hands attend strided views: q, k, v cut out of the fused QKV output, and with a cache k, v
    are the filled part of a bigger buffer."""
    rng = np.random.default_rng(seed)
    B, H, D = 2, 6, 8
    mask = padding_mask("left", past + T)
    qkv = rng.standard_normal((B, T, H, 3, D)).astype(dtype)
    q = np.transpose(qkv[:, :, :, 0], (0, 2, 1, 3))
    k_buf, v_buf = (rng.standard_normal((B, H, 40, D)).astype(dtype) for _ in range(2))
    k_buf[:, :, past:past + T] = np.transpose(qkv[:, :, :, 1], (0, 2, 1, 3))  # the new keys into the cache
    v_buf[:, :, past:past + T] = np.transpose(qkv[:, :, :, 2], (0, 2, 1, 3))
    k, v = k_buf[:, :, :past + T], v_buf[:, :, :past + T]
    alibi = M.alibi_bias(mask, M.alibi_slopes(H, dtype)).astype(dtype)
    allowed = M.causal_mask(mask, T)
    ctx, probs = attend_with(blocks, NP, q, k, v, alibi, allowed, True)
    ref_ctx, ref_probs = REF.attend(*(np.ascontiguousarray(a) for a in (q, k, v)), alibi, allowed, True)
    assert_rel_close(ctx, ref_ctx, tol(dtype), "context from views")
    assert_rel_close(probs, ref_probs, tol(dtype), "probabilities from views")


def other_masks(rng, T: int, S: int) -> dict[str, np.ndarray]:
    """[2, 1, T, S] masks other than a causal mask over padding: the fast attend may not assume its shortcut."""
    causal = np.tri(T, S, S - T, dtype=bool)
    every = np.ones((T, S), bool)
    random = rng.random((2, T, S)) < 0.6
    random[:, :, 0] = True  # every query sees one key at least
    last_full = np.tri(T, S, S - T, dtype=bool)
    last_full[0, -1] = True  # a query seeing a future key, while the last query still sees every key
    dead_row = causal.copy()
    dead_row[T // 2] = False  # one query sees nothing (uniform), the rest causal
    return {
        "bidirectional": np.stack([every, every])[:, None],
        "random-per-row": random[:, None],
        "causal-and-bidirectional": np.stack([causal, every])[:, None],
        "future-key-last-query-full": np.stack([last_full, causal])[:, None],
        "dead-query-in-causal": np.stack([dead_row, causal])[:, None],
    }


OTHER_MASKS = ["bidirectional", "random-per-row", "causal-and-bidirectional", "future-key-last-query-full",
               "dead-query-in-causal"]


@given(dtype=FLOATS, which=st.sampled_from(OTHER_MASKS), shape=prompt_shapes(), blocks=BLOCKS, seed=SEEDS)
@example(dtype=np.float32, which="bidirectional", shape=(13, 13), blocks=None, seed=0)
@example(dtype=np.float64, which="random-per-row", shape=(17, 5), blocks=SMALL_BLOCKS, seed=0)
@example(dtype=np.float32, which="causal-and-bidirectional", shape=(13, 13), blocks=UNEVEN_BLOCKS, seed=0)
@example(dtype=np.float64, which="future-key-last-query-full", shape=(17, 5), blocks=None, seed=0)
@example(dtype=np.float32, which="dead-query-in-causal", shape=(13, 13), blocks=SMALL_BLOCKS, seed=0)
def test_attend_with_any_mask_gives_the_reference_result(dtype, which, shape, blocks, seed):
    """The fast attend cuts a block's keys only for a row whose mask is exactly causal; any other mask the reference
    accepts (bidirectional, random, a key after the query, a query that sees nothing) gives the reference's result."""
    S, T = shape
    rng = np.random.default_rng(seed)
    q, k, v, alibi, _ = attention_inputs(rng, np.ones((2, S), np.int64), T, dtype=dtype)
    allowed = other_masks(rng, T, S)[which]
    ctx, probs = attend_with(blocks, NP, q, k, v, alibi, allowed, True)
    ref_ctx, ref_probs = REF.attend(q, k, v, alibi, allowed, True)
    assert_rel_close(ctx, ref_ctx, tol(dtype), f"context, {which} mask")
    assert_rel_close(probs, ref_probs, tol(dtype), f"probabilities, {which} mask")
    assert np.all(probs[~np.broadcast_to(allowed, probs.shape) & np.broadcast_to(
        allowed.any(-1, keepdims=True), probs.shape)] == 0)


@given(dtype=FLOATS, batches=st.sampled_from([(1, 2), (2, 1), (1, 1)]), shape=prompt_shapes(), blocks=BLOCKS,
       seed=SEEDS)
@example(dtype=np.float32, batches=(1, 2), shape=(11, 11), blocks=None, seed=0)
@example(dtype=np.float64, batches=(2, 1), shape=(11, 11), blocks=SMALL_BLOCKS, seed=0)
@example(dtype=np.float32, batches=(1, 1), shape=(11, 11), blocks=UNEVEN_BLOCKS, seed=0)
def test_attend_broadcasts_the_mask_and_alibi_over_the_batch(dtype, batches, shape, blocks, seed):
    (mask_batch, alibi_batch), (S, T) = batches, shape
    q, k, v, alibi, allowed = attention_inputs(np.random.default_rng(seed), np.ones((2, S), np.int64), T, dtype=dtype)
    allowed, alibi = allowed[:mask_batch], alibi[:alibi_batch]
    ctx, probs = attend_with(blocks, NP, q, k, v, alibi, allowed, True)
    ref_ctx, ref_probs = REF.attend(q, k, v, alibi, allowed, True)
    assert ctx.shape == (2, T, 6, 8)
    assert_rel_close(ctx, ref_ctx, tol(dtype), "context, broadcast inputs")
    assert_rel_close(probs, ref_probs, tol(dtype), "probabilities, broadcast inputs")


def unusual_inputs(rng, dtype) -> dict[str, tuple]:
    """Inputs the reference accepts outside the shapes ``model.forward`` builds: (q, k, v, alibi, allowed)."""
    B, H, T, S, D = 2, 6, 5, 9, 8
    q, k, v = (rng.standard_normal((B, H, n, D)).astype(dtype) for n in (T, S, S))
    alibi = rng.standard_normal((B, H, 1, S)).astype(dtype)
    causal = np.tri(T, S, S - T, dtype=bool)[None, None]
    random = rng.random((B, 1, T, S)) < 0.6
    wide = np.float64 if dtype == np.float32 else np.float32
    return {
        "mask-per-head": (q, k, v, alibi, rng.random((B, H, T, S)) < 0.6),
        "alibi-per-query": (q, k, v, rng.standard_normal((B, H, T, S)).astype(dtype), causal),
        "kv-broadcast-over-batch": (q, k[:1], v[:1], alibi, causal),
        "q-broadcast-over-batch": (q[:1], k, v, alibi, causal),
        "mask-gives-the-batch": (q[:1], k[:1], v[:1], alibi[:1], np.concatenate([random, causal])),
        "int-mask": (q, k, v, alibi, random.astype(np.int64)),
        "float-mask": (q, k, v, alibi, random.astype(np.float32)),
        "mask-2d": (q, k, v, alibi, causal[0, 0]),
        "mixed-dtypes": (q, k, v.astype(wide), alibi.astype(wide), causal),
        "more-queries-than-keys": (q, k[:, :, :3], v[:, :, :3], alibi[..., :3], np.tri(T, 3, 3 - T, dtype=bool)),
        "no-queries": (q[:, :, :0], k, v, alibi, causal[:, :, :0]),
    }


UNUSUAL = ["mask-per-head", "alibi-per-query", "kv-broadcast-over-batch", "q-broadcast-over-batch",
           "mask-gives-the-batch", "int-mask", "float-mask", "mask-2d", "mixed-dtypes", "more-queries-than-keys",
           "no-queries"]
EACH_UNUSUAL = [  # every kind once, the dtypes and block settings in turn
    example(dtype=(np.float32, np.float64)[i % 2], which=which, blocks=(None, SMALL_BLOCKS, UNEVEN_BLOCKS)[i % 3],
            seed=0)
    for i, which in enumerate(UNUSUAL)]


def with_examples(examples):
    """Apply hypothesis ``example`` decorators from a list."""
    def apply(test):
        for e in reversed(examples):
            test = e(test)
        return test
    return apply


@given(dtype=FLOATS, which=st.sampled_from(UNUSUAL), blocks=BLOCKS, seed=SEEDS)
@with_examples(EACH_UNUSUAL)
def test_attend_on_any_input_the_reference_accepts(dtype, which, blocks, seed):
    """fast.attend is a drop-in: masks and biases per head or per query, q, k, v broadcasting against each other, a
    non-bool mask, mixed dtypes, more queries than keys (the causal pattern then leaves queries seeing nothing) give
    the reference's shapes, dtypes and values."""
    q, k, v, alibi, allowed = unusual_inputs(np.random.default_rng(seed), dtype)[which]
    before = unchanged(q, k, v, alibi, allowed)
    ctx, probs = attend_with(blocks, NP, q, k, v, alibi, allowed, True)
    ref_ctx, ref_probs = REF.attend(q, k, v, alibi, allowed, True)
    assert ctx.shape == ref_ctx.shape and probs.shape == ref_probs.shape, which
    assert ctx.dtype == ref_ctx.dtype and probs.dtype == ref_probs.dtype, which
    if ref_ctx.size:
        assert_rel_close(ctx, ref_ctx, tol(dtype), f"context, {which}")
        assert_rel_close(probs, ref_probs, tol(dtype), f"probabilities, {which}")
    np.testing.assert_array_equal(attend_with(blocks, NP, q, k, v, alibi, allowed, False)[0], ctx)
    assert_unchanged((q, k, v, alibi, allowed), before)


@given(dtype=FLOATS, bias=st.sampled_from(["minus-inf", "lowest", "nan"]), blocks=BLOCKS, seed=SEEDS)
@example(dtype=np.float32, bias="minus-inf", blocks=None, seed=0)
@example(dtype=np.float64, bias="lowest", blocks=SMALL_BLOCKS, seed=0)
@example(dtype=np.float32, bias="nan", blocks=UNEVEN_BLOCKS, seed=0)
@example(dtype=np.float64, bias="minus-inf", blocks=UNEVEN_BLOCKS, seed=0)
def test_attend_causal_rows_whose_visible_keys_weigh_nothing(dtype, bias, blocks, seed):
    """A causal row's blocks skip the keys after each query, which the reference weighs exp(finfo.min - row max):
    exactly 0 only while the row max is well above finfo.min. A query whose visible scores are all -inf, or
    finfo.min, gives every key it may not see the same weight in the reference (and NaN spreads over the row), so
    the fast attend must not skip them."""
    S = T = 13
    q, k, v, alibi, allowed = attention_inputs(np.random.default_rng(seed), np.ones((2, S), np.int64), T,
                                               dtype=dtype)
    value = {"minus-inf": -np.inf, "lowest": float(np.finfo(dtype).min), "nan": np.nan}[bias]  # "lowest": an
    # additive mask in the bias, as HF builds one
    alibi = alibi.copy()
    alibi[1, :, 0, :4] = value  # queries 0..3 of row 1 see only these keys (row 0 is the control)
    ctx, probs = attend_with(blocks, NP, q, k, v, alibi, allowed, True)
    ref_ctx, ref_probs = REF.attend(q, k, v, alibi, allowed, True)
    if bias == "nan":  # the same NaNs, the rest as the reference
        np.testing.assert_array_equal(np.isnan(probs), np.isnan(ref_probs))
        np.testing.assert_array_equal(np.isnan(ctx), np.isnan(ref_ctx))
        ok = ~np.isnan(ref_probs)
        assert ok.any() and np.isnan(ref_probs).any()
        assert_rel_close(probs[ok], ref_probs[ok], tol(dtype), "probabilities around NaN")
        return
    assert np.all(ref_probs[1, :, 0, 4:] > 0)  # the reference weighs the keys a causal block would skip
    assert_rel_close(ctx, ref_ctx, tol(dtype), f"context, {bias} visible scores")
    assert_rel_close(probs, ref_probs, tol(dtype), f"probabilities, {bias} visible scores")


def test_attend_can_fail(rng):
    """The comparison is sensitive: one key moved by 1e-9 of its scale is seen."""
    mask = padding_mask("left", 13)
    q, k, v, alibi, allowed = attention_inputs(rng, mask, 13)
    k2 = k.copy()
    k2[1, 2, 7] *= 1 + 1e-9
    with pytest.raises(AssertionError):
        assert_rel_close(NP.attend(q, k2, v, alibi, allowed)[0], REF.attend(q, k, v, alibi, allowed)[0], FP64_SELF)


# ---- one definition --------------------------------------------------------------------------------------------
def test_one_block_and_one_attention_in_the_package():
    """``grep -c "def block\\|def attention"`` over minibloom/ finds one of each (model.py's); fast.py holds
    primitives only."""
    counts = {"def block": 0, "def attention": 0}
    for root, dirs, files in os.walk(os.path.join(ROOT, "minibloom")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            with open(os.path.join(root, name), encoding="utf-8", errors="ignore") as f:
                for line in f:
                    for pattern in counts:
                        counts[pattern] += pattern in line
    assert counts == {"def block": 1, "def attention": 1}, counts
    assert not any(hasattr(fast, n) for n in ("forward", "block", "attention", "supported"))


# ---- the model through both tables -----------------------------------------------------------------------------
DEFAULT = os.path.join(ROOT, "weights", "default")
CONFIGS = {
    "6-heads": dict(hidden=48, n_head=6, n_layer=3),
    "12-heads": dict(hidden=96, n_head=12, n_layer=2),
    "post-ln": dict(hidden=48, n_head=6, n_layer=2, post_ln=True),
    "tp2": dict(hidden=48, n_head=6, n_layer=2, tp=2, slow=True),  # pretraining_tp=2 with slow_but_exact
    "default": None,  # weights/default, the trained model (4 layers x 256, 8 heads, vocab 2048)
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def path(request, tmp_path_factory):
    if CONFIGS[request.param] is None:
        if not os.path.isfile(os.path.join(DEFAULT, "model.safetensors")):
            pytest.skip("weights/default not trained yet")
        return DEFAULT
    return save(make_model(seed=5, **CONFIGS[request.param]), tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def loaded():
    """``loaded(path, dtype)``: one Bloom per checkpoint and dtype for the module (tests pass their table per call
    and never change the model)."""
    models = {}

    def get(path, dtype):
        if (path, dtype) not in models:
            models[path, dtype] = minibloom.load(path, dtype=dtype)
        return models[path, dtype]

    return get


def prompts(vocab: int, length: int):
    """Two rows, the second left-padded by 5."""
    return left_pad([random_ids(vocab, length, seed=1).tolist(), random_ids(vocab, length - 5, seed=2).tolist()])


def run(m, ids, mask, ops, output_hidden_states=False, output_attentions=False, **kw):
    """``model.forward`` itself (function level) with the table ``ops``, and transformers' optional outputs."""
    return M.forward_outputs(m.params, ids, mask, m.config, primitives=ops, hidden_states=output_hidden_states,
                             attentions=output_attentions, **kw)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("length", [17, 140])  # 2 x 17 rows: the skinny products; 2 x 140: the ordinary GEMM
def test_forward_through_both_tables(path, loaded, dtype, length, record):
    m = loaded(path, dtype)
    ids, mask = prompts(m.vocab_size, length)
    kw = dict(output_hidden_states=True, output_attentions=True)
    out = {name: run(m, ids, mask, ops, **kw) for name, ops in TABLES.items()}
    for name, ops in TABLES.items():  # Bloom.forward(primitives=...) is model.forward with that table
        via_bloom = m.forward(ids, mask, primitives=ops, **kw)
        np.testing.assert_array_equal(via_bloom.logits, out[name].logits)
        np.testing.assert_array_equal(via_bloom.attentions[-1], out[name].attentions[-1])
    a, b = out["numpy"], out["reference"]
    n = m.config.n_layer
    assert a.logits.dtype == b.logits.dtype == np.dtype(dtype)
    assert len(a.hidden_states) == len(b.hidden_states) == n + 1 and len(a.attentions) == len(b.attentions) == n
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        assert_rel_close(x, y, tol(dtype), f"hidden state {i}")
    for i, (x, y) in enumerate(zip(a.attentions, b.attentions)):
        assert x.shape == (2, m.config.n_head, length, length)
        assert_rel_close(x, y, probs_bound(dtype, length), f"attention probabilities {i}")
    record(f"numpy vs reference {dtype}, {length} tokens",
           assert_rel_close(a.logits, b.logits, tol(dtype), "logits"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_last_and_no_logits(path, loaded, dtype, primitives):
    """logits="last" gives the last position's logits only, and still caches every position's keys and values."""
    m = loaded(path, dtype)
    ids, mask = prompts(m.vocab_size, 12)
    full = run(m, ids, mask, REF).logits
    last = run(m, ids, mask, primitives, logits="last").logits
    assert last.shape == (2, 1, m.vocab_size)
    assert_rel_close(last, full[:, -1:], tol(dtype), f"last logits ({primitives.name})")
    np.testing.assert_array_equal(m.forward(ids, mask, logits="last", primitives=primitives).logits, last)
    assert run(m, ids, mask, primitives, logits="none").logits is None
    assert m.forward(ids, mask, logits="none", primitives=primitives).logits is None
    # the keys and values of every position still reach the cache: the next step sees them
    caches = {"last": m.new_cache(2, 12), "full": m.new_cache(2, 12)}
    run(m, ids, mask, primitives, cache=caches["last"], logits="last")
    run(m, ids, mask, REF, cache=caches["full"])
    assert caches["last"].length == caches["full"].length == 12
    for x, y in zip(caches["last"].k + caches["last"].v, caches["full"].k + caches["full"].v):
        assert_rel_close(x, y, tol(dtype), "cached keys and values")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cached_decode_equals_the_full_pass(path, loaded, dtype, primitives):
    m = loaded(path, dtype)
    ids, mask = prompts(m.vocab_size, 10)
    cache = m.new_cache(2, 14)
    steps, full_ids, full_mask = [m.forward(ids, mask, cache=cache, primitives=primitives).logits], ids, mask
    for t in range(4):
        nxt = random_ids(m.vocab_size, (2, 1), seed=10 + t)
        full_ids = np.concatenate([full_ids, nxt], axis=1)
        full_mask = np.concatenate([full_mask, np.ones((2, 1), np.int64)], axis=1)
        steps.append(m.forward(nxt, full_mask, cache=cache, logits="last", primitives=primitives).logits)
    assert cache.length == 14
    got = np.concatenate(steps, axis=1)
    want = m.forward(full_ids, full_mask, primitives=REF).logits
    real = full_mask.astype(bool)  # a pad query sees no key, so attends uniformly to all S keys: S differs
    assert_rel_close(got[real], want[real], tol(dtype), f"cached decode ({primitives.name}) vs the full pass")


def spy(ops: M.Primitives, calls: list) -> M.Primitives:
    """``ops`` with linear and attend recording their calls in ``calls`` (results passed through unchanged)."""

    def linear(x, w, b, tp=1):
        calls.append(("linear", w.shape, tp))
        return ops.linear(x, w, b, tp)

    def attend(q, k, v, alibi, allowed, probs=False):
        ctx, weights = ops.attend(q, k, v, alibi, allowed, probs)
        calls.append(("attend", probs, weights))
        return ctx, weights

    return dataclasses.replace(ops, linear=linear, attend=attend)


@pytest.mark.parametrize("output_attentions", [False, True])
def test_output_attentions_runs_the_same_table(path, loaded, primitives, output_attentions):
    """Asking for the probabilities changes no implementation: the table's attend computes them."""
    m = loaded(path, "float64")
    ids, mask = prompts(m.vocab_size, 9)
    calls = []
    out = run(m, ids, mask, spy(primitives, calls), output_attentions=output_attentions)
    attends = [c for c in calls if c[0] == "attend"]
    assert [c[1] for c in attends] == [output_attentions] * m.config.n_layer
    if output_attentions:
        assert all(got is c[2] for got, c in zip(out.attentions, attends))  # the very arrays attend returned
    else:
        assert out.attentions is None and all(c[2] is None for c in attends)
    np.testing.assert_array_equal(out.logits, run(m, ids, mask, primitives).logits)  # the spy changes nothing


def test_sliced_products_reach_the_table(path, loaded, primitives):
    """With pretraining_tp and slow_but_exact the two output projections (attention dense, dense_4h_to_h) are called
    with tp; every other product with tp=1."""
    m = loaded(path, "float64")
    cfg = m.config
    tp = cfg.pretraining_tp if cfg.slow_but_exact else 1
    calls = []
    run(m, *prompts(m.vocab_size, 8), spy(primitives, calls))
    C = cfg.hidden_size
    sliced = [c[2] for c in calls if c[0] == "linear" and c[1] in ((C, C), (C, 4 * C))]
    plain = [c[2] for c in calls if c[0] == "linear" and c[1] not in ((C, C), (C, 4 * C))]
    assert sliced == [tp] * (2 * cfg.n_layer) and plain == [1] * cfg.n_layer  # QKV only: linear_gelu is not spied


def test_a_changed_weight_is_seen(path, loaded):
    """The comparison is sensitive: a LayerNorm weight changed by 1e-9 in the numpy table's input is caught."""
    m = loaded(path, "float64")
    ids, mask = prompts(m.vocab_size, 12)
    good = run(m, ids, mask, REF).logits
    p2 = dict(m.params)
    p2["h"] = [dict(layer) for layer in m.params["h"]]
    ln = m.params["h"][0]["input_layernorm"]
    p2["h"][0]["input_layernorm"] = {"weight": ln["weight"] * (1 + 1e-9), "bias": ln["bias"]}
    with pytest.raises(AssertionError):
        assert_rel_close(M.forward(p2, ids, mask, m.config, primitives=NP), good, FP64_SELF, "perturbed weights")


def test_bloom_picks_its_table_by_backend(path):
    assert minibloom.load(path).primitives is NP
    pytest.importorskip("array_api_strict")
    assert minibloom.load(path, backend="array_api_strict").primitives is REF


def test_the_table_is_what_runs(path):
    """No detection of patched functions: the primitives passed (or assigned to Bloom.primitives) are the ones
    called."""
    m = minibloom.load(path, dtype="float64")
    ids = random_ids(m.vocab_size, (1, 6), seed=9)
    doubled = dataclasses.replace(REF, head=lambda x, w: 2.0 * REF.head(x, w))
    want = 2.0 * m.forward(ids, primitives=REF).logits
    np.testing.assert_array_equal(m.forward(ids, primitives=doubled).logits, want)
    m.primitives = doubled
    np.testing.assert_array_equal(m(ids), want)
