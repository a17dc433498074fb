"""OpenVINO (with NNCF weight compression) as a port under test: convert a BLOOM checkpoint to an OpenVINO IR and
run it on the CPU plugin, returning the run as a minibloom trace (the dict format of ``minibloom.trace``).

Follows OpenVINO's and NNCF's own documented APIs (``docs.openvino.ai``, "Convert a PyTorch model" and "Weight
compression"), never a re-implementation: ``openvino.convert_model`` traces transformers' ``BloomForCausalLM``
(eager attention, float32) with ``input_ids`` and ``attention_mask`` as inputs and ``logits`` as the output;
``nncf.compress_weights`` stores the weights as int8 / int4 (sym: i8 / i4 and a scale; asym: u8 / u4, a zero point
and a scale; int4 per group of ``group_size`` input columns); ``openvino.save_model(..., compress_to_fp16=False)``
writes the ``.xml`` / ``.bin`` pair. ``minibloom.oracle.read_openvino.read`` reads the weights back (without
OpenVINO) for the same-weights reference.

Kinds (``meta["dtype"]``): ``float32`` for a float IR; ``int8-weight-only`` / ``int4-weight-only`` for compressed
weights run with the CPU plugin's dynamic quantization off (weights decompressed to float32, float32 products);
``int8-activations`` with it on.

The CPU plugin's dynamic quantization (``DYNAMIC_QUANTIZATION_GROUP_SIZE``, on by default for compressed weights on
CPUs with AVX2-VNNI or AVX512-VNNI, group 32 by default): the float32 input of each fully-connected layer with
compressed weights is quantized per token, per group of ``group`` consecutive input columns, to symmetric int8
without a zero point: ``scale = max|x_group| / 127`` (float32), ``q = round_half_even(x * (1 / scale))``
saturated to [-128, 127]; the weights' integers (i8 / i4 shifted to u8 / u4 with a zero point of 128 / 8) are
multiplied by ``q`` in int32 and the sums scaled by the activation and weight scales. Source: OpenVINO's CPU plugin,
``src/plugins/intel_cpu/src/nodes/kernels/x64/jit_brgemm_src_quantization_kernel.cpp`` (the kernel: max of
``|x|``, divide by 127, ``vcvtps2dq``, ``vpmovsdb``) and ``nodes/executors/dnnl/dnnl_fullyconnected_primitive.cpp``
(``useDynamicQuantizationImpl``: VNNI CPUs, float32 input, u8 / u4 weights or i8 / i4 without a zero point, group a
multiple of 16). ``EngineWeights.activations`` names this scheme ``int8-per-group``.
"""

from __future__ import annotations

import json
import os
import platform
import warnings

import numpy as np

from ..backend import cpu_flags
from ..errors import MinibloomError
from .engines import _checkpoint_dir, _import, _inputs, _meta
from .engines import _read_note as _read_engine_note
from .read_openvino import _Graph

OPENVINO_WEIGHTS = ("float32", "int8_sym", "int8_asym", "int4_sym", "int4_asym")
NOTE_SUFFIX = ".minibloom_engine.json"  # written next to the .xml: the source and how it was compressed


def _note_path(xml: str) -> str:
    return os.path.splitext(xml)[0] + NOTE_SUFFIX


def _read_note(xml: str) -> dict:
    return _read_engine_note("", _note_path(xml))


def _torch_model(src: str):
    """transformers' BloomForCausalLM in float32 with eager attention, wrapped to return the logits alone."""
    from .hf import _import_hf

    torch, transformers = _import_hf()
    model = transformers.BloomForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    model = model.eval()

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              return_dict=True).logits

    return torch, Logits(model), model.config.vocab_size


def _check_settings(weights: str, group_size, all_layers: bool) -> None:
    if weights not in OPENVINO_WEIGHTS:
        raise MinibloomError(f"weights: {weights!r} is not one of {', '.join(OPENVINO_WEIGHTS)}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise MinibloomError(f"group_size: expected a positive integer, got {group_size!r}")
    if not weights.startswith("int4") and (group_size is not None or all_layers):
        raise MinibloomError(f"group_size / all_layers apply to int4 weights only, not {weights!r} (NNCF's int8 "
                             "weights have one scale per output channel)")


def _xml_path(path, what: str) -> str:
    path = os.fspath(path)
    if not path.endswith(".xml"):
        raise MinibloomError(f"{what}: {path!r} must end in .xml (OpenVINO writes the .bin beside it)")
    return path


def _save(ov, ov_model, out_xml: str, note: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out_xml)), exist_ok=True)
    ov.save_model(ov_model, out_xml, compress_to_fp16=False)
    with open(_note_path(out_xml), "w") as f:
        json.dump(note, f, indent=2)
    return out_xml


def openvino_compress(xml, out_xml, weights: str, *, group_size: int | None = None,
                      all_layers: bool = False) -> str:
    """``nncf.compress_weights`` of a float IR (one ``openvino_convert`` wrote) into ``out_xml``; returns it.

    ``weights``: an NNCF mode ("int8_sym", "int8_asym", "int4_sym", "int4_asym"), ratio 1.0. ``group_size``: int4
    only (NNCF's default 128). ``all_layers``: int4 only; False keeps NNCF's default (the embedding and the last
    linear layer in its backup mode, int8_asym), True compresses them to int4 too. The note beside ``out_xml``
    records the source and these settings.
    """
    ov = _import("openvino")
    nncf = _import("nncf")
    xml, out_xml = _xml_path(xml, "xml"), _xml_path(out_xml, "out_xml")
    _check_settings(weights, group_size, all_layers)
    if weights == "float32":
        raise MinibloomError("weights: openvino_compress needs an NNCF mode (int8_sym, int8_asym, int4_sym, "
                             "int4_asym)")
    if not os.path.isfile(xml):
        raise MinibloomError(f"{xml}: no such OpenVINO IR .xml file")
    source = _read_note(xml)
    if source.get("weights", "float32") != "float32":
        raise MinibloomError(f"{xml}: already compressed ({source['weights']}); compress a float32 IR")
    kw = {}
    if weights.startswith("int4"):
        group_size = 128 if group_size is None else group_size
        kw = dict(ratio=1.0, group_size=group_size, all_layers=all_layers)
    try:
        model = nncf.compress_weights(ov.Core().read_model(xml), mode=getattr(nncf.CompressWeightsMode,
                                                                             weights.upper()), **kw)
    except nncf.InvalidGroupSizeError as e:
        raise MinibloomError(f"group_size: {group_size} does not fit this model's layers ({e})") from None
    note = dict(engine="openvino", version=ov.get_version(), nncf=nncf.__version__,
                source=source.get("source", os.path.abspath(xml)), weights=weights, group_size=group_size,
                all_layers=all_layers)
    return _save(ov, model, out_xml, note)


def openvino_convert(checkpoint_dir, out_xml, weights: str = "float32", *, group_size: int | None = None,
                     all_layers: bool = False) -> str:
    """Convert a BLOOM checkpoint directory to an OpenVINO IR with ``openvino.convert_model``; returns ``out_xml``.

    ``weights``: "float32" (as converted), or an NNCF mode ("int8_sym", "int8_asym", "int4_sym", "int4_asym"):
    the float IR is then compressed by ``openvino_compress`` (``group_size``, ``all_layers``: int4 only). Writes
    ``<name>.minibloom_engine.json`` (source, weights, group size) beside the ``.xml`` for ``openvino_trace``.
    """
    ov = _import("openvino")
    src = _checkpoint_dir(checkpoint_dir)
    out_xml = _xml_path(out_xml, "out_xml")
    _check_settings(weights, group_size, all_layers)
    torch, wrapped, vocab = _torch_model(src)
    ids = torch.arange(12, dtype=torch.int64).reshape(2, 6) % vocab
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row: the mask's path is in the traced graph
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(wrapped, example_input={"input_ids": ids, "attention_mask": mask},
                                    input=[("input_ids", [-1, -1], ov.Type.i64),
                                           ("attention_mask", [-1, -1], ov.Type.i64)])
    del wrapped
    if len(ov_model.outputs) != 1:
        raise MinibloomError(f"{src}: openvino.convert_model gave {len(ov_model.outputs)} outputs, expected the logits")
    ov_model.outputs[0].get_tensor().set_names({"logits"})
    note = dict(engine="openvino", version=ov.get_version(), nncf=None, source=os.path.abspath(src),
                weights="float32", group_size=None, all_layers=False)
    if weights == "float32":
        return _save(ov, ov_model, out_xml, note)
    float_xml = os.path.splitext(out_xml)[0] + ".float32.xml"
    _save(ov, ov_model, float_xml, note)
    try:
        return openvino_compress(float_xml, out_xml, weights, group_size=group_size, all_layers=all_layers)
    finally:
        for path in (float_xml, os.path.splitext(float_xml)[0] + ".bin", _note_path(float_xml)):
            if os.path.isfile(path):
                os.remove(path)


def _weight_bits(xml: str) -> int | None:
    """The narrowest integer element type of the IR's Const layers that feed a Convert (a decompression): 4, 8, or
    None for a float IR. Read from the .xml alone."""
    g = _Graph(xml)
    bits = None
    for lid, layer in g.layers.items():
        if layer.get("type") != "Const":
            continue
        etype = g.data(lid).get("element_type")
        feeds_convert = any(g.layers[c].get("type") == "Convert" for c, _ in g.consumers.get(lid, []))
        if feeds_convert and etype in ("u4", "i4", "u8", "i8"):
            b = 4 if etype in ("u4", "i4") else 8
            bits = b if bits is None else min(bits, b)
    return bits


def openvino_kind(xml, dynamic_quantization: bool = False) -> str:
    """The kind of a run of ``xml`` on the CPU plugin: ``float32`` for a float IR; ``int8-weight-only`` /
    ``int4-weight-only`` (the narrowest weights) with dynamic quantization off; ``int8-activations`` with it on."""
    note = _read_note(os.fspath(xml))
    weights = note.get("weights")
    bits = {"float32": None, "int8_sym": 8, "int8_asym": 8, "int4_sym": 4, "int4_asym": 4}.get(weights, 0)
    if bits == 0:
        bits = _weight_bits(os.fspath(xml))
    if bits is None:
        return "float32"
    return "int8-activations" if dynamic_quantization else f"int{bits}-weight-only"


def _vnni() -> bool | None:
    """Whether this x86-64 CPU has AVX512-VNNI or AVX-VNNI (the plugin's condition for dynamic quantization), from
    /proc/cpuinfo; None where that cannot be read (not Linux, not x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.isfile("/proc/cpuinfo"):
        return None
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def openvino_trace(xml, input_ids, attention_mask=None, *, dynamic_quantization: bool = False,
                   threads: int = 0) -> dict:
    """A logits trace of OpenVINO's CPU plugin on an IR written by ``openvino_convert`` (inputs ``input_ids``,
    ``attention_mask``; the first output is the logits).

    Compiled with ``INFERENCE_PRECISION_HINT=f32`` and ``KV_CACHE_PRECISION=f32`` (the plugin's defaults on this
    class of CPU are bf16 and u8), and ``DYNAMIC_QUANTIZATION_GROUP_SIZE=0`` (weight-only: compressed weights
    decompressed to float32) unless ``dynamic_quantization``: then the plugin's default group applies, recorded in
    ``meta["dynamic_quantization_group_size"]`` — symmetric int8 per token and per group of that many input columns,
    ``scale = max|x| / 127``, round half to even (see this module's docstring for the source; that is the x86-64
    path). On an x86-64 CPU without VNNI the plugin does not quantize activations, and the kind stays weight-only
    (``meta["dynamic_quantization_applied"]``). The mask goes in as an
    input; logits at padded positions are set to zero. ``threads``: the plugin's ``INFERENCE_NUM_THREADS`` (0 = its
    default).
    """
    ov = _import("openvino")
    xml = os.fspath(xml)
    if not os.path.isfile(xml):
        raise MinibloomError(f"{xml}: no such OpenVINO IR .xml file")
    ids, mask = _inputs(input_ids, attention_mask)
    config = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    if not dynamic_quantization:
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = "0"
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    core = ov.Core()
    try:
        compiled = core.compile_model(xml, "CPU", config)
    except RuntimeError as e:
        raise MinibloomError(f"{xml}: OpenVINO could not compile the model ({str(e).splitlines()[0]})") from None
    names = {n for i in compiled.inputs for n in i.get_names()}
    if not {"input_ids", "attention_mask"} <= names:
        raise MinibloomError(f"{xml}: expected inputs input_ids and attention_mask (convert with "
                             "minibloom.engines.openvino_convert), got {sorted(names)}")
    group = int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE"))
    result = compiled({"input_ids": ids, "attention_mask": mask})
    logits = np.array(result[compiled.outputs[0]], np.float32)
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise MinibloomError(f"{xml}: the model returned shape {logits.shape}, expected [batch, seq, vocab]")
    logits[mask == 0] = 0.0
    applied = dynamic_quantization and group > 0 and _vnni() is not False  # else the plugin keeps float inputs
    kind = openvino_kind(xml, applied)
    note = _read_note(xml)
    impl = (f"openvino {ov.get_version()} (CPU plugin, f32 inference, dynamic quantization "
            f"{'group ' + str(group) if group else 'off'})")
    return {"input_ids": ids, "attention_mask": mask, "hidden_states": None, "logits": logits, "attentions": None,
            "meta": _meta(kind, impl, xml, engine="openvino", weights=note.get("weights"),
                          group_size=note.get("group_size"), dynamic_quantization_group_size=group,
                          dynamic_quantization_applied=bool(applied))}
