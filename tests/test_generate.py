"""Generation: KV cache vs full forward, greedy parity with transformers.generate, sampling and eos semantics.

Scenarios that run the model take the ``load`` fixture (conftest.py): once per primitive set, same assertions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import minibloom
from minibloom.errors import MinibloomError
from minibloom.generate import apply_repetition_penalty, apply_top_k, apply_top_p, stream
from minibloom.testing import FP64_SELF, assert_rel_close
from factory import left_pad, make_model, random_ids, save

torch = pytest.importorskip("torch")

# (seed, config): three randomized checkpoints with different head counts (pow2, 6 = 4 + 2 extra slopes, 12 = 8 + 4)
PARITY = [
    (11, dict(hidden=64, n_head=4, n_layer=3)),
    (12, dict(hidden=48, n_head=6, n_layer=3)),
    (13, dict(hidden=96, n_head=12, n_layer=2)),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = make_model(seed=21, hidden=48, n_head=6, n_layer=3)
    return model, save(model, tmp_path_factory.mktemp("gen") / "m")


def padded_batch(seed=0, lengths=(9, 5, 1), vocab=256):
    rows = [list(random_ids(vocab, n, seed=seed + i)) for i, n in enumerate(lengths)]
    return rows, *left_pad(rows)


# ---- KV cache -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True])
def test_cached_decoding_matches_full_forward_fp64(tiny, padded, load, record):
    _, path = tiny
    m = load(path, dtype="float64")
    if padded:
        _, ids, mask = padded_batch(seed=3)
    else:
        ids, mask = random_ids(256, (2, 9), seed=3), np.ones((2, 9), np.int64)
    extra = random_ids(256, (ids.shape[0], 6), seed=4)
    full_ids = np.concatenate([ids, extra], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], axis=1)
    reference = m(full_ids, full_mask)  # [B, T, V], no cache

    cache = m.new_cache(ids.shape[0], full_ids.shape[1])
    got = [m.forward(ids, mask, cache=cache).logits]  # prefill
    for t in range(extra.shape[1]):  # one token per step; the mask grows by one column
        S = ids.shape[1] + t + 1
        got.append(m.forward(extra[:, t:t + 1], full_mask[:, :S], cache=cache, logits="last").logits)
    got = np.concatenate(got, axis=1)
    real = full_mask.astype(bool)  # pad positions' logits are meaningless; compare real tokens
    err = assert_rel_close(got[real], reference[real], FP64_SELF, "cached vs full logits")
    record("cache vs full fp64 rel err", err)
    assert cache.length == full_ids.shape[1]


def test_cache_is_preallocated_and_not_reallocated(tiny, load):
    _, path = tiny
    m = load(path)
    cache = m.new_cache(1, 12)
    k0 = cache.k[0]
    ids = random_ids(256, (1, 4), seed=5)
    m.forward(ids, cache=cache, logits="last")
    m.forward(ids[:, :1], np.ones((1, 5)), cache=cache, logits="last")
    assert cache.k[0] is k0 and k0.shape[2] == 12 and cache.length == 5


# ---- greedy parity with transformers --------------------------------------------------------------------------------

def hf_generate(model, ids, mask, n, eos):
    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                             max_new_tokens=n, pad_token_id=3, eos_token_id=eos)
    return out.numpy()


@pytest.mark.parametrize("seed,cfg", PARITY, ids=["4-heads", "6-heads", "12-heads"])
def test_greedy_matches_transformers_left_padded(tmp_path, seed, cfg, load):
    model = make_model(seed=seed, **cfg)
    path = save(model, tmp_path / "m")
    _, ids, mask = padded_batch(seed=seed, lengths=(7, 3, 5, 1))
    ref = hf_generate(model, ids, mask, 12, eos=2)
    got = load(path).generate(ids, mask, max_new_tokens=12)  # eos 2 and pad 3 from the config
    assert got.shape == ref.shape == (4, 7 + 12)
    np.testing.assert_array_equal(got, ref)
    # the continuation must not be trivial (a constant token would hide position/mask bugs)
    assert len(np.unique(got[:, 7:])) > 3


def test_greedy_eos_padding_matches_transformers(tmp_path, load):
    model = make_model(seed=12, hidden=48, n_head=6, n_layer=3)
    path = save(model, tmp_path / "m")
    _, ids, mask = padded_batch(seed=12, lengths=(7, 3, 5, 1))
    free = load(path).generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 7 + 2])  # a token that row 0 emits at step 3: it becomes "eos" for this test
    ref = hf_generate(model, ids, mask, 12, eos=eos)
    got = load(path).generate(ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=3)
    np.testing.assert_array_equal(got, ref)
    row = got[0, 7:]
    first = int(np.argmax(row == eos))
    assert first <= 2 and np.all(row[first + 1:] == 3)


def test_greedy_float64_batch_equals_rows_alone(tiny, load):
    _, path = tiny
    m = load(path, dtype="float64")
    rows, ids, mask = padded_batch(seed=30)
    batch = m.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    for i, r in enumerate(rows):
        alone = m.generate(np.array([r]), max_new_tokens=8, eos_token_id=[])
        np.testing.assert_array_equal(batch[i, ids.shape[1]:], alone[0, len(r):])


def test_all_rows_finished_stops_early(tiny, load):
    _, path = tiny
    m = load(path)
    ids = random_ids(256, (1, 4), seed=6)
    first = int(m.generate(ids, max_new_tokens=1, eos_token_id=[])[0, -1])
    out = m.generate(ids, max_new_tokens=10, eos_token_id=first)
    assert out.shape == (1, 5) and out[0, -1] == first


def test_stream_yields_the_same_tokens(tiny, load):
    _, path = tiny
    m = load(path)
    ids = random_ids(256, (2, 5), seed=7)
    steps = list(stream(m, ids, max_new_tokens=6, eos_token_id=[]))
    seen = []
    out = m.generate(ids, max_new_tokens=6, eos_token_id=[], callback=seen.append)
    assert len(steps) == len(seen) == 6
    np.testing.assert_array_equal(np.stack(steps, 1), out[:, 5:])
    np.testing.assert_array_equal(np.stack(seen, 1), out[:, 5:])


def test_zero_new_tokens_returns_prompt(tiny):
    m = minibloom.load(tiny[1])
    ids = random_ids(256, (1, 4), seed=8)
    np.testing.assert_array_equal(m.generate(ids, max_new_tokens=0), ids)


# ---- sampling and processors ---------------------------------------------------------------------------------------

def test_sampling_is_reproducible_with_a_seed(tiny, load):
    m = load(tiny[1])
    ids = random_ids(256, (2, 4), seed=9)
    kw = dict(max_new_tokens=15, do_sample=True, temperature=1.5, top_k=0, eos_token_id=[])
    a, b = m.generate(ids, seed=1, **kw), m.generate(ids, seed=1, **kw)
    c = m.generate(ids, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampling_with_tiny_top_p_or_top_k_1_is_greedy(tiny, load):
    m = load(tiny[1])
    ids = random_ids(256, (2, 4), seed=10)
    greedy = m.generate(ids, max_new_tokens=8, eos_token_id=[])
    for kw in (dict(top_k=1), dict(top_p=1e-9, top_k=0)):
        got = m.generate(ids, max_new_tokens=8, eos_token_id=[], do_sample=True, seed=3, **kw)
        np.testing.assert_array_equal(got, greedy)


def test_sample_frequencies_follow_the_distribution():
    from minibloom.generate import sample

    probs = np.array([[0.1, 0.0, 0.6, 0.3]])
    rng = np.random.default_rng(0)
    draws = np.concatenate([sample(probs, rng) for _ in range(20000)])
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, probs[0], atol=0.015)
    assert freq[1] == 0


def test_processors_match_transformers():
    tlp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 40))
    ids = rng.integers(0, 40, (3, 6))
    seen = np.zeros_like(scores, bool)
    np.put_along_axis(seen, ids, True, axis=1)
    t_ids, t_scores = torch.as_tensor(ids), torch.as_tensor(scores)
    cases = [
        (apply_repetition_penalty(scores, seen, 1.3), tlp.RepetitionPenaltyLogitsProcessor(1.3)),
        (apply_top_k(scores, 7), tlp.TopKLogitsWarper(7)),
        (apply_top_p(scores, 0.8), tlp.TopPLogitsWarper(0.8)),
    ]
    for got, proc in cases:
        ref = proc(t_ids, t_scores.clone()).numpy()
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
        np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-15)


def test_greedy_repetition_penalty_matches_transformers(tmp_path, load):
    model = make_model(seed=14, hidden=48, n_head=6, n_layer=2)
    path = save(model, tmp_path / "m")
    ids = random_ids(256, (2, 6), seed=15)
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(ids), attention_mask=torch.ones(2, 6, dtype=torch.long),
                             do_sample=False, max_new_tokens=10, repetition_penalty=1.8, pad_token_id=3,
                             eos_token_id=None).numpy()
    got = load(path).generate(ids, max_new_tokens=10, repetition_penalty=1.8, eos_token_id=[])
    np.testing.assert_array_equal(got, ref)
    plain = load(path).generate(ids, max_new_tokens=10, eos_token_id=[])
    assert not np.array_equal(plain, got), "the penalty must change something for this test to mean anything"


@pytest.mark.parametrize("kw", [dict(max_new_tokens=-1), dict(do_sample=True, temperature=0), dict(top_p=1.5),
                                dict(top_k=-2), dict(repetition_penalty=0)])
def test_bad_options_raise(tiny, kw):
    m = minibloom.load(tiny[1])
    with pytest.raises(MinibloomError):
        m.generate([[1, 2, 3]], **kw)


def test_greedy_runs_on_array_api_strict(tiny):
    pytest.importorskip("array_api_strict")
    ids = random_ids(256, (2, 5), seed=16)
    ref = minibloom.load(tiny[1], dtype="float64").generate(ids, max_new_tokens=6, eos_token_id=[])
    got = minibloom.load(tiny[1], dtype="float64", backend="array_api_strict").generate(
        ids, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(got, ref)


def test_generation_options_are_a_library_function():
    """The sampling defaults (flags, then generation_config.json, then built-in) live in minibloom.generate."""
    from minibloom.generate import BUILTIN, generation_options

    m = minibloom.load()  # weights/default ships a generation_config.json
    with open(os.path.join(m.path, "generation_config.json")) as f:
        gc = json.load(f)
    opts = generation_options(m)
    assert opts["top_k"] == gc["top_k"] and opts["temperature"] == gc["temperature"]
    assert opts["top_p"] == gc.get("top_p", BUILTIN["top_p"])
    assert generation_options(m, top_k=3, seed=5)["top_k"] == 3
    greedy = generation_options(m, greedy=True)
    assert greedy["do_sample"] is False and greedy["temperature"] == 1.0
    assert opts["eos_token_id"] == m.tokenizer.eos_token_id
