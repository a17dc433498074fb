"""The compute path is pure array API: the whole forward pass and greedy generation run on ``array_api_strict`` (the
standard's reference implementation, which refuses anything NumPy-specific) and match the NumPy backend exactly.
This is what keeps the CuPy backend honest on machines without a GPU."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

import minibloom
from minibloom import MinibloomError
from minibloom.testing import FP64_SELF, assert_rel_close
from factory import left_pad, random_ids

pytest.importorskip("array_api_strict")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


def test_strict_backend_forward_matches_numpy(ckpt, record):
    ids, mask = left_pad([list(random_ids(256, 9, seed=1)), list(random_ids(256, 4, seed=2))])
    ref = minibloom.load(ckpt, dtype="float64")
    strict = minibloom.load(ckpt, dtype="float64", backend="array_api_strict")
    w = strict.params["h"][0]["mlp"]["dense_h_to_4h"]["weight"]
    assert type(w).__module__.startswith("array_api_strict"), "weights must live on the strict backend"
    a = ref.forward(ids, mask, output_hidden_states=True)
    b = strict.forward(ids, mask, output_hidden_states=True)
    assert isinstance(b.logits, np.ndarray)
    record("strict vs numpy fp64", assert_rel_close(b.logits, a.logits, FP64_SELF, "strict backend logits"))
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states)):
        assert_rel_close(x, y, FP64_SELF, f"hidden state {i}")
    # float32 too (transformers' numerics)
    a32 = minibloom.load(ckpt)(ids, mask)
    b32 = minibloom.load(ckpt, backend="array_api_strict")(ids, mask)
    assert b32.dtype == np.float32
    assert_rel_close(b32, a32, 1e-6, "strict backend float32 logits")


def test_strict_backend_kv_cache_and_greedy_generation(ckpt):
    ids, mask = left_pad([list(random_ids(256, 7, seed=3)), list(random_ids(256, 3, seed=4))])
    ref = minibloom.load(ckpt, dtype="float64")
    strict = minibloom.load(ckpt, dtype="float64", backend="array_api_strict")
    out_ref = ref.generate(ids, mask, max_new_tokens=12, pad_token_id=3)
    out_strict = strict.generate(ids, mask, max_new_tokens=12, pad_token_id=3)
    assert out_strict.shape == (2, ids.shape[1] + 12)
    np.testing.assert_array_equal(out_strict, out_ref)
    # cached decode on the strict backend equals its own full pass
    cache = strict.new_cache(2, ids.shape[1] + 1)
    strict.forward(ids, mask, cache=cache, logits="none")
    nxt = out_ref[:, ids.shape[1]:ids.shape[1] + 1]
    full_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    step = strict.forward(nxt, full_mask, cache=cache).logits
    full = strict(np.concatenate([ids, nxt], axis=1), full_mask)[:, -1:]
    assert_rel_close(step, full, FP64_SELF, "strict cached step vs full pass")


def test_cupy_backend_without_cupy_is_a_clear_error(ckpt, monkeypatch):
    real_import = builtins.__import__

    def no_cupy(name, *args, **kw):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(MinibloomError, match="backend 'cupy'.*cupy"):
        minibloom.load(ckpt, backend="cupy")
