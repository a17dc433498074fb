"""Low-memory mode (``load(..., low_memory=True)``): the same numbers as the normal mode, one layer widened at a time.

Scenarios that run the model take the ``load`` fixture (conftest.py): once per primitive set, same assertions."""

from __future__ import annotations

import numpy as np
import pytest

import minibloom
from minibloom.formats import lowmem
from minibloom.errors import MinibloomError
from minibloom.testing import FP32, FP64_SELF, FP64_VS_HF, assert_rel_close
from factory import hf_float64_exact, hf_logits, left_pad, make_model, random_ids, save

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_model():
    return make_model(seed=11, vocab=300, hidden=64, n_head=4, n_layer=3)


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def ckpt16(request, hf_model, tmp_path_factory):
    return save(hf_model, tmp_path_factory.mktemp(request.param), dtype=getattr(torch, request.param))


@pytest.fixture
def small_blocks(monkeypatch):
    # force the head into many blocks (of 7 rows), including a short last one (300 = 42 * 7 + 6)
    monkeypatch.setattr(lowmem, "HEAD_BLOCK_BYTES", 7 * 64 * 8)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_logits_and_hidden_states_as_normal_mode(ckpt16, dtype, small_blocks, load, record):
    ids, mask = left_pad([random_ids(300, 9, seed=1).tolist(), random_ids(300, 5, seed=2).tolist()])
    normal = load(ckpt16, dtype=dtype).forward(ids, mask, output_hidden_states=True)
    lazy_model = load(ckpt16, dtype=dtype, low_memory=True)
    assert isinstance(lazy_model.params["h"], lowmem.LazyLayers)
    assert isinstance(lazy_model.params["word_embeddings"]["weight"], lowmem.LazyMatrix)
    lazy = lazy_model.forward(ids, mask, output_hidden_states=True)
    assert lazy.logits.dtype == np.dtype(dtype)
    for i, (a, b) in enumerate(zip(lazy.hidden_states, normal.hidden_states)):
        np.testing.assert_array_equal(a, b, err_msg=f"hidden state {i}")  # same conversions, same maths: bitwise
    # the head is computed in blocks of columns; every logit is still one dot product over C, but BLAS may sum it
    # in another order for another block width: float32 rounding (observed ~2e-7), float64 exact to 1e-12
    tol = FP64_SELF if dtype == "float64" else FP32
    record(f"lowmem {dtype} logits rel err",
           assert_rel_close(lazy.logits, normal.logits, tol, f"low-memory {dtype} logits"))


def test_float64_matches_transformers(tmp_path, small_blocks, load):
    """The low-memory oracle mode against transformers in float64, on the float16-rounded weights it stores."""
    model = make_model(seed=12, vocab=300, hidden=64, n_head=4, n_layer=2)
    path = save(model, tmp_path / "f16", dtype=torch.float16)  # leaves `model` holding the float16-rounded values
    ids = random_ids(300, (2, 11), seed=3)
    with hf_float64_exact():
        ref = hf_logits(model, ids, dtype=torch.float64)
    got = load(path, dtype="float64", low_memory=True)(ids)
    assert_rel_close(got, ref, FP64_VS_HF, "low-memory float64 logits")


def test_decode_with_cache_matches_normal_mode(ckpt16, small_blocks, load):
    ids = random_ids(300, (1, 12), seed=4)
    outs = []
    for low in (False, True):
        m = load(ckpt16, dtype="float64", low_memory=low)
        cache = m.new_cache(1, 12)
        steps = [m.forward(ids[:, :8], cache=cache, logits="last").logits]
        for t in range(8, 12):
            steps.append(m.forward(ids[:, t:t + 1], cache=cache, logits="last").logits)
        outs.append(np.concatenate(steps, axis=1))
    assert_rel_close(outs[1], outs[0], FP64_SELF, "low-memory cached decode")


def test_layers_are_widened_on_access(ckpt16):
    m = minibloom.load(ckpt16, dtype="float32", low_memory=True)
    ref = minibloom.load(ckpt16, dtype="float32")
    h = m.params["h"]
    assert len(h) == 3
    for i in (0, -1):
        a = h[i]["mlp"]["dense_h_to_4h"]["weight"]
        b = ref.params["h"][i]["mlp"]["dense_h_to_4h"]["weight"]
        assert a.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert h[0] is not h[0]  # a fresh widened copy each time: nothing is kept
    with pytest.raises(IndexError):
        h[3]
    E = m.params["word_embeddings"]["weight"]
    assert E.shape == (300, 64)
    np.testing.assert_array_equal(np.take(E, np.array([5, 0, 299]), axis=0),
                                  ref.params["word_embeddings"]["weight"][[5, 0, 299]])
    with pytest.raises(MinibloomError, match="refusing to widen"):
        np.asarray(E)


def test_only_numpy_backend(ckpt16):
    with pytest.raises(MinibloomError, match="low_memory"):
        minibloom.load(ckpt16, backend="array_api_strict", low_memory=True)


def test_streamed_checkpoint_writer_matches_transformers(tmp_path, load):
    """``minibloom.formats.weights.write_random_checkpoint`` (which writes the benchmarks' 560m- and 7b1-shaped files chunk by
    chunk) writes a checkpoint that transformers and minibloom read alike."""
    from minibloom.config import BloomConfig
    from minibloom.formats.weights import write_random_checkpoint

    transformers = pytest.importorskip("transformers")
    cfg = BloomConfig(vocab_size=120, hidden_size=32, n_layer=2, n_head=4)
    path = write_random_checkpoint(tmp_path / "c", cfg, 120, np.float16, chunk=1000, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = random_ids(120, (1, 7), seed=6)
    ref = hf_logits(hf, ids)
    got = load(path, low_memory=True)(ids)
    assert_rel_close(got, ref, FP32, "written checkpoint, minibloom low-memory vs transformers")
    w = minibloom.load(path).params["h"][1]["input_layernorm"]["weight"]
    assert 0.5 < w.mean() < 1.5 and w.std() > 0  # LayerNorm weights near 1, randomized
