"""Every bad argument of the Python API is a MinibloomError naming the argument, raised before any work."""

from __future__ import annotations

import numpy as np
import pytest
from bounds import bounded

import minibloom
from minibloom.errors import MinibloomError


@pytest.fixture(scope="module")
def model():
    return minibloom.load()  # the shipped default model


@pytest.mark.parametrize("arg", [123, b"weights/default", 1.5, ["weights/default"], object()])
def test_load_with_a_value_that_is_not_a_path(arg):
    with pytest.raises(MinibloomError, match="path_or_repo_id"):
        minibloom.load(arg)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=-1), "seed"), (dict(seed="abc"), "seed"), (dict(seed=1.5), "seed"), (dict(seed=2**64), "seed"),
    (dict(do_sample=True, temperature="hot"), "temperature"),
    (dict(do_sample=True, temperature=float("nan")), "temperature"),
    (dict(do_sample=True, temperature=0), "temperature"), (dict(temperature="hot"), "temperature"),
    (dict(top_k=float("inf")), "top_k"), (dict(top_k=float("nan")), "top_k"), (dict(top_k=-3), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(top_p=1.5), "top_p"), (dict(top_p=0), "top_p"), (dict(top_p="x"), "top_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(eos_token_id=10**30), "eos_token_id"), (dict(eos_token_id="x"), "eos_token_id"),
    (dict(eos_token_id=[2, -1]), "eos_token_id"), (dict(pad_token_id="x"), "pad_token_id"),
    (dict(pad_token_id=10**30), "pad_token_id"), (dict(pad_token_id=[3, 4]), "pad_token_id"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens="5"), "max_new_tokens"), (dict(do_sample="yes"), "do_sample"),
])
def test_generate_arguments(model, kwargs, match):
    with pytest.raises(MinibloomError, match=match):
        model.generate([[5, 6, 7]], **kwargs)


@pytest.mark.parametrize("n", [10**6, 10**9, 10**15])
def test_max_new_tokens_beyond_memory_says_what_it_needs(model, n):
    says = rf"max_new_tokens={n}: the KV cache .* would take [0-9.]+ GiB"
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=says):
        model.generate([[5, 6, 7]], max_new_tokens=n)


def test_valid_ids_still_generate(model):
    out = model.generate([[5, 6, 7]], max_new_tokens=3, eos_token_id=[], pad_token_id=3, seed=0, do_sample=True,
                         top_k=np.int64(5), temperature=np.float32(0.7))
    assert out.shape == (1, 6)


@pytest.mark.parametrize("ids", [[-1], [2**64], "abc", [1.5], [[1], [2, 3]], None, [[[1]]]])
def test_decode_refuses_what_is_not_token_ids(model, ids):
    with pytest.raises(MinibloomError, match="ids"):
        model.tokenizer.decode(ids)


@pytest.mark.parametrize("text", [None, 123, "hi \udcff", ["a", 1], b"bytes"])
def test_encode_refuses_what_is_not_text(model, text):
    with pytest.raises(MinibloomError, match="text"):
        model.tokenizer.encode(text)


@pytest.mark.parametrize("batch, max_len", [(1, -1), (0, 5), (-2, 5), (1.5, 5), ("1", 5), (1, 10**15)])
def test_new_cache_arguments(model, batch, max_len):
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="batch|max_len"):
        model.new_cache(batch, max_len)
