"""Read the weights a quantized ONNX model multiplies by, dequantized in float64, with the ``onnx`` package.

Forms (operator semantics from the ONNX operator spec, onnx.ai/onnx/operators, and ONNX Runtime's contrib operators,
github.com/microsoft/onnxruntime ``docs/ContribOperators.md``):

- QDQ: ``DequantizeLinear(x, x_scale, x_zero_point)`` of a constant int8 / uint8 / int4 / uint4 (int16 / uint16)
  tensor: y = (x - zero_point) * scale, per tensor (scalar scale), per axis (1-D scale along ``axis``) or blocked
  (``block_size`` along ``axis``: scale and zero point repeated ``block_size`` times). quantize_static's QDQ form,
  and ``MatMulNBitsQuantizer``'s QDQ output.
- QOperator, ``onnxruntime.quantization.quantize_dynamic``: ``DynamicQuantizeLinear`` of the input, then
  ``MatMulInteger(a, b, a_zero_point, b_zero_point)`` on the constant int8 weight, ``Cast`` to float, and a ``Mul`` by
  (input scale x weight scale): the weight is (b - b_zero_point) * weight scale (scale per tensor or per column).
  Fused: ``DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, bias)`` (com.microsoft). An embedding quantized by
  ``GatherQuant`` is a ``Gather`` of the int8 table followed by ``DequantizeLinear``.
- QOperator, ``quantize_static``: ``QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp)``: the weight is
  (b - b_zp) * b_scale; activation scales are fixed at calibration time.
- ``MatMulNBits`` (com.microsoft; ``MatMulNBitsQuantizer``): B uint8 [N, n_blocks, blob] with ``bits``-bit codes
  packed low-first along K, scales [N * n_blocks], optional zero points (uint8 packed the same way per row, one per
  block, or float as the scales; default 2^(bits-1)): W[n, k] = (code - zero_point) * scale[n, k // block_size],
  already [out, in]. ``accuracy_level`` 4 computes with the input quantized to int8 per block of K (MLAS CompInt8).

Names: the MatMul / Gemm / Gather that consumes each weight (through Transpose / Reshape / Cast / Identity) gives its
orientation (MatMul computes x @ W, W [in, out]: returned transposed to [out, in]) and, from the exporter's node or
initializer names (``/transformer/h.0/self_attention/query_key_value/MatMul``), BLOOM's name; a weight whose name
cannot be derived is keyed by its initializer's name.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..errors import MinibloomError
from .engine_weights import EngineWeights

_PASS = ("Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten")
_MODULES = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_LAYER = re.compile(r"h[./_](\d+)[./_](self_attention|mlp)[./_](query_key_value|dense_h_to_4h|dense_4h_to_h|dense)"
                    r"(?![a-z_0-9])")
MAX_ELEMENTS = 1 << 34  # a packed MatMulNBits claim beyond this is a damaged file, not a model to unpack


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise MinibloomError("onnx is not installed; `pip install 'minibloom[test]'` (or `pip install onnx`)") from None
    return onnx, numpy_helper


def bloom_name(*names: str) -> str | None:
    """BLOOM's bare weight name from an exporter's node / initializer names (None: none of them says)."""
    for name in names:
        if not name:
            continue
        m = _LAYER.search(name)
        if m:
            return f"h.{int(m.group(1))}.{m.group(2)}.{m.group(3)}.weight"
        if re.search(r"(^|[/.])lm_head([/.]|$)", name):
            return "lm_head.weight"
        if re.search(r"word_embeddings([/.]|$)", name) and "layernorm" not in name:
            return "word_embeddings.weight"
    return None


class _Graph:
    """The main graph's constants (initializers and Constant nodes), producers and consumers."""

    def __init__(self, model, path: str):
        onnx, numpy_helper = _onnx()
        self.path, self.nh = path, numpy_helper
        g = model.graph
        if any(n.op_type in ("If", "Loop", "Scan") for n in g.node):
            self.note = "the graph has control-flow subgraphs; only the main graph was read"
        else:
            self.note = None
        self.const_protos = {t.name: t for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.const_protos[n.output[0]] = a.t
        self.cache: dict[str, np.ndarray] = {}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.nodes = list(g.node)

    def is_const(self, name: str) -> bool:
        if name in self.const_protos:
            return True
        n = self.producer.get(name)
        return n is not None and n.op_type == "Identity" and self.is_const(n.input[0])

    def const(self, name: str) -> np.ndarray:
        """The value of a constant tensor (an Identity of one too)."""
        if name in self.cache:
            return self.cache[name]
        n = self.producer.get(name)
        if name not in self.const_protos and n is not None and n.op_type == "Identity":
            return self.const(n.input[0])
        if name not in self.const_protos:
            raise MinibloomError(f"{self.path}: tensor {name!r} is not a constant")
        try:
            arr = self.nh.to_array(self.const_protos[name], base_dir=os.path.dirname(self.path))
        except Exception as e:  # noqa: BLE001 - onnx raises many types on damaged data
            raise MinibloomError(f"{self.path}: initializer {name!r} cannot be read ({e})") from None
        self.cache[name] = arr
        return arr

    def attr(self, node, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                onnx, _ = _onnx()
                return onnx.helper.get_attribute_value(a)
        return default

    def use(self, tensor: str, depth: int = 0):
        """The compute node consuming ``tensor`` (through pass-through ops) and how the weight reaches it:
        (node, input index, transposes on the way) or None."""
        perms = []
        for n in self.consumers.get(tensor, []):
            if n.op_type in ("MatMul", "Gemm", "Gather", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
                return n, list(n.input).index(tensor), perms
            if n.op_type in _PASS and depth < 8:
                found = self.use(n.output[0], depth + 1)
                if found is not None:
                    if n.op_type == "Transpose":
                        found[2].insert(0, self.attr(n, "perm"))
                    return found
        return None


def _broadcast_param(p: np.ndarray, shape: tuple, axis: int | None, block: int, what: str) -> np.ndarray:
    """A scale / zero point of DequantizeLinear broadcast to the data's shape (per tensor, per axis, or blocked)."""
    p = np.asarray(p, np.float64)
    if p.size == 1:
        return p.reshape(())
    ndim = len(shape)
    axis = (1 if axis is None else int(axis)) % max(ndim, 1)
    if block > 0:
        if p.ndim != ndim:
            raise MinibloomError(f"{what}: blocked scale of rank {p.ndim} for data of rank {ndim}")
        rep = np.repeat(p, block, axis=axis)
        idx = [slice(None)] * ndim
        idx[axis] = slice(0, shape[axis])
        rep = rep[tuple(idx)]
        if rep.shape != tuple(shape):
            raise MinibloomError(f"{what}: blocked scale of shape {p.shape} does not cover data {tuple(shape)}")
        return rep
    if p.ndim != 1 or p.shape[0] != shape[axis]:
        raise MinibloomError(f"{what}: per-axis scale of shape {p.shape} does not fit axis {axis} of {tuple(shape)}")
    view = [1] * ndim
    view[axis] = shape[axis]
    return p.reshape(view)


def dequantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int | None = 1,
                      block_size: int = 0, what: str = "DequantizeLinear") -> np.ndarray:
    """ONNX DequantizeLinear in float64: (x - zero_point) * scale, per tensor / per axis / blocked."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        raise MinibloomError(f"{what}: data of type {x.dtype} is not an integer tensor")
    s = _broadcast_param(scale, x.shape, axis, block_size, f"{what} scale")
    z = 0.0 if zero_point is None else _broadcast_param(zero_point, x.shape, axis, block_size, f"{what} zero point")
    if not np.all(np.isfinite(s)):
        raise MinibloomError(f"{what}: non-finite scale")
    return (x.astype(np.float64) - z) * s


def unpack_nbits(packed: np.ndarray, bits: int, count: int, what: str) -> np.ndarray:
    """Codes of ``bits`` bits packed low-first in the bytes of the last axis -> [..., count] integers."""
    if bits not in (2, 4, 8):
        raise MinibloomError(f"{what}: bits={bits} is not 2, 4 or 8")
    b = np.asarray(packed, np.uint8)
    per = 8 // bits
    codes = np.stack([(b >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=-1)
    codes = codes.reshape(*b.shape[:-1], b.shape[-1] * per)
    if codes.shape[-1] < count:
        raise MinibloomError(f"{what}: {codes.shape[-1]} packed codes, {count} needed")
    return codes[..., :count].astype(np.int64)


def matmul_nbits_weight(g: _Graph, node) -> np.ndarray:
    """The dequantized [N, K] weight of a com.microsoft MatMulNBits node."""
    what = f"{g.path}: MatMulNBits {node.name or node.output[0]}"
    K, N = int(g.attr(node, "K", 0)), int(g.attr(node, "N", 0))
    bits, block = int(g.attr(node, "bits", 4)), int(g.attr(node, "block_size", 0))
    if K <= 0 or N <= 0 or block < 16 or block & (block - 1) or K * N > MAX_ELEMENTS:
        raise MinibloomError(f"{what}: bad attributes K={K} N={N} block_size={block}")
    n_blocks = -(-K // block)
    blob = block * bits // 8
    B = g.const(node.input[1])
    if B.dtype != np.uint8 or B.size != N * n_blocks * blob:
        raise MinibloomError(f"{what}: B of {B.dtype} {B.shape}, expected uint8 [{N}, {n_blocks}, {blob}]")
    codes = unpack_nbits(B.reshape(N, n_blocks, blob), bits, block, what)  # [N, n_blocks, block]
    scales = np.asarray(g.const(node.input[2]), np.float64)
    if scales.size != N * n_blocks:
        raise MinibloomError(f"{what}: {scales.size} scales, expected {N} x {n_blocks}")
    scales = scales.reshape(N, n_blocks, 1)
    zp_name = node.input[3] if len(node.input) > 3 else ""
    if zp_name:
        zp = g.const(zp_name)
        per_row = -(-n_blocks * bits // 8)
        if zp.dtype == np.uint8 and zp.size == N * per_row:  # packed like B, one code per block
            zp = unpack_nbits(zp.reshape(N, per_row), bits, n_blocks, what).reshape(N, n_blocks, 1)
        elif zp.size == N * n_blocks:  # one value per block (float zero points)
            zp = np.asarray(zp, np.float64).reshape(N, n_blocks, 1)
        else:
            raise MinibloomError(f"{what}: {zp.size} zero points fit neither {N} x {per_row} packed bytes nor "
                                 f"{N} x {n_blocks} values")
    else:
        zp = float(1 << (bits - 1))
    if len(node.input) > 4 and node.input[4]:
        raise MinibloomError(f"{what}: g_idx (act-order) is not supported")
    w = (codes - zp) * scales
    return w.reshape(N, n_blocks * block)[:, :K]


def _weight_scale_after(g: _Graph, node) -> np.ndarray | None:
    """quantize_dynamic's MatMulInteger: the weight's scale, the constant factor of the Mul that scales the Cast
    output (Mul(Cast(MatMulInteger), Mul(input scale, weight scale)))."""
    out = node.output[0]
    for _ in range(3):  # MatMulInteger -> Cast -> Mul
        nxt = g.consumers.get(out, [])
        if len(nxt) != 1:
            return None
        n = nxt[0]
        if n.op_type == "Cast":
            out = n.output[0]
            continue
        if n.op_type != "Mul":
            return None
        other = n.input[1] if n.input[0] == out else n.input[0]
        if g.is_const(other):
            return g.const(other)
        p = g.producer.get(other)
        if p is None or p.op_type != "Mul":
            return None
        consts = [i for i in p.input if g.is_const(i)]
        return g.const(consts[0]) if len(consts) == 1 else None
    return None


def _gathered_table(g: _Graph, gather, table: str, scale, zp, axis, block: int, where: str) -> np.ndarray:
    """GatherQuant's embedding: the int table gathered along axis 0, then DequantizeLinear on the rows; a scale per
    column of the gathered rows (DequantizeLinear's last axis) is a scale per column of the table."""
    t = g.const(table)
    if int(g.attr(gather, "axis", 0)) != 0 or t.ndim != 2:
        raise MinibloomError(f"{where}: dequantizes a Gather of {table} this reader cannot invert")
    if np.asarray(scale).size == 1 and (zp is None or np.asarray(zp).size == 1):
        return dequantize_linear(t, scale, zp, 1, 0, where)
    if block or np.asarray(scale).ndim != 1:
        raise MinibloomError(f"{where}: a per-row or blocked scale after a Gather cannot be inverted")
    return dequantize_linear(t, scale, zp, 1, 0, where)


def _orient(w: np.ndarray, compute, index: int, perms: list, g: _Graph) -> tuple[np.ndarray, bool]:
    """The weight as the compute node sees it (transposes applied) in [out, in] when the orientation is known."""
    for perm in perms:
        w = np.transpose(w, perm) if perm is not None else w.T
    if w.ndim != 2:
        return w, False
    op = compute.op_type
    if op in ("MatMul", "MatMulInteger", "FusedMatMul") and index == 1:
        return w.T, True
    if op == "QLinearMatMul" and index == 3:
        return w.T, True
    if op == "Gemm" and index == 1:
        return (w if g.attr(compute, "transB", 0) else w.T), True
    if op == "Gather" and index == 0:
        return w, True  # an embedding table [vocab, hidden]
    return w, False


def read(path: str) -> EngineWeights:
    """The dequantized weights of the quantized ONNX model at ``path`` (QDQ, quantize_dynamic, quantize_static,
    MatMulNBits). ``activations``: "uint8-per-tensor" when the graph quantizes activations at run time
    (DynamicQuantizeLinear, DynamicQuantizeMatMul), "static" for fixed activation scales (QLinearMatMul, a
    QuantizeLinear of a non-constant tensor), "int8-per-group" for MatMulNBits with accuracy_level 4, else None."""
    onnx, _ = _onnx()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MinibloomError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise MinibloomError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node:
        raise MinibloomError(f"{path}: the ONNX graph has no nodes")
    g = _Graph(model, path)
    matrices: dict[str, np.ndarray] = {}
    notes: list[str] = [g.note] if g.note else []
    ops = {n.op_type for n in g.nodes}
    group = None

    def put(w: np.ndarray, source: str, names: tuple, compute=None, index=None, perms=()):
        oriented, known = (w, True) if compute is None else _orient(w, compute, index, list(perms), g)
        name = bloom_name(*names) if known else None
        if name is None:
            name = source
            if not known:
                notes.append(f"{source}: orientation unknown (kept as stored)")
        if name in matrices and not np.array_equal(matrices[name], oriented):
            raise MinibloomError(f"{path}: two different quantized tensors map to {name}")
        matrices[name] = oriented

    for node in g.nodes:
        op, where = node.op_type, f"{path}: {node.op_type} {node.name or node.output[0]}"
        if op == "DequantizeLinear":
            x = node.input[0]
            axis, block = g.attr(node, "axis", 1), int(g.attr(node, "block_size", 0) or 0)
            scale = g.const(node.input[1]) if g.is_const(node.input[1]) else None
            zp = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] and g.is_const(node.input[2]) else None
            if g.is_const(x) and scale is not None:
                w = dequantize_linear(g.const(x), scale, zp, axis, block, where)
                found = g.use(node.output[0])
                if found is None:
                    if w.ndim >= 2:
                        put(w, x, (x, node.name))
                        notes.append(f"{x}: no MatMul/Gemm/Gather consumer found; kept as stored")
                    continue
                compute, index, perms = found
                if w.ndim == 2:
                    put(w, x, (compute.name, node.name, x), compute, index, perms)
            elif x in g.producer and g.producer[x].op_type == "Gather" and scale is not None:
                gather = g.producer[x]
                table = gather.input[0]
                if g.is_const(table):
                    put(_gathered_table(g, gather, table, scale, zp, axis, block, where), table,
                        (gather.name, table))
        elif op == "MatMulInteger" and len(node.input) > 1 and g.is_const(node.input[1]):
            b = g.const(node.input[1])
            bzp = g.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            scale = _weight_scale_after(g, node)
            if scale is None:
                raise MinibloomError(f"{where}: cannot find the weight scale multiplied in after the product")
            put(dequantize_linear(b, scale, bzp, 1, 0, where), node.input[1], (node.name, node.input[1]), node, 1)
        elif op == "DynamicQuantizeMatMul" and g.is_const(node.input[1]):
            zp = g.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            w = dequantize_linear(g.const(node.input[1]), g.const(node.input[2]), zp, 1, 0, where)
            put(w.T, node.input[1], (node.name, node.input[1]))
        elif op == "QLinearMatMul" and g.is_const(node.input[3]):
            w = dequantize_linear(g.const(node.input[3]), g.const(node.input[4]), g.const(node.input[5]), 1, 0,
                                  where)
            put(w.T, node.input[3], (node.name, node.input[3]))
        elif op == "MatMulNBits":
            put(matmul_nbits_weight(g, node), node.input[1], (node.name, node.input[1]))
            if int(g.attr(node, "accuracy_level", 0) or 0) == 4:
                group = int(g.attr(node, "block_size", 0))
    dynamic = bool(ops & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"})
    static = "QLinearMatMul" in ops or any(
        n.op_type == "QuantizeLinear" and not g.is_const(n.input[0]) for n in g.nodes)
    if dynamic:
        activations = "uint8-per-tensor"
    elif static:
        activations = "static"
        notes.append("static quantization: activation scales fixed at calibration time (not emulated)")
    elif group is not None:
        activations = "int8-per-group"
        notes.append(f"MatMulNBits accuracy_level 4: input quantized to int8 per block of {group}")
    else:
        activations = None
    if not matrices:
        notes.append("no quantized weight in the graph")
    unnamed = [k for k in matrices if not (k.startswith("h.") or k in ("lm_head.weight", "word_embeddings.weight"))]
    if unnamed:
        notes.append(f"{len(unnamed)} weight(s) keyed by initializer name (map by value)")
    compute = "float16" if _float16_graph(model) else "float32"
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return EngineWeights(engine=f"onnx ({producer or 'unknown producer'}; {', '.join(sorted(ops & _QOPS))})",
                         matrices=matrices, activations=activations, compute=compute,
                         group=group if activations == "int8-per-group" else None, notes=notes)


_QOPS = {"DequantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulNBits",
         "DynamicQuantizeLinear", "QuantizeLinear"}


def _float16_graph(model) -> bool:
    onnx, _ = _onnx()
    outs = [o for o in model.graph.output if o.name == "logits"] or list(model.graph.output[:1])
    return bool(outs) and outs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
