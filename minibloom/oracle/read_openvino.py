"""The weights an OpenVINO IR multiplies by, read from its ``.xml`` / ``.bin`` pair without OpenVINO.

Follows the IR v10/v11 format (``docs.openvino.ai``, "OpenVINO IR format"): the ``.xml`` lists ``<layer>`` nodes
(``id``, ``name``, ``type``, a ``<data>`` element of attributes, ``<input>`` / ``<output>`` ports) and ``<edge>``
elements (``from-layer``, ``from-port`` -> ``to-layer``, ``to-port``); a ``Const`` layer's ``<data>`` names its
``element_type``, ``shape``, and the ``offset`` / ``size`` of its bytes in the ``.bin`` (little-endian; ``u4`` / ``i4``
packed two per byte, the first element in the low nibble).

NNCF's ``compress_weights`` stores a compressed matrix as a decompression subgraph in front of its consumer:
``Const`` (u8 / i8 / u4 / i4) -> ``Convert`` -> [``Subtract`` a zero point (a ``Const`` u8 / u4 -> ``Convert``)] ->
``Multiply`` a scale (``Const`` f16 / f32) -> [``Reshape`` the groups ``[out, n_groups, group]`` -> ``[out, in]``]
-> [``Convert``] -> ``MatMul`` (input 1, ``transpose_b``) or ``Gather`` (an embedding lookup, input 0). ``read``
evaluates every constant subgraph feeding a ``MatMul`` or ``Gather`` in float64, op by op as the graph states it
(zero point subtracted before the scale multiply), without rounding to the subgraph's intermediate float16 type:
OpenVINO's CPU plugin folds the subgraph into its fully-connected / gather kernels, which decompress in float32,
where ``(q - zp) * scale`` of an 8-bit integer and a float16 scale is exact.

Matrices are keyed by BLOOM's bare name where the consumer's name reveals it (``ov.convert_model`` of a PyTorch
module names a linear's MatMul ``__module.<path>/aten::linear/MatMul``): ``h.{i}.self_attention.query_key_value
.weight`` ..., ``lm_head.weight`` for the head's MatMul and ``word_embeddings.weight`` for the Gather (a tied model
may feed both from one Const); else by the weight Const's own name. Layout: transformers' [out, in] (a MatMul
without ``transpose_b`` holds [in, out] and is transposed). A MatMul / Gather fed by a plain float32 Const (weights
the engine left in float32) is not listed. The IR holds no activation quantization: the CPU plugin's dynamic
quantization is a runtime setting (``minibloom.oracle.engines_openvino.openvino_trace``), so ``activations`` is None.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET

import numpy as np

from ..errors import MinibloomError
from .engine_weights import EngineWeights

# element_type -> (NumPy dtype of the stored bytes, bits per element)
ELEMENT_TYPES = {
    "f64": ("<f8", 64), "f32": ("<f4", 32), "f16": ("<f2", 16), "bf16": ("<u2", 16),
    "i64": ("<i8", 64), "i32": ("<i4", 32), "i16": ("<i2", 16), "i8": ("i1", 8),
    "u64": ("<u8", 64), "u32": ("<u4", 32), "u16": ("<u2", 16), "u8": ("u1", 8),
    "i4": ("u1", 4), "u4": ("u1", 4), "boolean": ("u1", 8),
}
INTEGER_TYPES = {"i64", "i32", "i16", "i8", "u64", "u32", "u16", "u8", "i4", "u4", "boolean"}
MAX_DIM = 1 << 40  # a bound on one dimension: anything larger is a corrupt file, not a model
_SUPPORTED = ("Const", "Convert", "Subtract", "Multiply", "Add", "Reshape", "Transpose", "Unsqueeze", "Squeeze")
_LINEAR = re.compile(r"(?:^|[./])(h\.\d+\.(?:self_attention\.(?:query_key_value|dense)|mlp\.(?:dense_h_to_4h|"
                     r"dense_4h_to_h)))(?:[./]|$)")
_HEAD = re.compile(r"(?:^|[./])lm_head(?:[./]|$)")
_EMBEDDING = re.compile(r"(?:^|[./])word_embeddings(?:[./]|$)")


class _Graph:
    """The parsed ``.xml``: layers by id, each input's producer, and the ``.bin`` bytes (memory-mapped)."""

    def __init__(self, xml_path: str):
        self.path = xml_path
        try:
            self.root = ET.parse(xml_path).getroot()
        except (ET.ParseError, OSError) as e:
            raise MinibloomError(f"{xml_path}: not a readable OpenVINO IR .xml ({e})") from None
        layers_el, edges_el = self.root.find("layers"), self.root.find("edges")
        if self.root.tag != "net" or layers_el is None or edges_el is None:
            raise MinibloomError(f"{xml_path}: not an OpenVINO IR (expected <net> with <layers> and <edges>)")
        self.layers = {}
        self.in_ports = {}  # layer id -> {port id: input index}
        for layer in layers_el.findall("layer"):
            lid = layer.get("id")
            if lid is None or lid in self.layers:
                raise MinibloomError(f"{xml_path}: layer {layer.get('name')!r} has a missing or repeated id")
            self.layers[lid] = layer
            inp = layer.find("input")
            ports = [] if inp is None else inp.findall("port")
            self.in_ports[lid] = {p.get("id"): i for i, p in enumerate(ports)}
        self.producer = {}  # (layer id, input index) -> producing layer id
        self.consumers = {}  # layer id -> [(consumer id, input index)]
        for edge in edges_el.findall("edge"):
            src, dst, port = edge.get("from-layer"), edge.get("to-layer"), edge.get("to-port")
            if src not in self.layers or dst not in self.layers or port not in self.in_ports[dst]:
                raise MinibloomError(f"{xml_path}: edge {src}->{dst}:{port} names no layer or input port")
            index = self.in_ports[dst][port]
            self.producer[dst, index] = src
            self.consumers.setdefault(src, []).append((dst, index))
        bin_path = os.path.splitext(xml_path)[0] + ".bin"
        self.bin_path = bin_path
        self.bin = None
        if any(layer.get("type") == "Const" for layer in self.layers.values()):
            if not os.path.isfile(bin_path):
                raise MinibloomError(f"{xml_path}: its weights file {bin_path} is missing")
            size = os.path.getsize(bin_path)
            self.bin = np.memmap(bin_path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def name(self, lid: str) -> str:
        layer = self.layers[lid]
        return f"{layer.get('name')!r} (layer {lid}, {layer.get('type')})"

    def data(self, lid: str) -> dict:
        el = self.layers[lid].find("data")
        return {} if el is None else dict(el.attrib)

    def input(self, lid: str, index: int) -> str:
        src = self.producer.get((lid, index))
        if src is None:
            raise MinibloomError(f"{self.path}: input {index} of {self.name(lid)} is not connected")
        return src

    def n_inputs(self, lid: str) -> int:
        return len(self.in_ports[lid])


def _shape(text: str | None, where: str) -> tuple[int, ...]:
    """A Const's ``shape`` attribute ("256, 2, 32", "" for a scalar) -> a tuple of bounded ints."""
    if text is None:
        raise MinibloomError(f"{where}: no shape")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise MinibloomError(f"{where}: shape {text!r} is not a list of integers") from None
    if any(d < 0 or d > MAX_DIM for d in dims):
        raise MinibloomError(f"{where}: shape {text!r} has a negative or absurd dimension")
    return dims


def _const(g: _Graph, lid: str) -> np.ndarray:
    """A Const layer's value: float types as float64, integer types as int64 (u4 / i4 unpacked, low nibble first)."""
    where = f"{g.path}: {g.name(lid)}"
    d = g.data(lid)
    etype = d.get("element_type")
    if etype not in ELEMENT_TYPES:
        raise MinibloomError(f"{where}: element_type {etype!r} is not one of {', '.join(ELEMENT_TYPES)}")
    shape = _shape(d.get("shape"), where)
    try:
        offset, size = int(d["offset"]), int(d["size"])
    except (KeyError, ValueError):
        raise MinibloomError(f"{where}: offset / size missing or not integers") from None
    n = math.prod(shape)
    dtype, bits = ELEMENT_TYPES[etype]
    expected = (n * bits + 7) // 8
    nbytes = 0 if g.bin is None else g.bin.size
    if offset < 0 or size < 0 or offset + size > nbytes:
        raise MinibloomError(f"{where}: bytes [{offset}, {offset + size}) lie outside {g.bin_path} ({nbytes} bytes)")
    if size != expected:
        raise MinibloomError(f"{where}: {size} bytes for {n} elements of {etype} (expected {expected})")
    raw = np.asarray(g.bin[offset:offset + size])
    if bits == 4:
        nibbles = np.empty(2 * size, np.int64)
        nibbles[0::2], nibbles[1::2] = raw & 0x0F, raw >> 4
        values = nibbles[:n]
        if etype == "i4":
            values = np.where(values >= 8, values - 16, values)
        return values.reshape(shape)
    values = raw.view(dtype)
    if etype == "bf16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    kind = np.int64 if etype in INTEGER_TYPES else np.float64
    if etype in ("u64",) and np.any(values > np.iinfo(np.int64).max):
        raise MinibloomError(f"{where}: u64 values beyond int64")
    return values.astype(kind).reshape(shape)


def _broadcast(g: _Graph, lid: str, a: np.ndarray, b: np.ndarray, op) -> np.ndarray:
    mode = g.data(lid).get("auto_broadcast", "numpy").lower()
    if mode not in ("numpy", "none") or (mode == "none" and a.shape != b.shape):
        raise MinibloomError(f"{g.path}: {g.name(lid)}: auto_broadcast {mode!r} with shapes {a.shape}, {b.shape} "
                             "is not supported")
    try:
        return op(np.asarray(a, np.float64), np.asarray(b, np.float64))
    except ValueError:
        raise MinibloomError(f"{g.path}: {g.name(lid)}: shapes {a.shape} and {b.shape} do not broadcast") from None


def _ints(g: _Graph, lid: str, value: np.ndarray, what: str) -> list[int]:
    v = np.asarray(value)
    if v.ndim > 1 or not np.all(v == np.round(v)):
        raise MinibloomError(f"{g.path}: {g.name(lid)}: {what} must be a 1-D list of integers")
    return [int(x) for x in v.reshape(-1)]


def _reshape(g: _Graph, lid: str, x: np.ndarray, target: list[int]) -> np.ndarray:
    special_zero = g.data(lid).get("special_zero", "false").lower() == "true"
    dims = [x.shape[i] if (t == 0 and special_zero and i < x.ndim) else t for i, t in enumerate(target)]
    if dims.count(-1) > 1 or any(t < -1 for t in dims):
        raise MinibloomError(f"{g.path}: {g.name(lid)}: bad target shape {target}")
    try:
        return x.reshape(dims)
    except ValueError:
        raise MinibloomError(f"{g.path}: {g.name(lid)}: cannot reshape {x.shape} to {target}") from None


class _Evaluator:
    """Evaluates constant subgraphs in float64 (memoized per layer), with the ops of NNCF's decompression."""

    def __init__(self, g: _Graph):
        self.g = g
        self.values: dict[str, np.ndarray] = {}
        self.constant: dict[str, bool] = {}

    def is_constant(self, lid: str, depth: int = 0) -> bool:
        """True when every path into ``lid`` starts at a Const (no Parameter) within 64 steps: a weight's
        subgraph, not an activation."""
        if lid in self.constant:
            return self.constant[lid]
        g = self.g
        kind = g.layers[lid].get("type")
        if kind == "Const":
            result = True
        elif depth > 64 or kind == "Parameter" or g.n_inputs(lid) == 0:
            result = False
        else:
            srcs = [g.producer.get((lid, i)) for i in range(g.n_inputs(lid))]
            result = all(s is not None and self.is_constant(s, depth + 1) for s in srcs)
        self.constant[lid] = result
        return result

    def value(self, lid: str, depth: int = 0) -> np.ndarray:
        if lid in self.values:
            return self.values[lid]
        g = self.g
        if depth > 64:
            raise MinibloomError(f"{g.path}: {g.name(lid)}: constant subgraph deeper than 64 nodes")
        kind = g.layers[lid].get("type")
        if kind not in _SUPPORTED:
            raise MinibloomError(f"{g.path}: {g.name(lid)}: op {kind!r} in a weight's subgraph is not supported "
                                 f"(supported: {', '.join(_SUPPORTED)})")
        ins = [self.value(g.input(lid, i), depth + 1) for i in range(g.n_inputs(lid) if kind != "Const" else 0)]
        if kind == "Const":
            out = _const(g, lid)
        elif kind == "Convert":
            out = self._convert(lid, ins[0])
        elif kind == "Subtract":
            out = _broadcast(g, lid, ins[0], ins[1], np.subtract)
        elif kind == "Multiply":
            out = _broadcast(g, lid, ins[0], ins[1], np.multiply)
        elif kind == "Add":
            out = _broadcast(g, lid, ins[0], ins[1], np.add)
        elif kind == "Reshape":
            out = _reshape(g, lid, ins[0], _ints(g, lid, ins[1], "target shape"))
        elif kind == "Transpose":
            order = _ints(g, lid, ins[1], "order")
            if sorted(order) != list(range(ins[0].ndim)):
                raise MinibloomError(f"{g.path}: {g.name(lid)}: order {order} for a {ins[0].ndim}-D input")
            out = np.transpose(ins[0], order)
        else:  # Unsqueeze / Squeeze
            axes = [a % (ins[0].ndim + (kind == "Unsqueeze")) for a in _ints(g, lid, ins[1], "axes")] \
                if len(ins) > 1 else [i for i, n in enumerate(ins[0].shape) if n == 1]
            try:
                out = np.expand_dims(ins[0], tuple(axes)) if kind == "Unsqueeze" else np.squeeze(ins[0], tuple(axes))
            except (ValueError, np.exceptions.AxisError):
                raise MinibloomError(f"{g.path}: {g.name(lid)}: bad axes {axes} for shape {ins[0].shape}") from None
        self.values[lid] = out
        return out

    def _convert(self, lid: str, x: np.ndarray) -> np.ndarray:
        """Integer destinations must hold the value exactly (a decompression converts integers to float); float
        destinations keep the float64 value: the CPU plugin decompresses in float32, where it is exact."""
        dest = self.g.data(lid).get("destination_type")
        if dest not in ELEMENT_TYPES:
            raise MinibloomError(f"{self.g.path}: {self.g.name(lid)}: destination_type {dest!r} is not supported")
        if dest in INTEGER_TYPES:
            if not np.all(x == np.trunc(x)):
                raise MinibloomError(f"{self.g.path}: {self.g.name(lid)}: converts non-integers to {dest}")
            return np.asarray(x, np.int64)
        return np.asarray(x, np.float64)


def _is_plain_float32(g: _Graph, lid: str) -> bool:
    return g.layers[lid].get("type") == "Const" and g.data(lid).get("element_type") == "f32"


def _weight_const(g: _Graph, lid: str) -> str:
    """The Const holding the stored numbers of a weight subgraph: the first Const up input 0 (the integers)."""
    cur = lid
    for _ in range(64):
        if g.layers[cur].get("type") == "Const":
            return cur
        cur = g.input(cur, 0)
    return lid


def _bloom_name(g: _Graph, consumer: str) -> str | None:
    """BLOOM's bare tensor name from the consuming MatMul / Gather's name, or None."""
    name = g.layers[consumer].get("name") or ""
    kind = g.layers[consumer].get("type")
    m = _LINEAR.search(name)
    if kind == "MatMul" and m:
        return f"{m.group(1)}.weight"
    if kind == "MatMul" and _HEAD.search(name):
        return "lm_head.weight"
    if kind == "Gather" and _EMBEDDING.search(name):
        return "word_embeddings.weight"
    return None


def _weights_of(g: _Graph, ev: _Evaluator, consumer: str) -> tuple[str, int, np.ndarray] | None:
    """(weight subgraph's root layer, consumer input index, matrix [out, in]) of one MatMul / Gather, or None."""
    kind = g.layers[consumer].get("type")
    if kind == "Gather":
        src = g.producer.get((consumer, 0))
        if src is None or not ev.is_constant(src):
            return None
        axis = ev.value(g.input(consumer, 2)) if g.n_inputs(consumer) > 2 else np.zeros(())
        if _ints(g, consumer, np.reshape(axis, -1), "axis") != [0] or int(g.data(consumer).get("batch_dims", 0)):
            return None  # not an embedding lookup (rows of a table)
        w = ev.value(src)
        return (src, 0, w) if w.ndim == 2 else None
    for index in (1, 0):
        src = g.producer.get((consumer, index))
        if src is None or not ev.is_constant(src):
            continue
        w = ev.value(src)
        if w.ndim != 2:
            return None
        flag = "transpose_b" if index == 1 else "transpose_a"
        transposed = g.data(consumer).get(flag, "false").lower() == "true"
        # input 1 of x @ W: [in, out] unless transpose_b; input 0 (W @ x): [out, in] unless transpose_a
        if (index == 1) != transposed:
            w = w.T
        return src, index, w
    return None


def read(xml_path) -> EngineWeights:
    """The dequantized weight matrices of an OpenVINO IR (``.xml`` with its ``.bin`` beside it), in float64.

    Raises ``MinibloomError`` naming the layer for an unsupported element type or op in a weight's subgraph, bytes
    outside the ``.bin``, a size disagreeing with the shape, or a malformed file.
    """
    xml_path = os.fspath(xml_path)
    if not os.path.isfile(xml_path):
        raise MinibloomError(f"{xml_path}: no such OpenVINO IR .xml file")
    g = _Graph(xml_path)
    ev = _Evaluator(g)
    matrices: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for lid, layer in g.layers.items():
        if layer.get("type") not in ("MatMul", "Gather"):
            continue
        found = _weights_of(g, ev, lid)
        if found is None or _is_plain_float32(g, found[0]) or found[2].dtype != np.float64:
            continue  # weights left in float32, or an integer table (indices, shapes)
        root, _, w = found
        key = _bloom_name(g, lid) or (g.layers[_weight_const(g, root)].get("name") or f"layer{root}")
        if key in matrices and not (matrices[key].shape == w.shape and np.array_equal(matrices[key], w)):
            raise MinibloomError(f"{xml_path}: two different weights map to {key!r} (second: {g.name(lid)})")
        matrices[key] = np.ascontiguousarray(w, np.float64)
    notes.extend(_compression_notes(g))
    version = g.root.get("version", "?")
    return EngineWeights(engine=f"openvino IR v{version} ({os.path.basename(xml_path)})", matrices=matrices,
                         activations=None, compute="float32", notes=notes)


def _compression_notes(g: _Graph) -> list[str]:
    """NNCF's weight-compression settings from the IR's ``<rt_info>`` (mode, group size, ...), when recorded."""
    wc = g.root.find("rt_info/nncf/weight_compression")
    if wc is None:
        return []
    keep = ("mode", "group_size", "ratio", "all_layers", "backup_mode")
    items = [f"{el.tag}={el.get('value')}" for el in wc if el.tag in keep]
    version = g.root.find("rt_info/nncf/version")
    nncf = f"nncf {version.get('value')}" if version is not None else "nncf"
    return [f"{nncf} weight compression: {', '.join(items)}"]
