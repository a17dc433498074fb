"""Engine-weight readers (``minibloom.oracle.read_ct2``, ``read_onnx``) and the activation-quantization emulation
(``minibloom.oracle.activations``), each against an independent computation: CTranslate2's quantization formula
applied to the source weights, ONNX Runtime running one-node graphs, hand-worked integer products."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from minibloom import model as M
from minibloom.config import BloomConfig
from minibloom.errors import MinibloomError
from minibloom.formats.weights import flatten, nest, write_checkpoint
from minibloom.oracle.activations import activation_primitives, quantize_activations, u8s8_sat16_linear
from minibloom.oracle.calibrate import calibration_mask, random_checkpoint
from minibloom.oracle.testing import check_logits

LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
CFG = BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=8)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny random checkpoint (every parameter random) and its float64 parameters by bare name."""
    d = tmp_path_factory.mktemp("src")
    params = random_checkpoint(CFG, 256, 3, std=0.08)
    write_checkpoint(d, CFG, params)
    from minibloom.bloom import load

    model = load(str(d), dtype="float64")
    ids = np.random.default_rng(1).integers(0, 256, (3, 12))
    return str(d), model, dict(flatten(model.params)), ids, calibration_mask(3, 12)


def _same_weights(model, matrices: dict) -> dict:
    """The model's parameters with the engine's dequantized tensors in place (an untied head when they differ)."""
    flat = dict(flatten(model.params))
    for k, v in matrices.items():
        if k == "lm_head.weight" and np.array_equal(v, matrices.get("word_embeddings.weight")):
            continue
        assert k in flat or k == "lm_head.weight", k
        flat[k] = v
    return nest(flat)


# ---- CTranslate2 -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct2_models(source, tmp_path_factory):
    pytest.importorskip("ctranslate2")
    from minibloom.engines import ctranslate2_convert

    d = tmp_path_factory.mktemp("ct2")
    return {q: ctranslate2_convert(source[0], str(d / q), q) for q in ("int8", "int8_float16")}


def _ct2_formula(w: np.ndarray) -> np.ndarray:
    """CTranslate2's int8 weights (specs/model_spec.py): float32 scale 127 / amax per row, rint; dequantized."""
    w32 = w.astype(np.float32)
    scale = np.float32(127.0) / np.max(np.abs(w32), axis=1)
    q = np.rint(w32 * scale[:, None])
    return q.astype(np.float64) / scale.astype(np.float64)[:, None]


def test_ct2_reader_matches_the_quantization_formula(source, ct2_models):
    from minibloom.oracle.read_ct2 import read

    _, _, src, _, _ = source
    ew = read(ct2_models["int8"])
    assert ew.activations == "int8-per-row"
    want = {f"h.{i}.{m}.weight" for i in range(CFG.n_layer) for m in LINEARS} | {"word_embeddings.weight",
                                                                                   "lm_head.weight"}
    assert set(ew.matrices) == want
    for name, w in ew.matrices.items():
        ref = _ct2_formula(src["word_embeddings.weight" if name == "lm_head.weight" else name])
        assert w.shape == ref.shape, name  # the QKV rows back in transformers' per-head interleave
        np.testing.assert_allclose(w, ref, rtol=1e-12, atol=0, err_msg=name)


def test_ct2_int8_float16_returns_the_rounded_float_tensors(source, ct2_models):
    from minibloom.oracle.read_ct2 import read

    _, _, src, _, _ = source
    ew = read(ct2_models["int8_float16"])
    qkv_bias = "h.1.self_attention.query_key_value.bias"
    for name in (qkv_bias, "h.0.mlp.dense_4h_to_h.bias", "ln_f.weight", "h.1.input_layernorm.bias"):
        np.testing.assert_array_equal(ew.matrices[name], src[name].astype(np.float16).astype(np.float64), name)


def test_ct2_float_compute_on_int8_weights_passes_float32(source, ct2_models):
    from minibloom.engines import ctranslate2_trace
    from minibloom.oracle.read_ct2 import read

    _, model, _, ids, mask = source
    cand = ctranslate2_trace(ct2_models["int8"], ids, mask, compute_type="float32")
    params = _same_weights(model, read(ct2_models["int8"]).matrices)
    ref = M.forward(params, ids, mask, model.config)
    verdict = check_logits(cand["logits"], ref, mask, policy="float32", size=(CFG.n_layer, CFG.hidden_size))
    assert verdict.passed, verdict
    unquantized = M.forward(model.params, ids, mask, model.config)  # the weights matter: not the original
    assert not check_logits(cand["logits"], unquantized, mask, policy="float32", size=(2, 64)).passed


def _exact_share(cand, ref, mask) -> float:
    """The share of real positions whose logits match ``ref`` to float32 rounding (1e-5 of the logits' scale)."""
    real = mask.astype(bool)
    err = np.max(np.abs(cand - ref), axis=-1)[real] / np.max(np.abs(ref[real]))
    return float(np.mean(err < 1e-5))


def test_ct2_int8_compute_is_the_emulated_arithmetic(source, ct2_models):
    """CTranslate2's int8 compute against the same weights with its activation rounding emulated: most positions
    match to float32 rounding (a rare rounding flip moves the positions after it), none without the emulation.
    Per-row int8 on VNNI CPUs, the int16-saturating pairs where oneDNN / MKL lack VNNI: the better of the two."""
    from minibloom.engines import ctranslate2_trace
    from minibloom.oracle.read_ct2 import read

    _, model, _, ids, mask = source
    cand = ctranslate2_trace(ct2_models["int8"], ids, mask, compute_type="int8_float32")["logits"]
    params = _same_weights(model, read(ct2_models["int8"]).matrices)
    plain = _exact_share(cand, M.forward(params, ids, mask, model.config), mask)
    emulated = max(_exact_share(cand, M.forward(params, ids, mask, model.config,
                                                primitives=activation_primitives(s)), mask)
                   for s in ("int8-per-row", "int8-per-row-sat16"))
    assert plain == 0.0 and emulated >= 0.5, (emulated, plain)


def _model_bin(tmp_path, records: bytes, version: int = 6, n_vars: int = 1, aliases: bytes = struct.pack("<I", 0)):
    def s(x: str) -> bytes:
        return struct.pack("<H", len(x) + 1) + x.encode() + b"\0"

    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "model.bin").write_bytes(struct.pack("<I", version) + s("TransformerDecoderSpec") + struct.pack("<I", 8)
                                  + struct.pack("<I", n_vars) + records + aliases)
    return str(d)


def _var(name: str, shape, type_id: int, payload: bytes, n_bytes: int | None = None) -> bytes:
    head = struct.pack("<H", len(name) + 1) + name.encode() + b"\0" + struct.pack("<B", len(shape))
    head += b"".join(struct.pack("<I", n) for n in shape)
    return head + struct.pack("<BI", type_id, len(payload) if n_bytes is None else n_bytes) + payload


@pytest.mark.parametrize("damage", ["truncated", "version", "huge-dims", "size-mismatch", "trailing", "dtype",
                                    "count", "alias"])
def test_ct2_damaged_model_bin_is_an_error(tmp_path, ct2_models, damage):
    from minibloom.oracle.read_ct2 import read

    good = open(os.path.join(ct2_models["int8"], "model.bin"), "rb").read()
    if damage == "truncated":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model.bin").write_bytes(good[: len(good) // 2])
        d = str(tmp_path / "m")
    elif damage == "version":
        d = _model_bin(tmp_path, b"", version=99, n_vars=0)
    elif damage == "huge-dims":  # a header claiming 2^32-1 x 2^32-1 int8: refused before any allocation
        d = _model_bin(tmp_path, _var("decoder/x/weight", (2**32 - 1, 2**32 - 1), 1, b"", n_bytes=2**32 - 1))
    elif damage == "size-mismatch":
        d = _model_bin(tmp_path, _var("decoder/x/weight", (4, 4), 1, b"\0" * 8))
    elif damage == "trailing":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model.bin").write_bytes(good + b"junk")
        d = str(tmp_path / "m")
    elif damage == "dtype":
        d = _model_bin(tmp_path, _var("decoder/x/weight", (2,), 9, b"\0\0"))
    elif damage == "count":
        d = _model_bin(tmp_path, b"", n_vars=2**31)
    else:
        d = _model_bin(tmp_path, _var("decoder/num_heads", (), 2, b"\x08\0"),
                       aliases=struct.pack("<I", 1) + b"\x03\0ab\0" + b"\x03\0cd\0")
    with pytest.raises(MinibloomError, match="model.bin"):
        read(d)


# ---- activation quantization -----------------------------------------------------------------------------------
def test_int8_per_row_is_ctranslate2s_formula():
    """quantize_s8_row (src/cpu/kernels.cc): scale = 127 / amax in float32, nearbyint(x * scale), / scale."""
    x = np.random.default_rng(0).standard_normal((5, 33)).astype(np.float32)
    x[2] = 0.0
    amax = np.max(np.abs(x), axis=1, keepdims=True)
    scale = np.where(amax != 0, np.float32(127.0) / np.where(amax != 0, amax, 1), np.float32(1.0))
    want = np.rint(x * scale) / scale
    got = quantize_activations(x, "int8-per-row")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert len(np.unique(np.rint(got[0] * 127 / np.abs(got[0]).max()))) <= 255 and not got[2].any()


def test_uint8_per_tensor_is_onnxruntimes_dynamic_quantize_linear():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 37])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [4, 37]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("z", TensorProto.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for x in (rng.standard_normal((4, 37)) + 0.7, np.abs(rng.standard_normal((4, 37)))):
        x = x.astype(np.float32)
        y, s, z = sess.run(None, {"x": x})
        want = (y.astype(np.float64) - float(z)) * float(s)
        np.testing.assert_allclose(quantize_activations(x, "uint8-per-tensor"), want, rtol=1e-6, atol=1e-7)


def test_sat16_product_saturates_adjacent_pairs():
    """u8s8 without VNNI: (q + 128) * w for k = 2j, 2j+1 summed in int16 with saturation."""
    x = np.array([[1.0, 1.0, -1.0, -1.0]])  # q = [127, 127, -127, -127] -> u = [255, 255, 1, 1]
    w = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0]])  # qw = 127 everywhere, or alternating
    # row 0: pairs 255*127*2 = 64770 -> 32767, 1*127*2 = 254; minus 128 * 508 = 65024 -> -31981 + ... exact below
    acc0 = 32767 + 254 - 128 * 508
    acc1 = (255 * 127 - 255 * 127) + (127 - 127) - 128 * 0
    want = np.array([[acc0, acc1]]) / (127.0 * 127.0)
    np.testing.assert_allclose(u8s8_sat16_linear(x, w, 0.0), want, rtol=1e-12)
    xs = np.array([[-0.5, 0.25, 0.125]])  # u = [1, 192, 160]: no pair reaches 32767, the plain int8 product
    np.testing.assert_allclose(u8s8_sat16_linear(xs, w[:, :3], 0.0), quantize_activations(xs, "int8-per-row")
                               @ w[:, :3].T, rtol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_sat16_product_equals_every_pair_clipped(seed):
    """The sparse saturation (only weight pairs that can reach int16's range recomputed) equals clipping every pair:
    random per-row int8 weights with large values, odd and even K."""
    rng = np.random.default_rng(seed)
    N, O, K = int(rng.integers(1, 6)), int(rng.integers(1, 30)), int(rng.integers(1, 41))
    x = rng.standard_normal((N, K))
    q = rng.integers(-127, 128, (O, K)).astype(np.float64)
    q[:, 0] = 127.0  # every row reaches 127, so its scale is 127 / 127
    w = q / 127.0
    u = np.rint(x * (127.0 / np.abs(x).max(-1, keepdims=True))) + 128.0
    up, qp = np.pad(u, ((0, 0), (0, K % 2))), np.pad(q, ((0, 0), (0, K % 2)))
    pairs = up[:, None, 0::2] * qp[None, :, 0::2] + up[:, None, 1::2] * qp[None, :, 1::2]  # [N, O, K/2]
    acc = np.clip(pairs, -32768, 32767).sum(-1) - 128.0 * q.sum(-1)
    want = acc / (127.0 / np.abs(x).max(-1, keepdims=True)) / 127.0  # both scales: activation rows, weights
    np.testing.assert_allclose(u8s8_sat16_linear(x, w, 0.0), want, rtol=1e-12, atol=1e-12)


def test_activation_schemes_are_checked():
    with pytest.raises(MinibloomError, match="activations"):
        activation_primitives("int7-per-row")
    with pytest.raises(MinibloomError, match="group"):
        quantize_activations(np.ones((2, 4)), "int8-per-group")
    x = np.random.default_rng(3).standard_normal((3, 8))
    got = quantize_activations(x, "int8-per-group", group=4)
    np.testing.assert_allclose(got[:, 4:], quantize_activations(x[:, 4:], "int8-per-row"))
    with pytest.raises(MinibloomError, match="per-row int8"):
        u8s8_sat16_linear(x, x * 1.001 + 0.3, 0.0)


# ---- ONNX ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_models(source, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("torch")
    from minibloom.engines import onnx_export, onnx_quantize_dynamic

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    d = tmp_path_factory.mktemp("onnx")
    fp32 = onnx_export(source[0], str(d / "fp32.onnx"), hidden_states=False)
    out = {"fp32": fp32, "dyn": onnx_quantize_dynamic(fp32, str(d / "dyn.onnx")),
           "dyn_pc": onnx_quantize_dynamic(fp32, str(d / "dyn_pc.onnx"), per_channel=True)}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input_ids": source[3], "attention_mask": source[4]}])

        def get_next(self):
            return next(self.batches, None)

    for fmt, name in ((QuantFormat.QDQ, "static_qdq"), (QuantFormat.QOperator, "static_qop")):
        out[name] = str(d / f"{name}.onnx")
        quantize_static(fp32, out[name], Reader(), quant_format=fmt, op_types_to_quantize=["MatMul", "Gather"],
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return out


@pytest.mark.parametrize("form", ["static_qdq", "static_qop"])
def test_onnx_quantize_static_reader(source, onnx_models, form):
    """quantize_static, QDQ (DequantizeLinear of the int8 weights) and QOperator (QLinearMatMul): every matrix
    named, [out, in], within half a quantization step of the source; fixed activation scales -> "static"."""
    from minibloom.oracle.read_onnx import read

    src = source[2]
    ew = read(onnx_models[form])
    assert ew.activations == "static" and ew.notes
    assert {f"h.{i}.{m}.weight" for i in range(CFG.n_layer) for m in LINEARS} <= set(ew.matrices)
    for name, w in ew.matrices.items():
        ref = src["word_embeddings.weight" if name == "lm_head.weight" else name]
        step = np.max(np.abs(ref)) / 127.0
        assert w.shape == ref.shape and np.all(np.abs(w - ref) <= step * 0.505 + 1e-7), name


@pytest.mark.parametrize("form", ["dyn", "dyn_pc"])
def test_onnx_quantize_dynamic_reader(source, onnx_models, form):
    import onnx
    from onnx import numpy_helper

    from minibloom.oracle.read_onnx import read

    _, model, src, ids, mask = source
    ew = read(onnx_models[form])
    assert ew.activations == "uint8-per-tensor"
    want = {f"h.{i}.{m}.weight" for i in range(CFG.n_layer) for m in LINEARS} | {"word_embeddings.weight",
                                                                                   "lm_head.weight"}
    assert set(ew.matrices) == want
    g = onnx.load(onnx_models[form]).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    node = next(n for n in g.node if n.op_type == "MatMulInteger" and "h.1/mlp/dense_4h_to_h" in n.name)
    b, bzp = inits[node.input[1]].astype(np.float64), inits[node.input[3]].astype(np.float64)
    scale = inits[node.input[1].replace("_quantized", "_scale")].astype(np.float64)
    np.testing.assert_allclose(ew.matrices["h.1.mlp.dense_4h_to_h.weight"], ((b - bzp) * scale).T, rtol=1e-12)
    for name, w in ew.matrices.items():  # each within half a quantization step of the source tensor
        ref = src["word_embeddings.weight" if name == "lm_head.weight" else name]
        per_row = form == "dyn_pc" and name != "word_embeddings.weight"  # per column of MatMul's [in, out]
        step = np.max(np.abs(ref), axis=1, keepdims=True) / 127.0 if per_row else np.max(np.abs(ref)) / 127.0
        assert w.shape == ref.shape and np.all(np.abs(w - ref) <= step * 0.505 + 1e-7), name


def test_onnx_dynamic_int8_matches_the_emulation(source, onnx_models):
    from minibloom.engines import onnx_trace
    from minibloom.oracle.read_onnx import read

    _, model, _, ids, mask = source
    ew = read(onnx_models["dyn"])
    cand = onnx_trace(onnx_models["dyn"], ids, mask)["logits"]
    params = _same_weights(model, ew.matrices)
    emulated = M.forward(params, ids, mask, model.config, primitives=activation_primitives(ew.activations))
    plain = M.forward(params, ids, mask, model.config)
    assert _exact_share(cand, plain, mask) == 0.0
    assert _exact_share(cand, emulated, mask) >= 0.9


def _one_node(node, inits: dict, in_shape, out_shape, domain_opset=("com.microsoft", 1)):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(*domain_opset)])


@pytest.mark.parametrize("with_zp", [False, True])
def test_onnx_matmul_nbits_reader_is_what_onnxruntime_multiplies(tmp_path, with_zp):
    """A one-node MatMulNBits graph: ORT's product with the identity (A = I_K) is the dequantized weight, W^T."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from minibloom.oracle.read_onnx import read

    K, N, block = 64, 6, 16
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, (N, K // block, block)).astype(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # low nibble first
    scales = rng.uniform(0.01, 0.1, (N * K // block,)).astype(np.float32)
    inits = {"B": packed, "scales": scales}
    inputs = ["A", "B", "scales"]
    if with_zp:
        zps = rng.integers(0, 16, (N, K // block)).astype(np.uint8)
        inits["zp"] = (zps[:, 0::2] | (zps[:, 1::2] << 4)).reshape(-1).astype(np.uint8)
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], "/transformer/h.0/mlp/dense_h_to_4h/MatMul_Q4",
                            domain="com.microsoft", K=K, N=N, bits=4, block_size=block)
    model = _one_node(node, inits, [K, K], [K, N])
    path = str(tmp_path / "nbits.onnx")
    onnx.save(model, path)
    ew = read(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"A": np.eye(K, dtype=np.float32)})[0]
    np.testing.assert_allclose(ew.matrices["h.0.mlp.dense_h_to_4h.weight"], y.T, rtol=1e-6, atol=1e-7)
    assert ew.activations is None


def test_onnx_blocked_dequantize_linear_is_what_onnxruntime_computes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from minibloom.oracle.read_onnx import read

    K, N, block = 32, 5, 8
    rng = np.random.default_rng(5)
    q = rng.integers(-8, 8, (K, N)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, (K // block, N)).astype(np.float32)
    z = rng.integers(-2, 3, (K // block, N)).astype(np.int8)
    dq = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["W"], "/lm_head/DequantizeLinear", axis=0,
                          block_size=block)
    mm = helper.make_node("MatMul", ["A", "W"], ["Y"], "/lm_head/MatMul")
    from onnx import TensorProto, numpy_helper

    graph = helper.make_graph([dq, mm], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [K, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [K, N])],
                              [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s"),
                               numpy_helper.from_array(z, "z")])
    path = str(tmp_path / "qdq.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    ew = read(path)
    y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"A": np.eye(K, dtype=np.float32)})
    np.testing.assert_allclose(ew.matrices["lm_head.weight"], y[0].T, rtol=1e-6, atol=1e-8)


def test_onnx_damaged_file_is_an_error(tmp_path):
    pytest.importorskip("onnx")
    from minibloom.oracle.read_onnx import read

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(MinibloomError, match="bad.onnx"):
        read(str(bad))
    with pytest.raises(MinibloomError, match="no such"):
        read(str(tmp_path / "missing.onnx"))


def test_ct2_float_models(source, tmp_path):
    """float32: nothing quantized, nothing returned; float16: every tensor, rounded to float16 (what it multiplies)."""
    pytest.importorskip("ctranslate2")
    from minibloom.engines import ctranslate2_convert
    from minibloom.oracle.read_ct2 import read

    src = source[2]
    f32 = read(ctranslate2_convert(source[0], str(tmp_path / "f32"), "float32"))
    assert f32.matrices == {} and f32.activations is None and f32.notes
    f16 = read(ctranslate2_convert(source[0], str(tmp_path / "f16"), "float16"))
    name = "h.0.self_attention.query_key_value.weight"
    np.testing.assert_array_equal(f16.matrices[name], src[name].astype(np.float16).astype(np.float64))
    assert f16.activations is None


def test_onnx_matmul_nbits_bad_attributes_are_an_error(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from minibloom.oracle.read_onnx import read

    inits = {"B": np.zeros((4, 2, 8), np.uint8), "scales": np.ones(8, np.float32)}
    for attrs in ({"K": 32, "N": 4, "bits": 4, "block_size": 12}, {"K": 32, "N": 5, "bits": 4, "block_size": 16},
                  {"K": 2**40, "N": 2**40, "bits": 4, "block_size": 16}):
        node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], "mm", domain="com.microsoft", **attrs)
        path = str(tmp_path / "bad.onnx")
        onnx.save(_one_node(node, inits, [1, 32], [1, 4]), path)
        with pytest.raises(MinibloomError, match="MatMulNBits"):
            read(path)
