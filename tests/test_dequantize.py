"""Same-weights references (``minibloom.oracle.dequantize``, ``minibloom dequantize``) for BLOOMs quantized in torch:
optimum-quanto, torchao, HQQ, bitsandbytes (``minibloom.oracle.read_torch``).

(a) the float64 matrices read from the integers, scales and zero points equal the engine's own ``dequantize`` to
float32 rounding (the engine is the independent witness); (b) the quantized transformers port, run in float32, passes
the float32 policy against minibloom float64 on the dequantized checkpoint; (c) planted bugs on the port fail that same
check; (d) bad arguments are MinibloomErrors naming them, and the CLI round trip.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings

import numpy as np
import pytest

import factory
import minibloom
from minibloom import engines
from minibloom.errors import MinibloomError
from minibloom.formats.loading import default_model_path
from minibloom.oracle.engine_weights import EngineWeights
from minibloom.testing import check_logits

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

N_LAYER, HIDDEN = 2, 64
LINEARS = [f"h.{i}.{m}.weight" for i in range(N_LAYER) for m in
           ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
F32 = 2.0 ** -22  # two float32 roundings (an engine's dequantize rounds its subtraction and its product)


# ---- quantizers (each returns a quantized deep copy) and the engines' own dequantize (the witness) ---------------
def _replace_linears(model, make):
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, child_name, make(child))
    return model


def _quanto(qtype_name):
    def quantize(model):
        quanto = pytest.importorskip("optimum.quanto")
        q = copy.deepcopy(model)
        quanto.quantize(q, weights=getattr(quanto, qtype_name))
        quanto.freeze(q)
        return q
    return quantize


def _torchao(config):
    """A torchao port of ``model``: ``config(torchao.quantization)`` applied with ``quantize_`` to a copy."""
    def quantize(model):
        pytest.importorskip("torchao")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as tq
        q = copy.deepcopy(model)
        tq.quantize_(q, config(tq))
        return q
    return quantize


_torchao_int8 = _torchao(lambda tq: tq.Int8WeightOnlyConfig())
# torchao's int4 weight-only that runs on CPU: IntxWeightOnlyConfig, int4, one scale and zero point per 32
_torchao_int4 = _torchao(lambda tq: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                           granularity=tq.granularity.PerGroup(32)))


def _hqq(nbits):
    def quantize(model):
        pytest.importorskip("hqq")
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        cfg = BaseQuantizeConfig(nbits=nbits, group_size=64)
        return _replace_linears(copy.deepcopy(model),
                                lambda lin: HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu"))
    return quantize


def _bnb_nf4(model):
    bnb = pytest.importorskip("bitsandbytes")

    def make(lin):
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type="nf4",
                                compute_dtype=torch.float32, compress_statistics=True)
        new.load_state_dict(lin.state_dict())
        return new.to("cpu")  # bitsandbytes quantizes when the weight moves to a device
    try:
        return _replace_linears(copy.deepcopy(model), make)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"bitsandbytes 4-bit does not run on this CPU: {e}")


ENGINES = {"quanto-qint8": _quanto("qint8"), "quanto-qint4": _quanto("qint4"), "torchao-int8": _torchao_int8,
           "torchao-int4": _torchao_int4, "hqq-8": _hqq(8), "hqq-4": _hqq(4), "bnb-nf4": _bnb_nf4}


def engine_dequantize(q) -> dict[str, np.ndarray]:
    """The engines' own float32 dequantize of every quantized module, keyed by bare BLOOM name."""
    out = {}
    for name, sub in q.named_modules():
        key = (name[len("transformer."):] if name.startswith("transformer.") else name) + ".weight"
        w = getattr(sub, "weight", None)
        if type(sub).__name__ == "HQQLinear":
            out[key] = sub.dequantize()
        elif type(w).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor", "WeightQBytesTensor", "WeightQBitsTensor"):
            out[key] = w.dequantize()
        elif type(w).__name__ == "Params4bit":
            import bitsandbytes as bnb

            out[key] = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return {k: v.detach().to(torch.float64).numpy() for k, v in out.items()}


# ---- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tied BLOOM (every parameter random; vocab = 4 x hidden, so the lookup shares dense_h_to_4h's shape)
    saved as MODEL, and a left-padded batch."""
    model = factory.make_model(seed=3, std=0.08, n_layer=N_LAYER, hidden=HIDDEN, n_head=8, vocab=256)
    like = factory.save(model, tmp_path_factory.mktemp("like"))
    ids, mask = factory.left_pad([list(range(5, 17)), [40, 7, 99, 250, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
    return model, like, ids, mask


_CACHE: dict = {}


@pytest.fixture(scope="module")
def port(tiny, tmp_path_factory):
    """``port(engine)`` -> (quantized model, its same-weights reference directory), built once per engine."""
    model, like, _, _ = tiny

    def get(engine):
        if engine not in _CACHE:
            q = ENGINES[engine](model)
            out = str(tmp_path_factory.mktemp("dq") / engine)
            _CACHE[engine] = (q, engines.dequantized_checkpoint(q, out, like=like))
        return _CACHE[engine]
    yield get
    _CACHE.clear()


def run_port(q, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return q(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()


def reference(directory, ids, mask) -> np.ndarray:
    return minibloom.load(directory, dtype="float64")(ids, attention_mask=mask)


# ---- (a) our float64 matrices vs the engine's own dequantize -----------------------------------------------------
@pytest.mark.parametrize("engine", list(ENGINES))
def test_matrices_equal_the_engines_dequantize(tiny, port, engine, record):
    from minibloom.oracle.read_torch import read

    model, _, _, _ = tiny
    q, _ = port(engine)
    got = read(q)
    witness = engine_dequantize(q)
    assert set(got.matrices) == set(witness) == set(LINEARS) | {"lm_head.weight"}
    assert got.activations is None and got.compute == "float32"
    worst = 0.0
    for name, theirs in witness.items():
        ours = got.matrices[name]
        assert ours.dtype == np.float64 and ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=F32, atol=F32 * np.abs(theirs).max(), err_msg=name)
        worst = max(worst, float(np.abs(ours - theirs).max() / np.abs(theirs).max()))
    record(f"{engine} max |ours - engine| / max|W|", worst)
    # ...and they are quantized: not the float weights (so the test would see a reader returning those)
    qkv = model.transformer.h[0].self_attention.query_key_value.weight.detach().double().numpy()
    assert np.abs(got.matrices["h.0.self_attention.query_key_value.weight"] - qkv).max() > 1e-4


# ---- (b) end to end: the port passes float32 against its same-weights reference ---------------------------------
@pytest.mark.parametrize("engine", list(ENGINES))
def test_port_passes_float32_against_same_weights(tiny, port, engine, record):
    model, like, ids, mask = tiny
    q, out = port(engine)
    with open(os.path.join(out, "minibloom_dequantized.json")) as f:
        note = json.load(f)
    assert note["tensors"]["lm_head.weight"] == "lm_head.weight"
    assert not note["tie_word_embeddings"]  # the quantized head of a tied MODEL is written untied
    assert "word_embeddings.weight" in note["from_model"]
    assert "h.0.self_attention.dense.weight" not in note["from_model"]
    cand = run_port(q, ids, mask)
    v = check_logits(cand, reference(out, ids, mask), mask, policy="float32", size=(N_LAYER, HIDDEN))
    record(f"{engine} vs same-weights rel", v.rel)
    record(f"{engine} vs same-weights KL mean", v.kl_mean)
    assert v.passed, v
    # the unquantized model cannot judge a quantized port at float precision
    w = check_logits(cand, reference(like, ids, mask), mask, policy="float32", size=(N_LAYER, HIDDEN))
    record(f"{engine} vs unquantized rel", w.rel)
    assert not w.passed


@pytest.mark.parametrize("engine", ["torchao-int8", "quanto-qint4"])
def test_trained_model_port_passes(tmp_path, engine, record):
    """weights/default (trained, tied, stored float16) quantized weight-only, run in float32: its port passes
    float32 against the same weights."""
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    model = transformers.BloomForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                          dtype=torch.float32).eval()  # stored float16
    q = ENGINES[engine](model)
    out = engines.dequantized_checkpoint(q, tmp_path / "dq", like=path)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))  # MODEL's tokenizer travels
    ids, mask = factory.left_pad([list(range(30, 54)), [7, 8, 9, 10, 11, 12]])
    cfg = model.config
    v = check_logits(run_port(q, ids, mask), reference(out, ids, mask), mask, policy="float32",
                     size=(cfg.n_layer, cfg.hidden_size))
    record(f"default {engine} vs same-weights rel", v.rel)
    record(f"default {engine} vs same-weights KL mean", v.kl_mean)
    assert v.passed, v


def test_transformers_quantized_directory(tmp_path, tiny, record):
    """A transformers checkpoint saved quantized (torchao int8 weight-only through TorchAoConfig): loaded with
    from_pretrained, read, and its port passes float32 against the reference."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torchao")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8WeightOnlyConfig
    _, like, ids, mask = tiny
    q = transformers.AutoModelForCausalLM.from_pretrained(
        like, quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()), device_map="cpu",
        dtype=torch.float32)
    q.save_pretrained(tmp_path / "q")
    out = engines.dequantized_checkpoint(str(tmp_path / "q"), tmp_path / "dq", like=like)
    with open(os.path.join(out, "minibloom_dequantized.json")) as f:
        assert json.load(f)["source"] == str(tmp_path / "q")
    v = check_logits(run_port(q, ids, mask), reference(out, ids, mask), mask, policy="float32",
                     size=(N_LAYER, HIDDEN))
    record("torchao-int8 directory vs same-weights rel", v.rel)
    assert v.passed, v


def test_bnb_fused_cpu_kernel_is_a_bfloat16_port(tmp_path, tiny, record):
    """In eval mode on an AVX512-BF16 CPU, bitsandbytes' Linear4bit runs a fused kernel in bfloat16 (absmax and
    weights rounded to bfloat16): the reference takes those weights and says compute bfloat16."""
    pytest.importorskip("bitsandbytes")
    model, like, ids, mask = tiny
    q = _bnb_nf4(model).eval()
    if not getattr(q.transformer.h[0].self_attention.dense, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps its float32 path (covered above)")
    out = engines.dequantized_checkpoint(q, tmp_path / "dq", like=like)
    with open(os.path.join(out, "minibloom_dequantized.json")) as f:
        note = json.load(f)
    assert note["compute"] == "bfloat16" and "bfloat16" in note["notes"][0]
    cand, ref = run_port(q, ids, mask), reference(out, ids, mask)
    v = check_logits(cand, ref, mask, policy="bfloat16", size=(N_LAYER, HIDDEN))
    record("bnb-nf4 fused kernel vs same-weights rel", v.rel)
    record("bnb-nf4 fused kernel vs same-weights KL mean", v.kl_mean)
    assert v.passed, v
    assert not check_logits(cand, ref, mask, policy="float32", size=(N_LAYER, HIDDEN)).passed
    # read after the first forward (weights repacked for the kernel): the same matrices
    from minibloom.oracle.read_torch import read

    again = read(q).matrices
    got = minibloom.load(out, dtype="float64")
    np.testing.assert_array_equal(again["h.1.mlp.dense_4h_to_h.weight"],
                                  got.params["h"][1]["mlp"]["dense_4h_to_h"]["weight"])


def test_bnb_int8_quantizes_activations(tmp_path, tiny):
    """bitsandbytes Linear8bitLt: CB * SCB / 127 as bitsandbytes dequantizes it, and its activations are quantized
    per row (said in the note, and the CLI's next command is not a float kind)."""
    bnb = pytest.importorskip("bitsandbytes")
    from minibloom.oracle.read_torch import read

    model, like, _, _ = tiny

    def make(lin):
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  has_fp16_weights=False)
        new.load_state_dict(lin.state_dict())
        return new.to("cpu")
    q = _replace_linears(copy.deepcopy(model), make)
    got = read(q)
    assert got.activations == "int8-per-row"
    lin = q.transformer.h[1].mlp.dense_h_to_4h
    witness = bnb.functional.int8_vectorwise_dequant(lin.weight.CB, lin.weight.SCB).double().numpy()
    np.testing.assert_allclose(got.matrices["h.1.mlp.dense_h_to_4h.weight"], witness, rtol=F32,
                               atol=F32 * np.abs(witness).max())
    out = engines.dequantized_checkpoint(q, tmp_path / "dq", like=like)
    with open(os.path.join(out, "minibloom_dequantized.json")) as f:
        assert json.load(f)["activations"] == "int8-per-row"


# ---- (c) planted bugs on the port fail the same check ----------------------------------------------------------
def _alibi(monkeypatch, how):
    from transformers.models.bloom import modeling_bloom

    original = modeling_bloom._get_alibi_slopes

    def slopes(num_heads, device):
        s = original(num_heads, device)
        if how == "scaled":  # also multiplied by 1/sqrt(head_dim), like the attention scores
            return s / (HIDDEN // num_heads) ** 0.5
        return s.flip(0)  # slopes in reversed head order
    monkeypatch.setattr(modeling_bloom, "_get_alibi_slopes", slopes)


@contextlib.contextmanager
def _dense_bias_dropped(q, layer):
    """The attention output's bias left out (zeroed in place, restored after: frozen ports cannot be deep-copied)."""
    bias = q.transformer.h[layer].self_attention.dense.bias
    kept = bias.detach().clone()
    with torch.no_grad():
        bias.zero_()
    try:
        yield q
    finally:
        with torch.no_grad():
            bias.copy_(kept)


BUGS = [("torchao-int8", "alibi-scaled"), ("quanto-qint8", "alibi-scaled"), ("quanto-qint4", "dense-bias-dropped"),
        ("hqq-4", "alibi-reversed"), ("hqq-8", "dense-bias-dropped"), ("bnb-nf4", "alibi-scaled"),
        ("torchao-int4", "dense-bias-dropped"), ("quanto-qint8", "alibi-reversed"), ("torchao-int8", "alibi-reversed"),
        ("hqq-8", "alibi-scaled"), ("bnb-nf4", "dense-bias-dropped")]  # three kinds of bug on each engine


@pytest.mark.parametrize("engine,bug", BUGS)
def test_planted_bug_fails(tiny, port, engine, bug, monkeypatch, record):
    _, _, ids, mask = tiny
    q, out = port(engine)
    ref = reference(out, ids, mask)
    if bug == "dense-bias-dropped":
        with _dense_bias_dropped(q, 1):
            cand = run_port(q, ids, mask)
    else:
        _alibi(monkeypatch, bug.split("-")[1])
        cand = run_port(q, ids, mask)
    v = check_logits(cand, ref, mask, policy="float32", size=(N_LAYER, HIDDEN))
    record(f"{engine} {bug} rel", v.rel)
    record(f"{engine} {bug} KL mean", v.kl_mean)
    assert not v.passed, v


# ---- mapping by shape and value, untied output ---------------------------------------------------------------
@pytest.fixture(scope="module")
def like_flat(tiny):
    from minibloom.formats.weights import flatten

    model = minibloom.load(tiny[1], dtype="float64")
    return {k: np.asarray(v) for k, v in flatten(model.params).items()}


def test_unnamed_tensors_are_mapped_by_shape_and_value(like_flat):
    from minibloom.oracle.dequantize import assign

    rng = np.random.default_rng(0)
    noisy = {k: v + 0.05 * np.std(v) * rng.standard_normal(v.shape) for k, v in like_flat.items()}
    mats = {"a": noisy["h.1.mlp.dense_h_to_4h.weight"].T,  # [in, out] as some engines store it
            "b": noisy["h.0.mlp.dense_h_to_4h.weight"],  # same shape as the lookup: values decide
            "c": noisy["h.1.self_attention.dense.weight"].T,  # square: the orientation is found by value
            "h.0.self_attention.dense.weight": noisy["h.0.self_attention.dense.weight"]}
    mapped, went = assign(EngineWeights("test", mats), like_flat, tied=True)
    assert went == {"a": "h.1.mlp.dense_h_to_4h.weight", "b": "h.0.mlp.dense_h_to_4h.weight",
                    "c": "h.1.self_attention.dense.weight",
                    "h.0.self_attention.dense.weight": "h.0.self_attention.dense.weight"}
    np.testing.assert_array_equal(mapped["h.1.mlp.dense_h_to_4h.weight"], mats["a"].T)
    np.testing.assert_array_equal(mapped["h.1.self_attention.dense.weight"], mats["c"].T)


def test_quantized_lookup_and_untied_head_load(tmp_path, tiny):
    """A reader naming both the lookup and the head: the tied MODEL is written untied, both from the engine, and
    minibloom runs it with that head (not the lookup)."""
    from minibloom.oracle import dequantize

    model, like, ids, mask = tiny

    class Reader:
        @staticmethod
        def read(_):
            E = model.transformer.word_embeddings.weight.detach().double().numpy()
            return EngineWeights("fake", {"word_embeddings.weight": E * 1.01, "lm_head.weight": E * 0.99})

    mp = pytest.MonkeyPatch()
    mp.setattr(dequantize, "_reader", lambda form: Reader)
    try:
        out = dequantize.dequantized_checkpoint(model, tmp_path / "dq", like)
    finally:
        mp.undo()
    b = minibloom.load(out, dtype="float64")
    assert not b.config.tie_word_embeddings
    E = model.transformer.word_embeddings.weight.detach().double().numpy()
    np.testing.assert_array_equal(b.params["lm_head"]["weight"], E * 0.99)
    np.testing.assert_array_equal(b.params["word_embeddings"]["weight"], E * 1.01)
    with open(os.path.join(out, "minibloom_dequantized.json")) as f:
        assert json.load(f)["stored"] == "float64"  # E * 1.01 is not a float32


# ---- (d) errors ----------------------------------------------------------------------------------------------
def test_unmappable_tensor_is_named(like_flat):
    from minibloom.oracle.dequantize import assign

    rng = np.random.default_rng(1)
    cases = {"odd_shape": rng.standard_normal((7, 64)),  # no BLOOM tensor of that shape
             "noise": rng.standard_normal((64, 64)),  # the right shape, nobody's values
             "lookup": like_flat["word_embeddings.weight"] * 1.001}  # ambiguous: lookup or head
    for name, value in cases.items():
        with pytest.raises(MinibloomError, match=f"engine tensor {name} .*cannot be mapped"):
            assign(EngineWeights("test", {name: value}), like_flat, tied=True)
    with pytest.raises(MinibloomError, match=r"engine tensor h\.1\.mlp\.dense_4h_to_h\.weight: NaN or inf"):
        bad = like_flat["h.1.mlp.dense_4h_to_h.weight"].copy()
        bad[3, 5] = np.nan
        assign(EngineWeights("test", {"h.1.mlp.dense_4h_to_h.weight": bad}), like_flat, tied=True)
    both = {"x": like_flat["h.0.self_attention.dense.weight"], "y": like_flat["h.0.self_attention.dense.weight"]}
    with pytest.raises(MinibloomError, match="engine tensor y cannot be mapped.*already holds engine tensor x"):
        assign(EngineWeights("test", both), like_flat, tied=True)


def test_wrong_like_model(tmp_path, port):
    q, _ = port("quanto-qint8")
    other = factory.save(factory.make_model(seed=3, std=0.08, n_layer=N_LAYER, hidden=48, n_head=8, vocab=256),
                         tmp_path / "hidden48")
    with pytest.raises(MinibloomError, match=r"engine tensor h\.0\.\S+\.weight: shape \[\d+, \d+\], but MODEL's "
                                             r"\S+ has shape \[\d+, \d+\]"):
        engines.dequantized_checkpoint(q, tmp_path / "a", like=other)
    same_shape = factory.save(factory.make_model(seed=4, std=0.08, n_layer=N_LAYER, hidden=HIDDEN, n_head=8,
                                                 vocab=256), tmp_path / "seed4")
    with pytest.raises(MinibloomError, match="not a quantization of MODEL's"):
        engines.dequantized_checkpoint(q, tmp_path / "b", like=same_shape)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_out_dir_rules(tmp_path, tiny, port):
    _, like, _, _ = tiny
    q, _ = port("quanto-qint8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    with pytest.raises(MinibloomError, match=r"out_dir .*out: exists and is not empty \(model-00002"):
        engines.dequantized_checkpoint(q, out, like=like)
    engines.dequantized_checkpoint(q, out, like=like, force=True)
    assert sorted(os.listdir(out)) == ["config.json", "minibloom_dequantized.json", "model.safetensors"]
    with pytest.raises(MinibloomError, match="would overwrite an input"):
        engines.dequantized_checkpoint(q, like, like=like, force=True)
    assert os.path.isfile(os.path.join(like, "config.json"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(MinibloomError, match="out_dir .*file: is a file"):
        engines.dequantized_checkpoint(q, tmp_path / "file", like=like)
    with pytest.raises(MinibloomError, match="force: expected True or False"):
        engines.dequantized_checkpoint(q, tmp_path / "x", like=like, force="yes")


def test_bad_sources(tmp_path, tiny):
    _, like, _, _ = tiny
    with pytest.raises(MinibloomError, match="source .*missing: no such file or directory"):
        engines.dequantized_checkpoint(tmp_path / "missing", tmp_path / "o", like=like)
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    with pytest.raises(MinibloomError, match=r"source .*w\.gguf: a \.gguf file is not a quantized model"):
        engines.dequantized_checkpoint(tmp_path / "w.gguf", tmp_path / "o", like=like)
    with pytest.raises(MinibloomError, match="source .*: a directory with no quantized model"):
        engines.dequantized_checkpoint(like, tmp_path / "o", like=like)  # unquantized: nothing to read
    with pytest.raises(MinibloomError, match="source: a dict is not a quantized model"):
        engines.dequantized_checkpoint({}, tmp_path / "o", like=like)
    os.mkfifo(tmp_path / "pipe.onnx")  # never opened: reading a FIFO would block
    with pytest.raises(MinibloomError, match=r"source .*pipe\.onnx: not a regular file or a directory"):
        engines.dequantized_checkpoint(tmp_path / "pipe.onnx", tmp_path / "o", like=like)
    (tmp_path / "ir").mkdir()
    (tmp_path / "ir" / "model.xml").write_text("<net/>")
    with pytest.raises(MinibloomError, match=r"model\.xml has no weights file"):
        engines.dequantized_checkpoint(tmp_path / "ir", tmp_path / "o", like=like)
    (tmp_path / "ir" / "model.bin").write_bytes(b"")
    with pytest.raises(MinibloomError, match="like: expected the unquantized model"):
        engines.dequantized_checkpoint(tmp_path / "ir" / "model.xml", tmp_path / "o", like=None)
    assert not (tmp_path / "o").exists()


def test_source_forms(tmp_path, tiny):
    """Which reader each path goes to (checked before any reading)."""
    from minibloom.oracle.dequantize import source_form

    _, like, _, _ = tiny
    ct2 = tmp_path / "ct2"
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"")
    (ct2 / "config.json").write_text("{}")
    assert source_form(ct2) == ("ct2", str(ct2))
    ir = tmp_path / "ir"
    ir.mkdir()
    (ir / "openvino_model.xml").write_text("<net/>")
    (ir / "openvino_model.bin").write_bytes(b"")
    assert source_form(ir) == ("openvino", str(ir / "openvino_model.xml"))
    assert source_form(str(ir / "openvino_model.xml")) == ("openvino", str(ir / "openvino_model.xml"))
    ox = tmp_path / "onnx"
    ox.mkdir()
    (ox / "model.onnx").write_bytes(b"")
    assert source_form(ox) == ("onnx", str(ox / "model.onnx"))
    (ox / "model_quantized.onnx").write_bytes(b"")
    with pytest.raises(MinibloomError, match=r"holds several models \(model\.onnx, model_quantized\.onnx\)"):
        source_form(ox)
    hf = tmp_path / "hf"
    hf.mkdir()
    with open(os.path.join(like, "config.json")) as f:
        config = json.load(f)
    (hf / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "torchao"}}))
    assert source_form(hf) == ("transformers", str(hf))
    (tmp_path / "m.pt").write_bytes(b"")
    assert source_form(tmp_path / "m.pt") == ("pickle", str(tmp_path / "m.pt"))


def test_unquantized_module_and_unknown_quantized_weight(tiny):
    from minibloom.oracle.read_torch import read

    model = tiny[0]
    with pytest.raises(MinibloomError, match="holds no quantized weight"):
        read(model)

    odd = copy.deepcopy(model)
    odd.transformer.h[1].mlp.dense_4h_to_h.weight = torch.nn.Parameter(
        odd.transformer.h[1].mlp.dense_4h_to_h.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(MinibloomError, match=r"module 'transformer\.h\.1\.mlp\.dense_4h_to_h' "
                                             r"\(torch\.nn\.modules\.linear\.Linear\): weight of type .*int8"):
        read(odd)


def test_pickled_module_source(tmp_path, tiny, port):
    _, like, ids, mask = tiny
    q, ref_dir = port("quanto-qint4")
    torch.save(q, tmp_path / "q.pt")
    out = engines.dequantized_checkpoint(str(tmp_path / "q.pt"), tmp_path / "dq", like=like)
    np.testing.assert_array_equal(reference(out, ids, mask), reference(ref_dir, ids, mask))


# ---- CLI ------------------------------------------------------------------------------------------------------
def test_cli_round_trip(tmp_path, tiny, port, capsys):
    from minibloom.cli import main
    from minibloom.formats.weights import expected_shapes

    _, like, _, _ = tiny
    q, _ = port("hqq-4")
    torch.save(q, tmp_path / "q.pt")
    out = str(tmp_path / "dq")
    assert main(["dequantize", str(tmp_path / "q.pt"), "--like", like, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "torch (hqq)" in text and "float64" in text and f"minibloom verify CAND.npz --model {out} --kind " \
        "float32" in text
    assert main(["dequantize", str(tmp_path / "q.pt"), "--like", like, "--out", out]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["dequantize", str(tmp_path / "q.pt"), "--like", like, "--out", out, "--force", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["from_engine"] == len(LINEARS) + 1 and summary["stored"] == "float64"
    assert summary["from_model"] == len(expected_shapes(minibloom.load(like).config, 256)) - len(LINEARS)
    assert main(["dequantize", str(tmp_path / "nope"), "--like", like, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minibloom dequantize: error: SOURCE ") and len(err.strip().splitlines()) == 1
