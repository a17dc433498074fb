"""The NumPy fast path (``minibloom.fast``) computes what the teaching path (``minibloom.model``) computes."""

from __future__ import annotations

import numpy as np
import pytest

import minibloom
from minibloom import fast
from minibloom import model as M
from minibloom.testing import FP32, FP64_SELF, assert_rel_close
from factory import left_pad, make_model, random_ids, save

pytest.importorskip("torch")

CONFIGS = {
    "6-heads": dict(hidden=48, n_head=6, n_layer=3),
    "12-heads": dict(hidden=96, n_head=12, n_layer=2),
    "post-ln": dict(hidden=48, n_head=6, n_layer=2, post_ln=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def path(request, tmp_path_factory):
    return save(make_model(seed=5, **CONFIGS[request.param]), tmp_path_factory.mktemp(request.param))


def both(m, ids, mask=None, **kw):
    """(fast, teaching) outputs of one call."""
    mask = np.ones(ids.shape, np.int64) if mask is None else mask
    return (fast.forward(m.params, ids, mask, m.config, output_hidden_states=True, **kw),
            M.forward(m.params, ids, mask, m.config, output_hidden_states=True, **kw))


@pytest.fixture
def small_blocks(monkeypatch):
    # attention in blocks of a few queries, so the causal key truncation and block edges are exercised
    monkeypatch.setattr(fast, "SCORE_BLOCK_ELEMS", 6 * 3 * 20)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("padded", [False, True])
def test_fast_equals_teaching_path(path, dtype, padded, small_blocks, record):
    m = minibloom.load(path, dtype=dtype)
    if padded:
        ids, mask = left_pad([random_ids(256, 17, seed=1).tolist(), random_ids(256, 6, seed=2).tolist()])
    else:
        ids, mask = random_ids(256, (2, 17), seed=3), None
    f, t = both(m, ids, mask)
    tol = FP64_SELF if dtype == "float64" else FP32
    assert f.logits.dtype == t.logits.dtype == np.dtype(dtype)
    assert len(f.hidden_states) == len(t.hidden_states)
    for i, (a, b) in enumerate(zip(f.hidden_states, t.hidden_states)):
        assert a.shape == b.shape
        assert_rel_close(a, b, tol, f"hidden state {i}")
    record(f"fast vs teaching {dtype} rel err", assert_rel_close(f.logits, t.logits, tol, "logits"))


def test_float32_elementwise_pieces_are_bitwise_equal(rng):
    x = rng.standard_normal((5, 48)).astype(np.float32) * 3
    w, b = rng.standard_normal(48).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    np.testing.assert_array_equal(fast.layer_norm(x, w, b, 1e-5), M.layer_norm(x, w, b, 1e-5))
    for dtype in (np.float16, np.float64):  # float16: NumPy's mean sums in float32, and so must the fast path
        xd, wd, bd = (a.astype(dtype) for a in (np.tile(x, (1, 40)), np.tile(w, 40), np.tile(b, 40)))
        np.testing.assert_array_equal(fast.layer_norm(xd, wd, bd, 1e-5), M.layer_norm(xd, wd, bd, 1e-5))
    np.testing.assert_array_equal(fast.gelu_(x.copy()), M.gelu(x))
    big = rng.standard_normal((37, 48)).astype(np.float32) * 3
    blocks_before = fast.GELU_BLOCK_ELEMS
    try:
        fast.GELU_BLOCK_ELEMS = 5 * 48  # 8 blocks of rows, the last one short
        np.testing.assert_array_equal(fast.gelu_(big.copy()), M.gelu(big))
    finally:
        fast.GELU_BLOCK_ELEMS = blocks_before
    p = {"weight": rng.standard_normal((7, 48)).astype(np.float32), "bias": b[:7]}
    np.testing.assert_array_equal(fast.linear(x[:1], p), M.linear(x[:1], p["weight"], p["bias"]))
    # a few rows take the weight-first product: the same sums, blocked differently by BLAS
    assert_rel_close(fast.linear(x, p), M.linear(x, p["weight"], p["bias"]), FP32, "skinny linear")
    assert fast.linear(x, p).flags.c_contiguous


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_last_and_none(path, dtype, padded, small_blocks):
    # the fast path runs the last layer's attention output and MLP on the last position only
    m = minibloom.load(path, dtype=dtype)
    if padded:
        ids, mask = left_pad([random_ids(256, 9, seed=4).tolist(), random_ids(256, 4, seed=6).tolist()])
    else:
        ids = random_ids(256, (2, 9), seed=4)
        mask = np.ones(ids.shape, np.int64)
    full = M.forward(m.params, ids, mask, m.config).logits
    last = fast.forward(m.params, ids, mask, m.config, logits="last").logits
    assert last.shape == (2, 1, full.shape[-1])
    assert_rel_close(last, full[:, -1:], FP64_SELF if dtype == "float64" else FP32, "last logits")
    assert fast.forward(m.params, ids, mask, m.config, logits="none").logits is None
    # the keys and values of every position still reach the cache: the next step sees them
    cache_fast, cache_ref = m.new_cache(2, 10), m.new_cache(2, 10)
    fast.forward(m.params, ids, mask, m.config, cache=cache_fast, logits="last")
    M.forward(m.params, ids, mask, m.config, cache=cache_ref)
    for a, b in zip(cache_fast.k + cache_fast.v, cache_ref.k + cache_ref.v):
        assert_rel_close(a, b, FP64_SELF if dtype == "float64" else FP32, "cached keys/values")


def test_many_logits_reuse_memory_only_once_released(path, monkeypatch):
    # every logits array of this tiny model counts as "many" (over SKINNY_ROWS rows, over the pool's minimum)
    monkeypatch.setattr(fast, "SKINNY_ROWS", 4)
    monkeypatch.setattr(fast, "BUFFERS", fast.BufferPool(min_bytes=1))
    m = minibloom.load(path)
    ids = random_ids(256, (2, 17), seed=9)
    mask = np.ones(ids.shape, np.int64)

    def logits():
        return fast.forward(m.params, ids, mask, m.config).logits

    ref = M.forward(m.params, ids, mask, m.config).logits
    a = logits()
    assert_rel_close(a, ref, FP32, "logits in pooled memory")
    with monkeypatch.context() as mp:  # the same product into fresh memory: bitwise the same
        mp.setattr(fast.BUFFERS, "min_bytes", 1 << 62)
        assert np.array_equal(logits(), a)
    address, expected = a.ctypes.data, a.copy()
    view = a[1, 3:5]  # a view keeps the memory taken: the next logits must not land there
    del a
    b = logits()
    assert b.ctypes.data != address
    assert np.array_equal(view, expected[1, 3:5]) and np.array_equal(b, expected)
    del view  # now the first array is gone entirely: its memory is reused, and filled anew
    c = logits()
    assert c.ctypes.data == address and np.array_equal(c, expected)
    del c
    assert fast.BUFFERS.empty((3,), np.float32).ctypes.data != address  # a much smaller request: its own memory
    assert logits().ctypes.data == address  # ... and the spare is still there for the next one that fits


def test_cached_decode_equals_teaching_path(path, small_blocks):
    m = minibloom.load(path, dtype="float64")
    ids, mask = left_pad([random_ids(256, 10, seed=5).tolist(), random_ids(256, 7, seed=6).tolist()])
    outs = []
    for fwd in (fast.forward, M.forward):
        cache = m.new_cache(2, 14)
        steps = [fwd(m.params, ids, mask, m.config, cache=cache).logits]
        full_mask = mask
        for t in range(4):
            full_mask = np.concatenate([full_mask, np.ones((2, 1), np.int64)], axis=1)
            nxt = random_ids(256, (2, 1), seed=10 + t)
            steps.append(fwd(m.params, nxt, full_mask, m.config, cache=cache).logits)
        outs.append(np.concatenate(steps, axis=1))
    assert_rel_close(outs[0], outs[1], FP64_SELF, "cached decode, fast vs teaching")


def test_bloom_uses_fast_path_on_numpy_and_teaching_path_elsewhere(path, monkeypatch):
    calls = []
    real = fast.forward
    monkeypatch.setattr(fast, "forward", lambda *a, **k: calls.append("fast") or real(*a, **k))
    m = minibloom.load(path)
    m(random_ids(256, (1, 4), seed=7))
    assert calls == ["fast"]
    out = m.forward(random_ids(256, (1, 4), seed=7), output_attentions=True)  # falls back inside fast.forward
    assert len(out.attentions) == m.config.n_layer
    pytest.importorskip("array_api_strict")
    calls.clear()
    minibloom.load(path, backend="array_api_strict")(random_ids(256, (1, 4), seed=7))
    assert calls == []


def test_fast_path_can_fail(path):
    """The comparison is sensitive: a LayerNorm weight changed by 1e-9 in the fast path's input is caught."""
    m = minibloom.load(path, dtype="float64")
    ids = random_ids(256, (1, 12), seed=8)
    mask = np.ones(ids.shape, np.int64)
    good = M.forward(m.params, ids, mask, m.config).logits
    p2 = dict(m.params)
    p2["h"] = [dict(layer) for layer in m.params["h"]]
    ln = m.params["h"][0]["input_layernorm"]
    p2["h"][0]["input_layernorm"] = {"weight": ln["weight"] * (1 + 1e-9), "bias": ln["bias"]}
    with pytest.raises(AssertionError):
        assert_rel_close(fast.forward(p2, ids, mask, m.config).logits, good, FP64_SELF, "perturbed weights")


def test_patched_teaching_path_takes_effect(path, monkeypatch):
    """Tools and tests patch minibloom.model (e.g. a kernel simulated in ``model.linear``): the fast path steps aside."""
    m = minibloom.load(path, dtype="float64")
    ids = random_ids(256, (1, 6), seed=9)
    plain = M.linear
    monkeypatch.setattr(M, "linear", lambda x, w, b, tp=1: plain(x, w, b, tp) * 2.0)
    patched = M.forward(m.params, ids, np.ones(ids.shape, np.int64), m.config).logits
    np.testing.assert_array_equal(m(ids), patched)
