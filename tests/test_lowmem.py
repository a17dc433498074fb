"""Low-memory mode (``load(..., low_memory=True, max_memory=...)``): the same numbers as the normal mode, whichever
layers the budget keeps widened and whichever are widened block by block as they are used.

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


C, LAYERS = 64, 3  # the checkpoints' hidden size and depth
BUDGETS = ["none", "one", "all"]  # layers resident under the budget the tests pass


def budget(which: str, dtype: str) -> int:
    """A max_memory (bytes) that keeps no layer, exactly one layer, or everything (head too) widened, counted by hand:
    per layer 12 C^2 weights in its four matrices and 13 C in its biases and LayerNorms; 4 C more outside the layers;
    the widening buffers (one small block per thread, one or two big ones); the head V x C."""
    item = np.dtype(dtype).itemsize
    small = (13 * C * LAYERS + 4 * C) * item
    buffers = lowmem.THREADS * lowmem.FEW_BLOCK_BYTES + lowmem.MANY_BLOCK_BYTES * (2 if item > 4 else 1)
    layer = 12 * C * C * item
    extra = {"none": layer // 2, "one": layer + layer // 2, "all": LAYERS * layer + 300 * C * item}[which]
    return small + buffers + extra


@pytest.fixture
def small_blocks(monkeypatch):
    """Many blocks with short last ones: 7 rows of C float64 (14 of float32) per block when few rows come in (split
    over the threads), 11 (22) from 4 rows on, so prompts take the compute-bound path and decoding the other."""
    monkeypatch.setattr(lowmem, "FEW_BLOCK_BYTES", 7 * C * 8)
    monkeypatch.setattr(lowmem, "MANY_BLOCK_BYTES", 11 * C * 8)
    monkeypatch.setattr(lowmem, "MANY_ROWS", 4)


def resident_layers(model) -> int:
    """Layers whose four matrices are plain arrays (checked one by one, not through the LazyLayers bookkeeping)."""
    def plain(p):
        ws = [p["self_attention"]["query_key_value"]["weight"], p["self_attention"]["dense"]["weight"],
              p["mlp"]["dense_h_to_4h"]["weight"], p["mlp"]["dense_4h_to_h"]["weight"]]
        kinds = {isinstance(w, np.ndarray) for w in ws}
        assert len(kinds) == 1, "a layer is resident or lazy as a whole"
        if not kinds.pop():
            assert all(isinstance(w, lowmem.LazyMatrix) for w in ws)
            return False
        return True

    return sum(plain(p) for p in model.params["h"])


@pytest.mark.parametrize("which", BUDGETS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_logits_and_hidden_states_as_normal_mode(ckpt16, dtype, which, small_blocks, load, record):
    ids, mask = left_pad([random_ids(300, 9, seed=1).tolist(), random_ids(300, 5, seed=2).tolist()])
    normal = load(ckpt16, dtype=dtype).forward(ids, mask, output_hidden_states=True)
    lazy_model = load(ckpt16, dtype=dtype, low_memory=True, max_memory=budget(which, dtype))
    assert isinstance(lazy_model.params["h"], lowmem.LazyLayers)
    assert resident_layers(lazy_model) == {"none": 0, "one": 1, "all": LAYERS}[which]
    head = lazy_model.params["word_embeddings"]["weight"]
    assert isinstance(head, np.ndarray if which == "all" else lowmem.LazyMatrix)
    lazy = lazy_model.forward(ids, mask, output_hidden_states=True)
    assert lazy.logits.dtype == np.dtype(dtype)
    # same conversions, and each output of a block of rows is the same dot product over C as in the whole matrix;
    # BLAS may still sum a narrower product in another order: float32 to rounding, float64 to 1e-12
    tol = FP64_SELF if dtype == "float64" else FP32
    for i, (a, b) in enumerate(zip(lazy.hidden_states, normal.hidden_states)):
        assert_rel_close(a, b, tol, f"hidden state {i}")
    record(f"lowmem {dtype} {which} logits rel err",
           assert_rel_close(lazy.logits, normal.logits, tol, f"low-memory {dtype} logits"))
    if which == "all":  # nothing is widened lazily: the normal mode's arrays, bit for bit
        np.testing.assert_array_equal(lazy.logits, normal.logits)


def test_float64_matches_transformers(tmp_path, small_blocks, load):
    """The low-memory oracle mode against transformers in float64, on the float16-rounded weights it stores."""
    model = make_model(seed=12, vocab=300, hidden=64, n_head=4, n_layer=2)
    path = save(model, tmp_path / "f16", dtype=torch.float16)  # leaves `model` holding the float16-rounded values
    ids = random_ids(300, (2, 11), seed=3)
    with hf_float64_exact():
        ref = hf_logits(model, ids, dtype=torch.float64)
    got = load(path, dtype="float64", low_memory=True, max_memory=0)(ids)
    assert_rel_close(got, ref, FP64_VS_HF, "low-memory float64 logits")


@pytest.mark.parametrize("which", ["none", "one"])
def test_decode_with_cache_matches_normal_mode(ckpt16, which, small_blocks, load):
    ids = random_ids(300, (1, 12), seed=4)
    outs = []
    for low in (False, True):
        m = load(ckpt16, dtype="float64", low_memory=low, max_memory=budget(which, "float64") if low else None)
        cache = m.new_cache(1, 12)
        steps = [m.forward(ids[:, :8], cache=cache, logits="last").logits]
        for t in range(8, 12):
            steps.append(m.forward(ids[:, t:t + 1], cache=cache, logits="last").logits)
        outs.append(np.concatenate(steps, axis=1))
    assert_rel_close(outs[1], outs[0], FP64_SELF, "low-memory cached decode")


def test_pretraining_tp_slices_stay_lazy(tmp_path, small_blocks):
    """``slow_but_exact`` products slice the lazy matrices by columns (``weight[:, a:b]``): still lazy, same sums."""
    import json

    model = make_model(seed=13, vocab=120, hidden=64, n_head=4, n_layer=2)
    path = save(model, tmp_path / "tp", dtype=torch.bfloat16)
    with open(tmp_path / "tp" / "config.json") as f:
        cfg = json.load(f)
    cfg.update(pretraining_tp=4, slow_but_exact=True)
    with open(tmp_path / "tp" / "config.json", "w") as f:
        json.dump(cfg, f)
    ids = random_ids(120, (1, 9), seed=5)
    ref = minibloom.load(path, dtype="float64")(ids)
    lazy = minibloom.load(path, dtype="float64", max_memory=0)
    part = lazy.params["h"][0]["self_attention"]["dense"]["weight"][:, 10:30]
    assert isinstance(part, lowmem.LazyMatrix) and part.shape == (64, 20)
    assert_rel_close(lazy(ids), ref, FP64_SELF, "low-memory pretraining_tp logits")


def test_lazy_matrices_widen_like_the_normal_mode(ckpt16):
    m = minibloom.load(ckpt16, dtype="float32", max_memory=0)
    ref = minibloom.load(ckpt16, dtype="float32")
    assert resident_layers(m) == 0
    for i in (0, -1):
        a = m.params["h"][i]["mlp"]["dense_h_to_4h"]["weight"]
        b = ref.params["h"][i]["mlp"]["dense_h_to_4h"]["weight"]
        assert a.shape == b.shape and a.dtype == np.float32
        eye = np.eye(C, dtype=np.float32)
        np.testing.assert_array_equal(eye @ a.mT, b.T)  # the identity's products are the widened values themselves
        np.testing.assert_array_equal(m.params["h"][i]["input_layernorm"]["bias"],
                                      ref.params["h"][i]["input_layernorm"]["bias"])
    with pytest.raises(IndexError):
        m.params["h"][3]
    E = m.params["word_embeddings"]["weight"]
    assert E.shape == (300, 64)
    np.testing.assert_array_equal(np.take(E, np.array([5, 0, 299]), axis=0),
                                  ref.params["word_embeddings"]["weight"][[5, 0, 299]])
    with pytest.raises(MinibloomError, match="refusing to widen"):
        np.asarray(E)


@pytest.mark.parametrize("text, value", [("18GB", 18 * 10**9), ("18GiB", 18 * 2**30), ("500MB", 500 * 10**6),
                                         ("500 mib", 500 * 2**20), ("1.5GB", 1_500_000_000), ("123", 123),
                                         (4096, 4096), (np.int64(7), 7), (0, 0)])
def test_max_memory_spellings(text, value):
    assert lowmem.parse_memory(text) == value


@pytest.mark.parametrize("bad", ["lots", "18 parsecs", "", "GB", "-5GB", -1, 1.5e9, True, [18]])
def test_bad_max_memory_is_refused(ckpt16, bad):
    with pytest.raises(MinibloomError, match="max_memory"):
        minibloom.load(ckpt16, max_memory=bad)


def test_max_memory_implies_low_memory_and_refuses_the_normal_mode(ckpt16):
    m = minibloom.load(ckpt16, max_memory="1GB")  # plenty for this model: every layer resident, but the lazy tree
    assert isinstance(m.params["h"], lowmem.LazyLayers) and resident_layers(m) == LAYERS
    with pytest.raises(MinibloomError, match="max_memory.*low_memory"):
        minibloom.load(ckpt16, max_memory="1GB", low_memory=False)


def test_default_budget_on_a_24_gb_machine():
    """80% of RAM less 2 GiB, unless the 16-bit rest of the file would not fit the page cache beside it."""
    ram = 24 * 2**30
    cap = 0.8 * ram - 2 * 2**30  # 18.47 GB
    assert lowmem.default_budget(14_100_000_000, 2.0, ram) == int(cap)  # bloom-7b1 float16 -> float32: cap wins
    # float64 widens 4x: R + (14.1 GB - R / 4) <= 24 GiB - 2 GiB -> R <= (23.62 GB - 14.1 GB) * 4 / 3
    assert lowmem.default_budget(14_100_000_000, 4.0, ram) == int((ram - 2 * 2**30 - 14_100_000_000) / 0.75)
    assert lowmem.default_budget(30 * 2**30, 2.0, ram) == 0  # the file alone is bigger than RAM: nothing resident


def test_only_numpy_backend(ckpt16):
    with pytest.raises(MinibloomError, match="low_memory"):
        minibloom.load(ckpt16, backend="array_api_strict", low_memory=True)


def test_streamed_checkpoint_writer_matches_transformers(tmp_path, load):
    """``minibloom.formats.weights.write_random_checkpoint`` (which writes the benchmarks' 560m- and 7b1-shaped files
    chunk by chunk) writes a checkpoint that transformers and minibloom read alike."""
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


@pytest.mark.parametrize("dtype, value", [("float16", float("inf")), ("bfloat16", float("nan"))])
def test_non_finite_lazy_weights_are_refused_when_used(tmp_path, dtype, value, small_blocks):
    """A lazily widened matrix is checked block by block the first time a product reads it."""
    model = make_model(seed=14, vocab=120, hidden=64, n_head=4, n_layer=2)
    with torch.no_grad():
        model.transformer.h[1].mlp.dense_4h_to_h.weight[40, 5] = value
    path = save(model, tmp_path / "bad", dtype=getattr(torch, dtype))
    m = minibloom.load(path, max_memory=0)  # nothing widened yet
    with pytest.raises(MinibloomError, match=r"h\.1\.mlp\.dense_4h_to_h\.weight.*(inf|nan) at flat index 10245 "
                                             r"\(weights must be finite\)"):
        m(random_ids(120, (1, 3), seed=7))


def test_machine_code_and_numpy_widening_give_the_same_logits(ckpt16, small_blocks, monkeypatch):
    """The decode path hands whole blocks to ``native``'s loops once a matrix is checked; the NumPy passes it replaces
    must give the same products bit for bit (same blocks, same BLAS calls)."""
    from minibloom.formats import native

    if native.kernel("F16", np.float32) is None:
        pytest.skip(f"no machine-code kernels here: {native.reason}")
    ids = random_ids(300, (1, 5), seed=3)
    runs = []
    for switch in ("native", "numpy"):
        if switch == "numpy":
            monkeypatch.setattr(native, "kernel", lambda code, dtype: None)
        m = minibloom.load(ckpt16, max_memory=0)
        runs.append([m(ids), m(ids[:, :1])])  # a prompt (first use: checked), then one row (the decode path)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_a_value_that_turns_non_finite_after_the_check_is_still_refused(tmp_path, small_blocks):
    """Once checked, blocks skip the finite check, but the machine-code loop still flags inf/NaN: the file changed
    under the memory map is caught by the next product, naming the tensor."""
    import json
    import struct

    model = make_model(seed=15, vocab=120, hidden=64, n_head=4, n_layer=2)
    path = save(model, tmp_path / "m", dtype=torch.float16)
    m = minibloom.load(path, max_memory=0)
    ids = random_ids(120, (1, 3), seed=8)
    m(ids)
    m(ids[:, :1])
    file = tmp_path / "m" / "model.safetensors"
    with open(file, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        key = next(k for k in header if k.endswith("h.1.mlp.dense_h_to_4h.weight"))
        f.seek(8 + n + header[key]["data_offsets"][0] + 2 * 1000)
        f.write(np.array([np.inf], np.float16).tobytes())
    with pytest.raises(MinibloomError, match=r"h\.1\.mlp\.dense_h_to_4h\.weight.*inf at flat index 1000"):
        m(ids[:, :1])


def test_blas_threads_limits_and_restores():
    from minibloom.backend import _openblas_function, blas_threads

    get = _openblas_function("get_num_threads")
    if get is None:
        pytest.skip("no OpenBLAS with thread control loaded")
    before = get()
    with blas_threads(1):
        assert get() == 1
    assert get() == before
