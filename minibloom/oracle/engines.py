"""Real inference engines as ports under test: run CTranslate2, ONNX Runtime or llama.cpp on a checkpoint and return
the run as a minibloom trace (the dict format of ``minibloom.trace``), so ``minibloom.testing`` and ``minibloom diff``
can judge it against minibloom float64.

Each adapter follows its engine's own documented API and converter, never a re-implementation of it:

- CTranslate2 (``opennmt.net/CTranslate2``): ``ctranslate2.converters.TransformersConverter`` (its ``BloomLoader``)
  writes the model; ``ctranslate2.Generator.forward_batch`` returns the full logits ``[batch, max_len, vocab]`` of
  variable-length rows (token ids or token strings; ``lengths`` only for a dense array). A trace holds logits only.
- ONNX Runtime (``onnxruntime.ai``): ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``) of
  transformers' ``BloomForCausalLM`` with ``attention_mask`` as an input and every hidden state as an output;
  ``onnxruntime.quantization.quantize_dynamic`` for int8 weights with activations quantized per call. A trace holds
  the hidden states and the logits, so ``minibloom diff`` names the first block that diverges.
- llama.cpp (``github.com/ggml-org/llama.cpp``) through llama-cpp-python's low-level ctypes API: the context's
  ``cb_eval`` callback (``ggml_backend_sched_eval_callback``, as in llama.cpp's ``examples/eval-callback``) copies the
  graph tensors that ``src/models/bloom.cpp`` names ``inp_norm-0``, ``l_out-{i}``, ``result_norm`` into the trace.

Kinds (``meta["dtype"]``, the policy name ``minibloom.testing`` judges by): what the engine actually computed in.
CTranslate2: ``float32``; ``float16`` for float16 weights (on CPU CTranslate2 has no float16 kernels and widens them
to float32, so only the weights are rounded); ``int8-dynamic`` for int8 weights with int8 compute (CPU: activations
quantized per row at run time). ONNX Runtime: ``float32``, ``float16`` (``model.half()`` before export; ORT's CPU
provider runs it), ``int8-dynamic``. llama.cpp: from the GGUF file type, ``float32-gelu-table`` for an all-F32 file
(ggml's CPU GeLU reads an fp16 table), ``float16``, ``bfloat16``, ``q8_0``, ``q4_0``, ``q4_k``, ...
The reference (see ``minibloom.testing``): minibloom float64 on the unquantized checkpoint for CTranslate2 and ONNX
Runtime (they quantize or cast themselves); minibloom float64 on the same GGUF file for llama.cpp.

Padding: CTranslate2 and llama.cpp take variable-length rows, so each row's real tokens (``attention_mask == 1``)
are run as one sequence starting at position 0, and the logits are put back in the mask's layout with zeros at the
padded positions: left, right or any padding works. ONNX Runtime gets the mask itself.

llama.cpp recipe, with llama.cpp's own converter (checked with the copy vendored in llama-cpp-python 0.3.36)::

    git clone https://github.com/ggml-org/llama.cpp
    pip install -r llama.cpp/requirements/requirements-convert_hf_to_gguf.txt
    python llama.cpp/convert_hf_to_gguf.py path/to/bloom-560m --outtype f32 --outfile /tmp/bloom-f32.gguf  # or q8_0
    CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install llama-cpp-python    # builds llama.cpp from source
    python - <<'EOF'
    import numpy as np
    from minibloom.engines import llama_cpp_trace
    from minibloom.testing import assert_logits_close
    from minibloom.trace import save_trace, trace
    ids = np.array([[59414, 8876, 4, 17], [3, 3, 59414, 8876]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    cand = llama_cpp_trace("/tmp/bloom-f32.gguf", ids, mask)            # meta dtype: float32-gelu-table
    assert_logits_close(cand["logits"], "/tmp/bloom-f32.gguf", ids, mask, kind=cand["meta"]["dtype"])
    save_trace(cand, "/tmp/llama.npz")
    save_trace(trace("/tmp/bloom-f32.gguf", ids, mask), "/tmp/ref.npz")  # minibloom float64 on the same file
    EOF
    minibloom diff /tmp/llama.npz /tmp/ref.npz                              # names the first block that diverges

The converter identifies the tokenizer by hashing how it splits a test text: BLOOM's own tokenizer is known
(pre-tokenizer "bloom"), but ``weights/default``'s BPE stops it with "BPE pre-tokenizer was not recognized"
(random test checkpoints have no tokenizer at all). For those use ``minibloom.gguf.convert_hf_to_gguf`` (same
layout, pre-tokenizer "bloom"), or force the pre-tokenizer: patch ``get_vocab_base_pre`` of the classes in
llama.cpp's ``conversion/base.py`` to return "bloom" before running the script; both files give the same logits
(weights/default, F32 and Q8_0).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import warnings

import numpy as np

from ..errors import MinibloomError
from .trace import FORMAT_VERSION

NOTE_FILE = "minibloom_engine.json"  # written next to converted models: the source and how it was quantized
CT2_QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16", "int8_bfloat16",
                     "int16")
ONNX_DTYPES = ("float32", "float16")
ONNX_KIND_KEY = "minibloom.kind"  # ONNX metadata_props key holding the model's kind
_FLOAT_KINDS = ("float64", "float32", "float16", "bfloat16", "float32-gelu-table")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# ---- shared helpers ------------------------------------------------------------------------------------------
def _inputs(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(ids [B, T] int64, mask [B, T] int64)``; every row needs at least one real token."""
    ids = np.asarray(input_ids)
    ids = ids[None, :] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.size == 0:
        raise MinibloomError(f"input_ids: expected a non-empty integer array [batch, seq], got {ids.dtype} "
                             f"{ids.shape}")
    if np.any(ids < 0):
        raise MinibloomError("input_ids: token ids must be >= 0")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int64)
    else:
        mask = np.asarray(attention_mask)
        mask = mask[None, :] if mask.ndim == 1 else mask
        if mask.shape != ids.shape or not np.all((mask == 0) | (mask == 1)):
            raise MinibloomError(f"attention_mask: expected 0/1 of shape {ids.shape}, got {mask.shape}")
    mask = mask.astype(np.int64)
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise MinibloomError(f"attention_mask: row {int(empty[0])} has no real token")
    return ids.astype(np.int64), mask


def _real_rows(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Each row's real tokens, in order: the variable-length rows an engine without a mask input runs."""
    return [row[m.astype(bool)] for row, m in zip(ids, mask)]


def _to_mask_layout(rows: list[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Per-row outputs ``[n_real_b, ...]`` -> ``[B, T, ...]`` in the mask's layout, zeros at padded positions."""
    out = np.zeros(mask.shape + rows[0].shape[1:], rows[0].dtype)
    for b, r in enumerate(rows):
        out[b, mask[b].astype(bool)] = r
    return out


def _meta(kind: str, implementation: str, model: str, **extra) -> dict:
    return {"format": "minibloom-trace", "version": FORMAT_VERSION, "dtype": kind,
            "quantized": kind not in _FLOAT_KINDS, "implementation": implementation, "model": model, **extra}


def _write_note(out_dir: str, **note) -> None:
    with open(os.path.join(out_dir, NOTE_FILE), "w") as f:
        json.dump(note, f, indent=2)


def _read_note(model_dir: str, path: str | None = None) -> dict:
    """The note a converter wrote (``NOTE_FILE`` in ``model_dir``, or the file ``path``); {} where there is none."""
    from ..jsonfile import read_json_object

    path = path or os.path.join(model_dir, NOTE_FILE)
    return read_json_object(path) if os.path.isfile(path) else {}


def _checkpoint_dir(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MinibloomError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
    return path


def _import(name: str, extra: str = "test"):
    try:
        return __import__(name)
    except ImportError:
        raise MinibloomError(f"{name} is not installed; `pip install 'minibloom[{extra}]'` (or `pip install "
                             f"{name}`)") from None


# ---- CTranslate2 ---------------------------------------------------------------------------------------------
class _IdVocabulary:
    """Stands in for a tokenizer when a checkpoint has none: token ``i`` is the string ``<id_i>``. CTranslate2 only
    needs the vocabulary's size here, because ``forward_batch`` is given token ids."""

    def __init__(self, n: int, bos: int, eos: int, unk: int):
        self.n = n
        self.bos_token, self.eos_token, self.unk_token = (f"<id_{i}>" for i in (bos, eos, unk))

    def get_vocab(self) -> dict[str, int]:
        return {f"<id_{i}>": i for i in range(self.n)}


def ctranslate2_convert(checkpoint_dir, out_dir, quantization: str = "float32", *, force: bool = True) -> str:
    """Convert a BLOOM checkpoint directory with CTranslate2's own ``TransformersConverter``; returns ``out_dir``.

    ``quantization``: how CTranslate2 stores the weights (``CT2_QUANTIZATIONS``: float32, float16, int8,
    int8_float32, ...). A checkpoint without tokenizer files gets the vocabulary ``<id_0> .. <id_{V-1}>``.
    Writes ``minibloom_engine.json`` (source, quantization) next to the model for ``ctranslate2_trace``.
    """
    ct2 = _import("ctranslate2")
    from ctranslate2.converters import TransformersConverter

    src = _checkpoint_dir(checkpoint_dir)
    out_dir = os.fspath(out_dir)
    if quantization not in CT2_QUANTIZATIONS:
        raise MinibloomError(f"quantization: {quantization!r} is not one of {', '.join(CT2_QUANTIZATIONS)}")
    has_tokenizer = any(os.path.isfile(os.path.join(src, f)) for f in _TOKENIZER_FILES)

    class Converter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            if has_tokenizer:
                return super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
            with open(os.path.join(src, "config.json")) as f:
                cfg = json.load(f)
            special = [cfg.get(k) for k in ("bos_token_id", "eos_token_id", "unk_token_id")]  # CT2 needs all 3
            return _IdVocabulary(cfg["vocab_size"], *(d if i is None else i for i, d in zip(special, (1, 2, 0))))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Converter(src).convert(out_dir, quantization=quantization, force=force)
    _write_note(out_dir, engine="ctranslate2", version=ct2.__version__, source=os.path.abspath(src),
                quantization=quantization)
    return out_dir


def ctranslate2_kind(quantization: str, compute_type: str) -> str:
    """The kind a CTranslate2 run computes in: int8 compute -> ``int8-dynamic`` (activations quantized at run
    time); float compute -> the less precise of the stored weights and the compute type (float16 weights widened to
    float32 on CPU are still float16-rounded); int8 weights run in float -> ``int8-weight-only``."""
    if compute_type.startswith("int8"):
        return "int8-dynamic"
    if compute_type.startswith("int16"):
        return "int16-dynamic"
    if compute_type in ("float16", "bfloat16"):
        return compute_type
    if quantization.startswith("int8"):
        return "int8-weight-only"
    if quantization.startswith("int16"):
        return "int16-weight-only"
    return quantization if quantization in ("float16", "bfloat16") else "float32"


def ctranslate2_trace(model_dir, input_ids, attention_mask=None, quantization: str | None = None, *,
                      compute_type: str = "default", device: str = "cpu", intra_threads: int = 0) -> dict:
    """A logits-only trace of ``ctranslate2.Generator.forward_batch`` on a converted model directory.

    Each row's real tokens (``attention_mask == 1``) run as one variable-length sequence; the logits come back in
    the mask's layout with zeros at the padded positions. ``quantization``: how the model was converted (default:
    read from the ``minibloom_engine.json`` that ``ctranslate2_convert`` wrote); with ``compute_type`` (the
    Generator's, "default" = the stored type where the device supports it) it sets ``meta["dtype"]``.
    """
    ct2 = _import("ctranslate2")
    model_dir = os.fspath(model_dir)
    if not ct2.contains_model(model_dir):
        raise MinibloomError(f"{model_dir}: not a CTranslate2 model directory (no model.bin)")
    if quantization is None:
        quantization = _read_note(model_dir).get("quantization")
        if quantization is None:
            raise MinibloomError(f"{model_dir}: no {NOTE_FILE}; pass quantization= (how the model was converted)")
    ids, mask = _inputs(input_ids, attention_mask)
    rows = _real_rows(ids, mask)
    generator = ct2.Generator(model_dir, device=device, compute_type=compute_type, intra_threads=intra_threads)
    try:
        out = generator.forward_batch([r.tolist() for r in rows])
        if device != "cpu":
            out = out.to_device(ct2.Device.cpu)
        logits = np.asarray(out)
        used = generator.compute_type
    finally:
        del generator
    if logits.ndim != 3 or logits.shape[0] != ids.shape[0]:
        raise MinibloomError(f"{model_dir}: forward_batch returned shape {logits.shape}, expected [batch, len, vocab]")
    logits = _to_mask_layout([logits[b, :len(r)] for b, r in enumerate(rows)], mask)
    kind = ctranslate2_kind(quantization, used)
    impl = f"ctranslate2 {ct2.__version__} (weights {quantization}, compute {used}, {device})"
    return {"input_ids": ids, "attention_mask": mask, "hidden_states": None, "logits": logits, "attentions": None,
            "meta": _meta(kind, impl, model_dir, engine="ctranslate2", weights=quantization, compute_type=used)}


# ---- ONNX Runtime ----------------------------------------------------------------------------------------------
def _set_onnx_kind(path: str, kind: str, source: str | None = None) -> None:
    """Record the kind (and source) in the ONNX file's metadata_props; external data files stay where they are."""
    onnx = _import("onnx")
    model = onnx.load(path, load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props[ONNX_KIND_KEY] = kind
    if source is not None:
        props["minibloom.source"] = source
    onnx.helper.set_model_props(model, props)
    onnx.save(model, path)


def onnx_export(checkpoint_dir, out_path, dtype: str = "float32", hidden_states: bool = True, *,
                opset: int = 17) -> str:
    """Export transformers' ``BloomForCausalLM`` for ``checkpoint_dir`` to ONNX (TorchScript exporter).

    Inputs ``input_ids``, ``attention_mask`` (int64 [batch, seq], both axes dynamic); outputs ``logits`` and, with
    ``hidden_states``, ``hidden_states.0 .. hidden_states.{n_layer}`` (transformers' convention, as in a trace).
    ``dtype``: "float32", or "float16" (``model.half()`` before export). The model is traced on a batch with a
    left-padded row, so the mask's path is in the graph. Returns ``out_path``.
    """
    from .hf import _import_hf

    torch, transformers = _import_hf()
    src = _checkpoint_dir(checkpoint_dir)
    out_path = os.fspath(out_path)
    if dtype not in ONNX_DTYPES:
        raise MinibloomError(f"dtype: {dtype!r} is not one of {', '.join(ONNX_DTYPES)} for ONNX export")
    model = transformers.BloomForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    model = model.eval().to(getattr(torch, dtype))
    n_layer, vocab = model.config.n_layer, model.config.vocab_size

    class Wrapper(torch.nn.Module):  # a flat tuple of tensors: what the TorchScript exporter accepts
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             output_hidden_states=hidden_states, return_dict=True)
            return (out.logits, *(out.hidden_states if hidden_states else ()))

    ids = torch.arange(12, dtype=torch.int64).reshape(2, 6) % vocab
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    outputs = ["logits"] + ([f"hidden_states.{i}" for i in range(n_layer + 1)] if hidden_states else [])
    axes = {name: {0: "batch", 1: "seq"} for name in ["input_ids", "attention_mask"] + outputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(model), (ids, mask), out_path, input_names=["input_ids", "attention_mask"],
                          output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False)
    del model
    _set_onnx_kind(out_path, dtype, os.path.abspath(src))
    return out_path


def onnx_quantize_dynamic(src, dst, *, per_channel: bool = False) -> str:
    """``onnxruntime.quantization.quantize_dynamic``: int8 weights (QInt8), activations quantized at run time
    (kind ``int8-dynamic``). Returns ``dst``."""
    _import("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isfile(src):
        raise MinibloomError(f"{src}: no such ONNX file")
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel)
    _set_onnx_kind(dst, "int8-dynamic")
    return dst


def _onnx_kind(path: str, session) -> str:
    """The kind recorded by ``onnx_export`` / ``onnx_quantize_dynamic``, else guessed from the graph."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get(ONNX_KIND_KEY):
        return props[ONNX_KIND_KEY]
    onnx = _import("onnx")
    ops = {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}
    if ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}:
        return "int8-dynamic"
    logits_type = next(o.type for o in session.get_outputs() if o.name == "logits")
    return "float16" if logits_type == "tensor(float16)" else "float32"


def onnx_trace(path, input_ids, attention_mask=None, kind: str | None = None, *, threads: int = 0) -> dict:
    """A trace (hidden states when the model outputs them, and logits) of an ONNX Runtime CPU session on ``path``.

    ``kind``: the policy name for ``meta["dtype"]``; default: the one ``onnx_export`` / ``onnx_quantize_dynamic``
    recorded in the file. ``threads``: ORT's intra-op threads (0 = its default).
    """
    ort = _import("onnxruntime")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MinibloomError(f"{path}: no such ONNX file")
    ids, mask = _inputs(input_ids, attention_mask)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if {i.name for i in session.get_inputs()} != {"input_ids", "attention_mask"} or "logits" not in names:
        raise MinibloomError(f"{path}: expected inputs input_ids, attention_mask and an output 'logits' "
                             "(export with minibloom.engines.onnx_export)")
    kind = kind or _onnx_kind(path, session)
    out = dict(zip(names, session.run(names, {"input_ids": ids, "attention_mask": mask})))
    n_hidden = sum(1 for n in names if re.fullmatch(r"hidden_states\.\d+", n))
    hidden = [out[f"hidden_states.{i}"] for i in range(n_hidden)] or None
    impl = f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
    return {"input_ids": ids, "attention_mask": mask, "hidden_states": hidden, "logits": out["logits"],
            "attentions": None, "meta": _meta(kind, impl, path, engine="onnxruntime")}


# ---- llama.cpp (llama-cpp-python) ------------------------------------------------------------------------------
GGUF_KINDS = {  # gguf LlamaFileType value -> kind
    0: "float32-gelu-table", 1: "float16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
    11: "q3_k", 12: "q3_k", 13: "q3_k", 14: "q4_k", 15: "q4_k", 16: "q5_k", 17: "q5_k", 18: "q6_k", 32: "bfloat16",
}


def gguf_kind(path: str) -> str:
    """The kind of a GGUF file from its ``general.file_type`` (``GGUF_KINDS``)."""
    from gguf import GGUFReader

    field = GGUFReader(path).get_field("general.file_type")
    if field is None:
        raise MinibloomError(f"{path}: no general.file_type; pass kind=")
    ftype = int(field.parts[field.data[0]][0])
    if ftype not in GGUF_KINDS:
        raise MinibloomError(f"{path}: general.file_type {ftype} has no minibloom kind; pass kind=")
    return GGUF_KINDS[ftype]


class _GgmlTensorHead(ctypes.Structure):
    """The leading fields of ggml.h's ``struct ggml_tensor`` (type, buffer, ne[4], nb[4]); the rest is not read."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4)]


def _ggml_functions(llama_cpp):
    """ggml's ``ggml_get_name``, ``ggml_nbytes``, ``ggml_backend_tensor_get`` from the libraries llama-cpp-python
    loaded (libllama's handle finds its ggml dependencies; ``llama_cpp/lib/libggml-base`` is tried too)."""
    handles = [getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)]
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml.so", "libggml.dylib"):
        if os.path.isfile(os.path.join(lib_dir, name)):
            handles.append(ctypes.CDLL(os.path.join(lib_dir, name)))
    for h in handles:
        if h is not None and hasattr(h, "ggml_get_name") and hasattr(h, "ggml_backend_tensor_get"):
            get_name, nbytes, tensor_get = h.ggml_get_name, h.ggml_nbytes, h.ggml_backend_tensor_get
            get_name.argtypes, get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
            nbytes.argtypes, nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
            tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
            tensor_get.restype = None
            return get_name, nbytes, tensor_get
    raise MinibloomError("llama_cpp: cannot find ggml_get_name / ggml_backend_tensor_get in its libraries")


_WANTED = re.compile(r"^(inp_norm(-0)?|l_out-(\d+)|result_norm)$")  # the logits: llama_get_logits_ith
GGML_TYPE_F32 = 0


class _Collector:
    """The ``cb_eval`` callback: asks for the named tensors and copies them (float32, [n_tokens, C]) as they are
    computed. Exceptions are kept and re-raised after ``llama_decode`` (a ctypes callback cannot raise)."""

    def __init__(self, llama_cpp):
        self.get_name, self.nbytes, self.tensor_get = _ggml_functions(llama_cpp)
        self.tensors: dict[str, np.ndarray] = {}
        self.error: BaseException | None = None
        self.c_callback = llama_cpp.ggml_backend_sched_eval_callback(self._callback)

    def _callback(self, t, ask, user_data):
        try:
            name = (self.get_name(t) or b"").decode()
            if ask:
                return bool(_WANTED.match(name))
            head = _GgmlTensorHead.from_address(t)
            if head.type != GGML_TYPE_F32:
                raise MinibloomError(f"llama.cpp tensor {name}: type {head.type}, expected F32")
            ne = list(head.ne)
            if head.nb[1] != 4 * ne[0] or any(n != 1 for n in ne[2:]):
                raise MinibloomError(f"llama.cpp tensor {name}: not a contiguous 2-D tensor (ne {ne})")
            buf = np.empty((ne[1], ne[0]), np.float32)
            if self.nbytes(t) != buf.nbytes:  # the struct head read wrong (a ggml.h layout change): copy nothing
                raise MinibloomError(f"llama.cpp tensor {name}: ggml_nbytes {self.nbytes(t)} != {buf.nbytes}")
            self.tensor_get(t, buf.ctypes.data, 0, buf.nbytes)
            self.tensors[name] = buf
            return True
        except BaseException as e:  # noqa: BLE001 - handed back to the caller after llama_decode
            self.error = e
            return False


def _llama_row(llama_cpp, ctx, collector: _Collector, tokens: np.ndarray, n_vocab: int) -> dict:
    """Decode one sequence (positions 0..n-1, logits for every token) in a cleared context."""
    n = len(tokens)
    memory = llama_cpp.llama_get_memory(ctx) if hasattr(llama_cpp, "llama_get_memory") else None
    if memory is not None:
        llama_cpp.llama_memory_clear(memory, True)
    else:
        llama_cpp.llama_kv_self_clear(ctx)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, tok in enumerate(tokens):
            batch.token[i] = int(tok)
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = n
        collector.tensors = {}
        rc = llama_cpp.llama_decode(ctx, batch)
        if collector.error is not None:
            raise collector.error
        if rc != 0:
            raise MinibloomError(f"llama_decode returned {rc}")
        logits = np.empty((n, n_vocab), np.float32)
        for i in range(n):
            ptr = llama_cpp.llama_get_logits_ith(ctx, i)
            logits[i] = np.ctypeslib.as_array(ptr, shape=(n_vocab,))
    finally:
        llama_cpp.llama_batch_free(batch)
    return {**collector.tensors, "logits": logits}


def _hidden_from_tensors(t: dict, where: str) -> list[np.ndarray]:
    """llama.cpp's named tensors -> transformers' hidden_states: inp_norm, l_out-0 .. l_out-{L-2}, result_norm."""
    layers = sorted(int(m.group(3)) for m in map(_WANTED.match, t) if m and m.group(3) is not None)
    first = t.get("inp_norm-0", t.get("inp_norm"))
    if first is None or "result_norm" not in t or layers != list(range(len(layers))):
        raise MinibloomError(f"{where}: llama.cpp did not report inp_norm, l_out-i and result_norm "
                             f"(got {sorted(t)})")
    return [first] + [t[f"l_out-{i}"] for i in layers[:-1]] + [t["result_norm"]]


def llama_cpp_trace(gguf_path, input_ids, attention_mask=None, kind: str | None = None, *,
                    n_threads: int | None = None, extra_buffers: bool = False) -> dict:
    """A trace (hidden states and logits) of llama.cpp on a GGUF file, through llama-cpp-python's low-level API.

    Each row's real tokens run alone as one sequence (positions from 0, KV memory cleared between rows); the
    ``cb_eval`` callback collects ``inp_norm-0``, ``l_out-{i}`` and ``result_norm``; the logits are
    ``llama_get_logits_ith`` for every token. Padded positions hold zeros. ``kind``: default from the file's
    ``general.file_type`` (``gguf_kind``). ``extra_buffers``: let ggml use its extra CPU buffer types (weights
    repacked for AMX / AVX-512 kernels, llama.cpp's default); off by default, the plain ggml CPU kernels run
    (llama-cpp-python 0.3.36 crashed in ``ggml_backend_amx_mul_mat`` on Q8_0 files on an AMX Xeon with them on).
    Needs ``pip install llama-cpp-python``.
    """
    try:
        import llama_cpp
    except ImportError:
        raise MinibloomError("llama_cpp is not installed; `pip install llama-cpp-python` (builds llama.cpp)") from None
    path = os.fspath(gguf_path)
    if not os.path.isfile(path):
        raise MinibloomError(f"{path}: no such GGUF file")
    ids, mask = _inputs(input_ids, attention_mask)
    kind = kind or gguf_kind(path)
    rows = _real_rows(ids, mask)
    n_max = max(len(r) for r in rows)
    threads = n_threads or min(4, os.cpu_count() or 1)
    collector = _Collector(llama_cpp)

    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    if hasattr(model_params, "use_extra_bufts"):  # llama.h since 2025; older versions have no such switch
        model_params.use_extra_bufts = extra_buffers
    model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
    if not model:
        raise MinibloomError(f"{path}: llama.cpp could not load the model (see its log above)")
    ctx = None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = max(n_max, 16)  # one ubatch per row: one callback per tensor
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.cb_eval = collector.c_callback
        cp.cb_eval_user_data = None
        cp.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cp)
        if not ctx:
            raise MinibloomError(f"{path}: llama.cpp could not create a context")
        outs = [_llama_row(llama_cpp, ctx, collector, r, n_vocab) for r in rows]
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    hidden_rows = [_hidden_from_tensors(o, path) for o in outs]
    hidden = [_to_mask_layout([h[i] for h in hidden_rows], mask) for i in range(len(hidden_rows[0]))]
    logits = _to_mask_layout([o["logits"] for o in outs], mask)
    version = getattr(llama_cpp, "__version__", "?")
    impl = f"llama.cpp via llama-cpp-python {version} (CPU, {threads} threads)"
    return {"input_ids": ids, "attention_mask": mask, "hidden_states": hidden, "logits": logits, "attentions": None,
            "meta": _meta(kind, impl, path, engine="llama.cpp")}


# ---- same-weights references -----------------------------------------------------------------------------
def dequantized_checkpoint(source, out_dir, like, *, force: bool = False, progress: bool = False) -> str:
    """The same-weights reference of a quantized model: ``minibloom.oracle.dequantize.dequantized_checkpoint``
    (imported only when called: it reads engines' files with their optional packages). Writes the engine's
    dequantized weights as a BLOOM checkpoint in ``out_dir`` (MODEL = ``like`` for the rest) and returns
    ``out_dir``; see that function for the accepted sources."""
    from .dequantize import dequantized_checkpoint as write

    return write(source, out_dir, like, force=force, progress=progress)


# ---- OpenVINO (minibloom.oracle.engines_openvino, which imports this module's helpers) -----------------------
_OPENVINO_NAMES = ("openvino_convert", "openvino_compress", "openvino_trace", "openvino_kind", "OPENVINO_WEIGHTS")


def __getattr__(name: str):
    """``engines.openvino_convert`` etc.: loaded on first use from ``engines_openvino`` (a module above this one)."""
    if name in _OPENVINO_NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.engines_openvino"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
