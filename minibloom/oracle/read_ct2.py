"""Read the weights a CTranslate2 model multiplies by, from its ``model.bin``, with NumPy only.

The file layout is the one ``ctranslate2/specs/model_spec.py`` (``ModelSpec._serialize``) writes and
``src/models/model.cc`` (``load_model``) reads, all little-endian:

    uint32 binary version; (version >= 2) string spec name, uint32 spec revision;
    uint32 variable count; per variable: string name, uint8 rank, rank x uint32 dims,
        (version >= 4) uint8 dtype id (float32, int8, int16, int32, float16, bfloat16), uint32 byte count,
        (version < 4) uint8 item size, uint32 element count; then the payload;
    (version >= 3) uint32 alias count; per alias: string alias, string variable name.
    A string is uint16 length (with the terminating NUL) followed by the bytes and the NUL.

Quantization (``LayerSpec._quantize``): each linear weight [out, in] gets ``weight_scale`` [out] = 127 / amax of its
row (float32), and ``weight`` = rint(w * scale) as int8; dequantized, the engine multiplies by ``q / scale``
(``Model::ensure_dtype`` divides the same way when it runs an int8 model in float). int16 models use one scale.

BLOOM (``converters/transformers.py``, ``BloomLoader``): the fused QKV's rows are moved from transformers' per-head
interleave [H, 3, D] to [3, H, D]; ``read`` moves them back. Names: ``decoder/layer_{i}/self_attention/linear_0``
(QKV), ``linear_1`` (dense), ``decoder/layer_{i}/ffn/linear_0`` / ``linear_1`` (MLP), ``decoder/embeddings``,
``decoder/projection`` (the head; an alias of the embedding when tied). Float tensors the converter rounded
(float16 / bfloat16 biases and LayerNorms of ``int8_float16``, ``float16`` models) are returned too, under BLOOM's
names, since the engine computes with the rounded values.
"""

from __future__ import annotations

import math
import os
import re
import struct

import numpy as np

from ..errors import MinibloomError
from .engine_weights import EngineWeights

CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # include/ctranslate2/types.h order
_ITEM_SIZE = {"float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}
MAX_VERSION = 6  # ctranslate2.specs.model_spec.CURRENT_BINARY_VERSION when this reader was written
MAX_RANK = 8

_LINEARS = {  # CTranslate2 scope (after decoder/layer_{i}/) -> BLOOM module (after h.{i}.)
    "self_attention/linear_0": "self_attention.query_key_value",
    "self_attention/linear_1": "self_attention.dense",
    "ffn/linear_0": "mlp.dense_h_to_4h",
    "ffn/linear_1": "mlp.dense_4h_to_h",
}
_NORMS = {"self_attention/layer_norm": "input_layernorm", "ffn/layer_norm": "post_attention_layernorm"}
_TOP = {"decoder/embeddings": "word_embeddings", "decoder/projection": "lm_head",
        "decoder/layernorm_embedding": "word_embeddings_layernorm", "decoder/layer_norm": "ln_f"}
_FIELD = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}  # CT2 LayerNorm: gamma, beta


class _Reader:
    """Bounds-checked reads from the bytes of one file (every claim of the header is checked against its length)."""

    def __init__(self, data: bytes, path: str):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MinibloomError(f"{self.path}: truncated: {what} needs {n} bytes at offset {self.pos}, the file has "
                                 f"{len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.uint("H", f"{what} length")
        if n == 0:
            raise MinibloomError(f"{self.path}: {what}: invalid string length 0")
        raw = self.take(n, what)
        if raw[-1:] != b"\0":
            raise MinibloomError(f"{self.path}: {what}: string not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise MinibloomError(f"{self.path}: {what}: not UTF-8") from None


def read_model_bin(path: str) -> tuple[dict, dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """``({"version", "spec", "revision"}, variables, aliases, dtypes)`` of a CTranslate2 ``model.bin``: variables
    keep the file's dtype, except bfloat16 (widened to float32, exactly); ``dtypes`` names each stored type."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MinibloomError(f"{path}: cannot read ({e.strerror})") from None
    r = _Reader(data, path)
    version = r.uint("I", "binary version")
    if not 1 <= version <= MAX_VERSION:
        raise MinibloomError(f"{path}: binary version {version} is not a CTranslate2 model.bin this reader knows "
                             f"(1..{MAX_VERSION})")
    head = {"version": version, "spec": "", "revision": 1}
    if version >= 2:
        head["spec"] = r.string("spec name")
        head["revision"] = r.uint("I", "spec revision")
    count = r.uint("I", "variable count")
    if count > len(data) // 8:  # every variable takes more than 8 bytes of header
        raise MinibloomError(f"{path}: claims {count} variables, more than a file of {len(data)} bytes can hold")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(count):
        name = r.string("variable name")
        rank = r.uint("B", f"{name}: rank")
        if rank > MAX_RANK:
            raise MinibloomError(f"{path}: variable {name}: rank {rank} > {MAX_RANK}")
        shape = tuple(r.uint("I", f"{name}: dimension") for _ in range(rank))
        if version >= 4:
            type_id = r.uint("B", f"{name}: dtype")
            if type_id >= len(CT2_DTYPES):
                raise MinibloomError(f"{path}: variable {name}: unknown dtype id {type_id}")
            dtype = CT2_DTYPES[type_id]
            n_bytes = r.uint("I", f"{name}: byte count")
        else:
            item = r.uint("B", f"{name}: item size")
            dtype = {4: "float32", 2: "int16", 1: "int8"}.get(item)
            if dtype is None:
                raise MinibloomError(f"{path}: variable {name}: item size {item}")
            n_bytes = r.uint("I", f"{name}: element count") * item
        n_elem = math.prod(shape)  # Python ints: no overflow on a hostile shape
        if n_bytes != n_elem * _ITEM_SIZE[dtype]:
            raise MinibloomError(f"{path}: variable {name}: {n_bytes} bytes for shape {shape} of {dtype} "
                                 f"({n_elem * _ITEM_SIZE[dtype]} expected)")
        raw = r.take(n_bytes, f"variable {name}")  # bounded by the file's length before anything is allocated
        if dtype == "bfloat16":
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).astype(dtype)
        if name in variables:
            raise MinibloomError(f"{path}: variable {name} appears twice")
        variables[name] = arr.reshape(shape)
        dtypes[name] = dtype
    aliases: dict[str, str] = {}
    if version >= 3:
        n_alias = r.uint("I", "alias count")
        if n_alias > len(data) // 4:
            raise MinibloomError(f"{path}: claims {n_alias} aliases, more than the file can hold")
        for _ in range(n_alias):
            alias = r.string("alias")
            target = r.string(f"alias {alias}: target")
            if target not in variables:
                raise MinibloomError(f"{path}: alias {alias} names a missing variable {target!r}")
            aliases[alias] = target
    if r.pos != len(data):
        raise MinibloomError(f"{path}: {len(data) - r.pos} bytes after the last record (damaged file)")
    return head, variables, aliases, dtypes


def _bloom_name(scope: str, field: str) -> str | None:
    """BLOOM's bare tensor name for CTranslate2 variable ``scope/field`` (None: not a BLOOM tensor)."""
    m = re.fullmatch(r"decoder/layer_(\d+)/(.+)", scope)
    if m:
        module = _LINEARS.get(m.group(2)) or _NORMS.get(m.group(2))
        return None if module is None else f"h.{int(m.group(1))}.{module}.{_FIELD[field]}"
    return f"{_TOP[scope]}.{_FIELD[field]}" if scope in _TOP else None


def _n_head(path: str, variables: dict) -> int:
    """The head count CTranslate2 runs with: the ``num_heads`` variable its decoder spec stores."""
    for name in ("decoder/num_heads", "num_heads"):
        if name in variables and variables[name].size == 1:
            n = int(variables[name].reshape(-1)[0])
            if n <= 0:
                raise MinibloomError(f"{path}: {name} is {n}")
            return n
    raise MinibloomError(f"{path}: holds no decoder/num_heads (needed to undo the QKV reordering)")


def _qkv_to_transformers(a: np.ndarray, n_head: int, name: str) -> np.ndarray:
    """Undo ``BloomLoader.set_qkv_linear``: rows [3, H, D] -> transformers' per-head interleave [H, 3, D]."""
    rows = a.shape[0]
    if rows % (3 * n_head):
        raise MinibloomError(f"{name}: {rows} rows cannot be split into 3 x {n_head} heads")
    return a.reshape(3, n_head, rows // (3 * n_head), *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def dequantize(q: np.ndarray, scale: np.ndarray, name: str) -> np.ndarray:
    """``q / scale`` in float64, one scale per output row (or one for the tensor, as int16 models store)."""
    scale = np.asarray(scale, np.float64)
    if scale.size == 1:
        s = scale.reshape(())
    elif q.ndim == 2 and scale.shape == (q.shape[0],):
        s = scale[:, None]
    else:
        raise MinibloomError(f"{name}: scale of shape {scale.shape} does not fit a weight of shape {q.shape}")
    if not np.all(np.isfinite(s)) or np.any(s == 0):
        raise MinibloomError(f"{name}: scale has zero or non-finite values")
    return q.astype(np.float64) / s


def read(model_dir: str) -> EngineWeights:
    """The dequantized weights of the CTranslate2 model directory ``model_dir`` (BLOOM names, transformers' layout).

    Quantized matrices: ``q / weight_scale`` in float64. Float tensors stored in float16 / bfloat16 are returned
    too (the engine computes with their rounded values); float32 ones are left out (the unquantized model's).
    ``activations``: "int8-per-row" when the weights are int8 (CTranslate2's int8 compute quantizes each input
    row at run time, the head's too; a float ``compute_type`` at load time runs the same weights in float instead).
    """
    model_dir = os.fspath(model_dir)
    path = os.path.join(model_dir, "model.bin") if os.path.isdir(model_dir) else model_dir
    if not os.path.isfile(path):
        raise MinibloomError(f"{model_dir}: not a CTranslate2 model (no model.bin)")
    head, variables, aliases, dtypes = read_model_bin(path)
    if head["spec"] and "Decoder" not in head["spec"]:
        raise MinibloomError(f"{path}: spec {head['spec']!r} is not a decoder-only Transformer (BLOOM converts to "
                             "TransformerDecoderSpec)")
    n_head = _n_head(path, variables)
    matrices: dict[str, np.ndarray] = {}
    stored: dict[str, str] = {}
    for name in list(variables) + list(aliases):
        scope, _, field = name.rpartition("/")
        target = aliases.get(name, name)  # an alias (a tied head, equal tensors) reads its variable
        value = variables[target]
        if field not in _FIELD or value.ndim == 0:
            continue
        bloom = _bloom_name(scope, field)
        if dtypes[target] in ("int8", "int16"):
            if bloom is None:
                raise MinibloomError(f"{path}: quantized variable {name} has no BLOOM counterpart")
            if target + "_scale" not in variables:
                raise MinibloomError(f"{path}: quantized variable {target} has no {target}_scale")
            arr = dequantize(value, variables[target + "_scale"], f"{path}: {name}")
        elif dtypes[target] in ("float16", "bfloat16") and bloom is not None:
            arr = value.astype(np.float64)
            stored[bloom] = dtypes[target]
        else:
            continue
        if ".query_key_value." in bloom:
            arr = _qkv_to_transformers(arr, n_head, f"{path}: {name}")
        matrices[bloom] = arr
    weights_type = _weights_type(variables, dtypes)
    notes = []
    if not any(dtypes[n] in ("int8", "int16") and v.ndim == 2 for n, v in variables.items()):
        notes.append("no quantized matrix: the engine multiplies by the model's weights in its float type")
    if "decoder/projection/weight" in aliases:
        notes.append("lm_head is CTranslate2's alias of the embedding (tied): the head multiplies by the same "
                     "(dequantized) matrix")
    int8 = weights_type.startswith("int8")
    if int8:
        notes.append("int8 compute quantizes every linear layer's input per row (the head's too); a float "
                     "compute_type runs these weights in float")
    return EngineWeights(engine=f"ctranslate2 model.bin v{head['version']} {weights_type}", matrices=matrices,
                         activations="int8-per-row" if int8 else None, compute="float32", notes=notes,
                         stored=stored)


def _weights_type(variables: dict, dtypes: dict) -> str:
    """How the model was converted (CTranslate2's quantization names), from its stored dtypes."""
    lin = {dtypes[n] for n, v in variables.items() if n.endswith("/weight") and v.ndim == 2}
    flt = {dtypes[n] for n, v in variables.items() if n.endswith(("/bias", "/gamma", "/beta"))}
    other = "float16" if "float16" in flt else "bfloat16" if "bfloat16" in flt else "float32"
    if "int8" in lin:
        return f"int8_{other}"
    if "int16" in lin:
        return "int16"
    return other if lin <= {other} else "/".join(sorted(lin))
