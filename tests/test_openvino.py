"""OpenVINO + NNCF as a port under test (``minibloom.engines.openvino_*``) and the IR reader
(``minibloom.oracle.read_openvino``) that gives its same-weights reference.

Two random checkpoints (8 and 12 heads, every parameter random) and the trained ``weights/default`` are converted
with ``openvino.convert_model`` and compressed by NNCF (int8 sym / asym, int4 sym group 32 / 64, int4 asym group 128,
where the group divides the layers). Checked: (a) the reader's float64 matrices equal what OpenVINO's CPU plugin
itself computes from the decompression subgraphs (a model whose outputs are the weights); (b) the weight-only runs
pass the float32 policy against minibloom float64 on the reader's weights (the same-weights reference), left-padded;
(c) planted bugs in the converted model fail it. The dynamic-quantization run is measured against the same-weights
reference with and without an emulation of its activation quantization (figures in "measured figures").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest

import factory
import minibloom
from minibloom import engines
from minibloom import model as M
from minibloom.errors import MinibloomError
from minibloom.formats.loading import default_model_path
from minibloom.oracle import engines_openvino
from minibloom.oracle.read_openvino import read
from minibloom.testing import check_logits, logit_metrics

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("torch")
pytest.importorskip("transformers")

RANDOM = {"random-h8": dict(seed=8, n_head=8, hidden=64, n_layer=3, vocab=256),
          "random-h12": dict(seed=12, n_head=12, hidden=96, n_layer=3, vocab=256)}
CHECKPOINTS = (*RANDOM, "default")
# (NNCF mode, int4 group, all_layers): all_layers puts the embedding / head in int4 too (else NNCF's int8_asym backup)
CONFIGS = [("float32", None, False), ("int8_sym", None, False), ("int8_asym", None, False),
           ("int4_sym", 32, True), ("int4_sym", 64, False), ("int4_asym", 128, False)]
PAD_ID = 3


def _label(weights, group, all_layers) -> str:
    return weights + ("" if group is None else f"-g{group}") + ("-all" if all_layers else "")


def _fits(hidden: int, group: int | None) -> bool:
    return group is None or hidden % group == 0


# ---- the same-weights reference ------------------------------------------------------------------------------
def same_weights(model: minibloom.Bloom, matrices: dict[str, np.ndarray]) -> minibloom.Bloom:
    """``model`` (float64) with the engine's dequantized matrices in place of its own; anything else (biases,
    LayerNorms, float32-kept matrices) stays the model's. A matrix the reader could not name is an error here."""
    params = copy.deepcopy(model.params)
    for name, w in matrices.items():
        parts = name.split(".")
        if parts[0] == "h":
            node = params["h"][int(parts[1])]
            for key in parts[2:-1]:
                node = node[key]
        elif name == "lm_head.weight":
            node = params.setdefault("lm_head", {})
        elif name == "word_embeddings.weight":
            node = params["word_embeddings"]
        else:
            raise AssertionError(f"reader left {name!r} unnamed")
        assert node.get("weight") is None or node["weight"].shape == w.shape, name
        node["weight"] = np.asarray(w, np.float64)
    if "lm_head" not in params and "word_embeddings.weight" in matrices:
        params["lm_head"] = {"weight": model.params["word_embeddings"]["weight"]}  # the head left in float32
    return minibloom.Bloom(model.config, params, "float64", model.backend)


def quantize_activations(x, group: int) -> np.ndarray:
    """OpenVINO's CPU dynamic quantization of a fully-connected input, dequantized in float64: per token and per
    ``group`` consecutive input columns, symmetric int8, scale = max|x| / 127 in float32, x * (1 / scale) in
    float32 rounded half to even, saturated to [-128, 127]."""
    x = np.asarray(x)
    lead, k = x.shape[:-1], x.shape[-1]
    g = min(group, k)
    assert k % g == 0
    xg = x.astype(np.float32).reshape(*lead, k // g, g)
    scale = (np.max(np.abs(xg), axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = (np.float32(1) / np.where(scale == 0, np.float32(1), scale)).astype(np.float32)
    q = np.clip(np.rint((xg * inv).astype(np.float32)), -128, 127)
    return (q.astype(np.float64) * scale.astype(np.float64)).reshape(x.shape)


def emulate_dynamic_quantization(group: int):
    """minibloom's reference primitives with each fully-connected input (QKV, dense, both MLP products, the head)
    passed through ``quantize_activations`` first."""
    ref = M.REFERENCE
    return dataclasses.replace(
        ref, name=f"openvino-dq{group}",
        linear=lambda x, w, b, tp=1: ref.linear(quantize_activations(x, group), w, b, tp),
        linear_gelu=lambda x, w, b: ref.linear_gelu(quantize_activations(x, group), w, b),
        head=lambda x, w: ref.head(quantize_activations(x, group), w))


# ---- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    out = {name: factory.save(factory.make_model(**kw), tmp_path_factory.mktemp(name)) for name, kw in RANDOM.items()}
    default = default_model_path()
    if os.path.isfile(os.path.join(default, "model.safetensors")):
        out["default"] = default
    return out


@pytest.fixture(scope="module")
def irs(checkpoints, tmp_path_factory) -> dict[tuple[str, str], str]:
    """(checkpoint, config label) -> IR .xml: one conversion per checkpoint, NNCF compressions of it."""
    root = tmp_path_factory.mktemp("openvino")
    out = {}
    for name, d in checkpoints.items():
        f32 = engines.openvino_convert(d, root / name / "float32.xml")
        hidden = minibloom.BloomConfig.from_json(os.path.join(d, "config.json")).hidden_size
        f16 = str(root / name / "float16-ir.xml")
        ov.save_model(ov.Core().read_model(f32), f16, compress_to_fp16=True)
        out[name, "float16-ir"] = f16
        for weights, group, all_layers in CONFIGS:
            label = _label(weights, group, all_layers)
            if weights == "float32":
                out[name, label] = f32
            elif _fits(hidden, group):
                out[name, label] = engines.openvino_compress(f32, root / name / f"{label}.xml", weights,
                                                             group_size=group, all_layers=all_layers)
    return out


def _checkpoint(checkpoints, name):
    if name not in checkpoints:
        pytest.skip("weights/default not trained yet")
    return checkpoints[name]


def _ir(irs, checkpoints, name, config):
    _checkpoint(checkpoints, name)
    if (name, _label(*config)) not in irs:
        pytest.skip(f"group {config[1]} does not divide {name}'s hidden size")
    return irs[name, _label(*config)]


@pytest.fixture(scope="module")
def inputs(checkpoints) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per checkpoint: a left-padded batch of three rows (lengths 14, 9, 4) of random ids."""
    out = {}
    for name, d in checkpoints.items():
        vocab = minibloom.BloomConfig.from_json(os.path.join(d, "config.json")).vocab_size
        rows = [np.random.default_rng(n).integers(4, vocab, n) for n in (14, 9, 4)]
        out[name] = factory.left_pad(rows, PAD_ID)
    return out


@pytest.fixture(scope="module")
def references(checkpoints) -> dict[str, minibloom.Bloom]:
    return {name: minibloom.load(d, dtype="float64") for name, d in checkpoints.items()}


def _size(model: minibloom.Bloom) -> tuple[int, int]:
    return model.config.n_layer, model.config.hidden_size


# ---- (a) the reader against OpenVINO itself ------------------------------------------------------------------
def _bloom_name(consumer: str, kind: str) -> str | None:
    """The test's own reading of a consumer's name (independent of the reader's)."""
    for part in ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
        m = re.search(rf"\.h\.(\d+)\.{re.escape(part)}/", consumer)
        if m:
            return f"h.{m.group(1)}.{part}.weight"
    if kind == "MatMul" and ".lm_head/" in consumer:
        return "lm_head.weight"
    if kind == "Gather" and ".word_embeddings/" in consumer:
        return "word_embeddings.weight"
    return None


def openvino_weights(xml: str) -> dict[str, np.ndarray]:
    """What OpenVINO's CPU plugin computes for every decompressed weight feeding a MatMul / Gather: a model whose
    outputs are those weights, compiled and run; [out, in] by the MatMul's transpose_b."""
    model = ov.Core().read_model(xml)
    wanted = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind not in ("MatMul", "Gather"):
            continue
        src = op.input_value(0 if kind == "Gather" else 1)
        if src.get_node().get_type_name() != "Convert":  # a plain float32 Const or an activation
            continue
        name = _bloom_name(op.get_friendly_name(), kind)
        transposed = kind == "Gather" or op.get_attributes()["transpose_b"]
        wanted.append((name, transposed, src))
    sub = ov.Model([ov.opset13.result(src) for _, _, src in wanted], [], "weights")
    out = ov.Core().compile_model(sub, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({})
    return {name: np.asarray(out[i], np.float64) if t else np.asarray(out[i], np.float64).T
            for i, (name, t, _) in enumerate(wanted)}


@pytest.mark.parametrize("config", CONFIGS[1:] + [("float16-ir", None, False)], ids=lambda c: _label(*c))
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_reader_equals_openvino_decompression(name, config, irs, checkpoints, references):
    """Compressed IRs, and a float IR saved with float16 weights (``compress_to_fp16=True``: f16 Const -> Convert)."""
    xml = _ir(irs, checkpoints, name, config)
    got = read(xml)
    want = openvino_weights(xml)
    cfg = references[name].config
    expected = {f"h.{i}.{p}.weight" for i in range(cfg.n_layer) for p in
                ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")}
    expected |= {"word_embeddings.weight", "lm_head.weight"}
    assert set(got.matrices) == set(want) == expected
    for key, w in want.items():
        assert got.matrices[key].dtype == np.float64
        np.testing.assert_array_equal(got.matrices[key], w, err_msg=key)
    # the quantization is real: the matrices are not the checkpoint's weights (weights/default is stored float16)
    params = references[name].params
    stored = params["h"][0]["mlp"]["dense_h_to_4h"]["weight"]
    assert (name, config[0]) == ("default", "float16-ir") or not np.array_equal(
        got.matrices["h.0.mlp.dense_h_to_4h.weight"], stored)
    assert got.activations is None
    assert config[0] == "float16-ir" or any(config[0] in n for n in got.notes)


def test_reader_nibble_order_against_openvino_constant(tmp_path):
    """u4 / i4 are packed two per byte, the first element in the low nibble: a Constant OpenVINO writes from known
    values reads back as those values."""
    values = {"u4": np.arange(16, dtype=np.uint8)[::-1].reshape(2, 8),
              "i4": np.arange(-8, 8, dtype=np.int8).reshape(2, 8)}
    for etype, v in values.items():
        c = ov.opset13.constant(v, getattr(ov.Type, etype))
        conv = ov.opset13.convert(c, ov.Type.f32)
        x = ov.opset13.parameter([3, 8], ov.Type.f32, name="x")
        mm = ov.opset13.matmul(x, conv, False, True, name="__module.h.0.mlp.dense_h_to_4h/aten::linear/MatMul")
        path = str(tmp_path / f"{etype}.xml")
        ov.save_model(ov.Model([mm], [x]), path, compress_to_fp16=False)
        got = read(path).matrices["h.0.mlp.dense_h_to_4h.weight"]
        np.testing.assert_array_equal(got, v.astype(np.float64))


# ---- (b) weight-only runs against the same-weights reference -------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: _label(*c))
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_weight_only_passes_float32_on_same_weights(name, config, irs, checkpoints, references, inputs, record):
    xml = _ir(irs, checkpoints, name, config)
    ids, mask = inputs[name]
    tr = engines.openvino_trace(xml, ids, mask, threads=1)
    kind = {"float32": "float32", "int8_sym": "int8-weight-only", "int8_asym": "int8-weight-only"}.get(
        config[0], "int4-weight-only")
    assert tr["meta"]["dtype"] == kind
    assert np.all(tr["logits"][mask == 0] == 0)
    model = references[name]
    ref = same_weights(model, read(xml).matrices)(ids, mask)
    verdict = check_logits(tr["logits"], ref, mask, policy="float32", input_ids=ids, size=_size(model))
    label = f"{name} {_label(*config)}"
    for k in ("rel", "kl_mean", "kl_max", "top1"):
        record(f"{label} same-weights {k}", getattr(verdict, k))
    unquantized = logit_metrics(tr["logits"], model(ids, mask), mask)
    for k in ("rel", "kl_mean", "kl_max", "top1"):
        record(f"{label} vs-unquantized {k}", unquantized[k])
    assert verdict.passed, str(verdict)


def test_trace_meta_and_note(irs, checkpoints, inputs):
    xml = irs["random-h8", "int8_asym"]
    note = json.load(open(os.path.splitext(xml)[0] + ".minibloom_engine.json"))
    assert note["weights"] == "int8_asym" and note["source"] == os.path.abspath(checkpoints["random-h8"])
    ids, mask = inputs["random-h8"]
    tr = engines.openvino_trace(xml, ids, mask, dynamic_quantization=True, threads=1)
    assert tr["meta"]["quantized"]
    assert tr["meta"]["dynamic_quantization_group_size"] > 0
    off = engines.openvino_trace(xml, ids, mask, threads=1)["meta"]
    assert off["dynamic_quantization_group_size"] == 0 and off["dtype"] == "int8-weight-only"
    vnni = engines_openvino._vnni() is not False
    assert tr["meta"]["dtype"] == ("int8-activations" if vnni else "int8-weight-only")
    assert tr["meta"]["dynamic_quantization_applied"] == vnni and not off["dynamic_quantization_applied"]
    # without the note the kind comes from the IR's integer weights
    bare = str(irs["random-h8", "int4_sym-g32-all"]).replace(".xml", "-bare.xml")
    shutil.copy(irs["random-h8", "int4_sym-g32-all"], bare)
    shutil.copy(irs["random-h8", "int4_sym-g32-all"].replace(".xml", ".bin"), bare.replace(".xml", ".bin"))
    assert engines.openvino_kind(bare) == "int4-weight-only"
    assert engines.openvino_kind(irs["random-h8", "float32"]) == "float32"


# ---- (c) planted bugs fail on the same-weights path ----------------------------------------------------------
def _bug_checkpoint(src: str, dst, edit) -> str:
    model = minibloom.load(src, dtype="float32")
    shutil.copytree(src, dst)
    edit(dst, model)
    return str(dst)


def _zero_dense_bias(dst, model):
    from minibloom.formats.weights import write_checkpoint

    params = copy.deepcopy(model.params)
    params["h"][1]["self_attention"]["dense"]["bias"] = np.zeros_like(params["h"][1]["self_attention"]["dense"]["bias"])
    write_checkpoint(dst, model.config, params)


def _epsilon(dst, model):
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    cfg["layer_norm_epsilon"] = 1e-2
    json.dump(cfg, open(path, "w"))


BUGS = {"dense-bias-dropped": ("int4_sym", 32, _zero_dense_bias), "layer-norm-epsilon": ("int8_asym", None, _epsilon),
        "alibi-scaled": ("int8_sym", None, None)}


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bug_fails_same_weights(bug, checkpoints, references, inputs, tmp_path, monkeypatch, record):
    weights, group, edit = BUGS[bug]
    src = checkpoints["random-h8"]
    if edit is None:  # ALiBi slopes also multiplied by 1/sqrt(head_dim), in transformers before conversion
        from transformers.models.bloom import modeling_bloom as mb

        original = mb._get_alibi_slopes
        head_dim = references["random-h8"].config.hidden_size // references["random-h8"].config.n_head
        monkeypatch.setattr(mb, "_get_alibi_slopes", lambda n, device: original(n, device) / head_dim ** 0.5)
    else:
        src = _bug_checkpoint(src, tmp_path / "ckpt", edit)
    xml = engines.openvino_convert(src, tmp_path / "bug.xml", weights, group_size=group)
    ids, mask = inputs["random-h8"]
    tr = engines.openvino_trace(xml, ids, mask, threads=1)
    model = references["random-h8"]
    ref = same_weights(model, read(xml).matrices)(ids, mask)
    verdict = check_logits(tr["logits"], ref, mask, policy="float32", input_ids=ids, size=_size(model))
    record(f"bug {bug} ({weights}) same-weights rel", verdict.rel)
    assert not verdict.passed, str(verdict)


# ---- dynamic quantization: measured against the same-weights reference, raw and emulated ---------------------
DQ_CONFIGS = [("int8_asym", None, False), ("int4_sym", 32, True)]


def _products(xml: str, ids, mask, group: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(consumer name, input, output) of every MatMul with decompressed weights, from one run of the CPU plugin
    with those tensors added as outputs (dynamic quantization group ``group``)."""
    model = ov.Core().read_model(xml)
    mms = [op for op in model.get_ops() if op.get_type_name() == "MatMul"
           and op.input_value(1).get_node().get_type_name() == "Convert"]
    results = [ov.opset13.result(t) for op in mms for t in (op.input_value(0), op.output(0))]
    model.add_results(results)
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "DYNAMIC_QUANTIZATION_GROUP_SIZE": str(group)})
    out = compiled({"input_ids": ids, "attention_mask": mask})
    n = len(model.outputs) - len(results)
    return [(op.get_friendly_name(), out[compiled.outputs[n + 2 * i]], out[compiled.outputs[n + 2 * i + 1]])
            for i, op in enumerate(mms)]


@pytest.mark.parametrize("config", DQ_CONFIGS, ids=lambda c: _label(*c))
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_dynamic_quantization_scheme(name, config, irs, checkpoints, references, inputs, record):
    """Each product the plugin runs with dynamic quantization equals, to float32 rounding, the emulation
    (``quantize_activations`` of its own input, times the reader's weights), and not the plain product: the scheme
    in ``openvino_trace``'s docstring is the one that runs. End to end, the float64 reference's inputs differ from the
    engine's by float32 rounding, which now and then moves an activation across a rounding boundary of its int8
    grid; the end-to-end figures (same weights, with and without the emulation) are recorded."""
    xml = _ir(irs, checkpoints, name, config)
    ids, mask = inputs[name]
    tr = engines.openvino_trace(xml, ids, mask, dynamic_quantization=True, threads=1)
    group = tr["meta"]["dynamic_quantization_group_size"]
    assert group > 0
    if not tr["meta"]["dynamic_quantization_applied"]:
        pytest.skip("x86-64 CPU without VNNI: the plugin does not quantize activations")
    matrices = read(xml).matrices
    for consumer, x, y in _products(xml, ids, mask, group):
        key = next(k for k in matrices if k.split(".weight")[0] in consumer) if ".lm_head/" not in consumer \
            else "lm_head.weight"
        x2, y2 = x.reshape(-1, x.shape[-1]).astype(np.float64), y.reshape(-1, y.shape[-1]).astype(np.float64)
        emulated = quantize_activations(x2, group) @ matrices[key].T
        plain = x2 @ matrices[key].T
        scale = np.abs(emulated).max()
        assert np.abs(y2 - emulated).max() / scale < 1e-5, consumer
        assert np.abs(y2 - plain).max() / scale > 1e-4, consumer  # the check can tell the two apart
    model = same_weights(references[name], matrices)
    plain = logit_metrics(tr["logits"], model(ids, mask), mask)
    emulated = logit_metrics(tr["logits"], model.forward(ids, mask, primitives=emulate_dynamic_quantization(group))
                             .logits, mask)
    unquantized = logit_metrics(tr["logits"], references[name](ids, mask), mask)
    label = f"{name} {_label(*config)} dq{group}"
    for k in ("rel", "kl_mean", "kl_max", "top1"):
        record(f"{label} same-weights {k}", plain[k])
        record(f"{label} emulated {k}", emulated[k])
        record(f"{label} vs-unquantized {k}", unquantized[k])


# ---- the reader on hostile files -----------------------------------------------------------------------------
def _copy_ir(xml: str, dst) -> str:
    out = str(dst / "m.xml")
    shutil.copy(xml, out)
    shutil.copy(xml.replace(".xml", ".bin"), out.replace(".xml", ".bin"))
    return out


def _edit_first_weight(path: str, old: str, new: str) -> None:
    text = open(path).read()
    m = re.search(r'<data element_type="u8" shape="[^"]*" offset="\d+" size="\d+"', text)
    assert m, "no u8 Const"
    open(path, "w").write(text[:m.start()] + m.group(0).replace(old, new, 1) + text[m.end():])


def test_reader_rejects_hostile_files(irs, tmp_path):
    xml = _copy_ir(irs["random-h8", "int8_asym"], tmp_path)
    good = open(xml).read()
    _edit_first_weight(xml, 'element_type="u8"', 'element_type="q7"')
    with pytest.raises(MinibloomError, match="element_type 'q7'"):
        read(xml)
    open(xml, "w").write(good)
    _edit_first_weight(xml, 'offset="', 'offset="99999999999')
    with pytest.raises(MinibloomError, match="outside"):
        read(xml)
    open(xml, "w").write(good)
    _edit_first_weight(xml, 'shape="', 'shape="3, ')
    with pytest.raises(MinibloomError, match="bytes for"):
        read(xml)
    open(xml, "w").write(good)
    bin_path = xml.replace(".xml", ".bin")
    with open(bin_path, "r+b") as f:
        f.truncate(os.path.getsize(bin_path) // 2)
    with pytest.raises(MinibloomError, match="outside"):
        read(xml)
    os.remove(bin_path)
    with pytest.raises(MinibloomError, match="missing"):
        read(xml)
    open(xml, "w").write("<net><layers>")
    with pytest.raises(MinibloomError, match="not a readable"):
        read(xml)
    with pytest.raises(MinibloomError, match="no such"):
        read(str(tmp_path / "absent.xml"))


def test_convert_rejects_bad_arguments(checkpoints, tmp_path):
    with pytest.raises(MinibloomError, match="weights"):
        engines.openvino_convert(checkpoints["random-h8"], tmp_path / "m.xml", "int3")
    with pytest.raises(MinibloomError, match="group_size"):
        engines.openvino_convert(checkpoints["random-h8"], tmp_path / "m.xml", "int8_sym", group_size=32)
    with pytest.raises(MinibloomError, match=r"\.xml"):
        engines.openvino_convert(checkpoints["random-h8"], tmp_path / "m.onnx")
    with pytest.raises(MinibloomError, match="config.json"):
        engines.openvino_convert(tmp_path, tmp_path / "m.xml")
