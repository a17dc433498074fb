"""The weights a transformers BLOOM quantized in torch multiplies by, dequantized in float64 from the integers,
scales and zero points its modules hold (never through the engine's own float32 ``dequantize``).

Follows each library's own storage, as its dequantize computes it:

- optimum-quanto (``optimum/quanto/tensor/qbytes.py``, ``qbits.py``, ``grouped.py``): ``QLinear.qweight`` (frozen or
  not) is a ``WeightQBytesTensor`` (qint8: ``_data * _scale``, one scale per output row) or a ``WeightQBitsTensor``
  (qint4/qint2: ``_data`` packed, grouped to ``[n_groups, group]``; ``(_data - _shift) * _scale`` for an integer
  shift, ``_data * _scale - _shift`` for a float one; ``ungroup`` restores ``[out, in]``).
- torchao (``torchao/quantization/quantize_/workflows/int8/int8_tensor.py``, ``intx/intx_unpacked_to_int8_tensor.py``,
  ``quant_primitives.dequantize_affine``): an ``Int8Tensor`` (``Int8WeightOnlyConfig``) or ``IntxUnpackedToInt8Tensor``
  (``IntxWeightOnlyConfig``, e.g. int4 per group: torchao's int4 that runs on CPU without its compiled kernels)
  weight: ``(qdata - zero_point) * scale`` per ``block_size`` block. ``Int4WeightOnlyConfig``'s packed tensors are
  refused by type.
- HQQ (``hqq/core/quantize.py`` ``Quantizer.dequantize``): an ``HQQLinear``: ``W_q`` unpacked by its ``packing``,
  ``((W_r - zero) * scale).reshape(shape)``; quantized scales/zeros and offloaded meta are refused.
- bitsandbytes (``bitsandbytes/functional.py``): ``Linear4bit`` (NF4/FP4, nested absmax or not) with the maths of
  ``minibloom.formats.bnb``; ``Linear8bitLt``: ``CB * SCB / 127`` per row, whose CPU and GPU products also quantize
  the activations per row (``activations="int8-per-row"``).

Matrices are keyed by BLOOM's bare names (``h.0.self_attention.query_key_value.weight``, ``lm_head.weight``) in
transformers' [out, in] layout. Linear layers left in floating point are not listed. A module holding a quantized
weight of a kind not listed above is a ``MinibloomError`` naming the module and its type.
"""

from __future__ import annotations

import numpy as np

from ..errors import MinibloomError
from .engine_weights import EngineWeights

_FLOATS = ("float64", "float32", "float16", "bfloat16")
_LIBRARIES = {"optimum": "optimum-quanto"}  # top-level package -> the name the engine is known by


def _np(t, dtype=np.float64) -> np.ndarray:
    """A torch tensor (any dtype, bfloat16 too) -> a NumPy array in ``dtype`` (exact: every float widens)."""
    import torch

    t = t.detach().cpu()
    if t.dtype.is_floating_point:
        t = t.to(torch.float64)
    return t.numpy().astype(dtype, copy=False)


def _ints(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise MinibloomError(f"expected integer codes, got a {t.dtype} tensor")
    return t.to(torch.int64).numpy()


def _rounded(w: np.ndarray, dtype) -> np.ndarray:
    """The float64 weight as the engine hands it to its product: rounded to its 16-bit output dtype (float16,
    bfloat16), if it dequantizes to one; float32 and wider outputs stay exact (their rounding is float32 noise)."""
    name = str(dtype).replace("torch.", "")
    if name == "float16":
        return w.astype(np.float16).astype(np.float64)
    if name == "bfloat16":
        from ..formats.safetensors import round_to_bf16

        return round_to_bf16(w.astype(np.float32)).astype(np.float64)
    return w


def _bloom_name(module_name: str) -> str:
    """``transformer.h.0.mlp.dense_h_to_4h`` -> ``h.0.mlp.dense_h_to_4h.weight`` (``BloomModel`` has no prefix)."""
    name = module_name[len("transformer."):] if module_name.startswith("transformer.") else module_name
    return f"{name}.weight"


def _ungroup(grouped: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """optimum-quanto's ``ungroup`` (``tensor/grouped.py``)."""
    if grouped.shape == tuple(shape):
        return grouped
    if axis == 0:
        return grouped.reshape(shape)
    group = grouped.shape[0]
    axis_dim = shape[axis]
    n_groups = grouped.size // axis_dim // group
    return grouped.reshape(group, axis_dim, n_groups).transpose(2, 0, 1).reshape(shape)


def _quanto(qw, where: str) -> np.ndarray:
    """An optimum-quanto weight tensor (``WeightQBytesTensor`` or plain ``WeightQBitsTensor``) in float64."""
    kind = type(qw).__name__
    shape = tuple(qw.shape)
    if kind == "WeightQBytesTensor":
        if qw.qtype.is_floating_point:
            raise MinibloomError(f"{where}: optimum-quanto float8 weights ({qw.qtype}) are not supported")
        return _rounded(_ints(qw._data) * _np(qw._scale), qw._scale.dtype)
    if kind != "WeightQBitsTensor":  # TinyGemm / AWQ / Marlin variants reorder their codes for a kernel
        raise MinibloomError(f"{where}: optimum-quanto weight of type {kind} is not supported (only "
                             "WeightQBytesTensor and WeightQBitsTensor)")
    data = qw._data
    data = data.unpack() if type(data).__name__ == "PackedTensor" else data
    q = _ints(data)
    shift, scale = qw._shift, _np(qw._scale)
    if shift.dtype.is_floating_point:
        w = q * scale - _np(shift)
    else:
        w = (q - _ints(shift)) * scale
    return _rounded(_ungroup(w, qw.axis, shape) if qw.axis is not None else w, qw._scale.dtype)


def _torchao(w, where: str) -> np.ndarray:
    """A torchao ``Int8Tensor`` / ``IntxUnpackedToInt8Tensor``: ``(qdata - zero_point) * scale``, one scale (and zero
    point) per ``block_size`` block."""
    q = _ints(w.qdata)
    block = list(w.block_size)
    if len(block) != q.ndim or any(b <= 0 or n % b for b, n in zip(block, q.shape)):
        raise MinibloomError(f"{where}: torchao block_size {block} does not tile the weight's shape {list(q.shape)}")
    grid = tuple(n // b for b, n in zip(block, q.shape))
    scale = _np(w.scale).reshape(grid)
    zero = np.zeros(grid) if w.zero_point is None else _np(w.zero_point).reshape(grid)
    for axis, b in enumerate(block):
        scale, zero = np.repeat(scale, b, axis), np.repeat(zero, b, axis)
    return _rounded((q - zero) * scale, w.dtype)


def _hqq(module, where: str) -> np.ndarray:
    """An ``HQQLinear``: its packed codes unpacked by HQQ's own bit unpacker, then ``(W_r - zero) * scale``."""
    import torch
    from hqq.core.quantize import Quantizer

    meta = module.meta
    if any(meta.get(k) for k in ("quant_scale", "quant_zero", "offload_meta")) or "zero_scale" in meta:
        raise MinibloomError(f"{where}: HQQLinear with quantized or offloaded scales/zeros is not supported "
                             "(quantize with scale_quant_params=None, zero_quant_params=None, offload_meta=False)")
    W_q = module.W_q
    if meta.get("packing"):
        if meta.get("view_as_float"):
            W_q = W_q.view(meta["unpack_view_dtype"])
        W_r = Quantizer.unpack[meta["packing"]](W_q, dtype=torch.int32)
        if meta["nbits"] == 3:
            shape = meta["shape"]
            W_r = W_r[: meta["group_size"] if meta["axis"] == 0 else shape[0] * shape[1] // meta["group_size"]]
    else:
        W_r = W_q
    w = (_ints(W_r) - _np(meta["zero"])) * _np(meta["scale"])
    return _rounded(w.reshape(tuple(meta["shape"])), meta.get("compute_dtype", "float16"))


def _bnb4_fused(module, qs) -> bool:
    """Whether bitsandbytes runs this ``Linear4bit`` with its fused CPU kernel (``gemv_4bit`` on AVX512-BF16 CPUs,
    once in eval mode): bfloat16 activations and absmax, weights in bfloat16."""
    if getattr(qs, "packing_format_for_cpu", False):
        return True
    return (module is not None and getattr(module, "support_avx512bf16_for_cpu", False) and not module.training
            and module.weight.device.type == "cpu")


def _bnb4(weight, where: str, module=None) -> tuple[np.ndarray, bool]:
    """A bitsandbytes ``Params4bit``, with ``minibloom.formats.bnb``'s decoding in float64; (matrix, fused) where
    ``fused`` says the CPU kernel multiplies by it in bfloat16 (``_bnb4_fused``: absmax rounded to bfloat16, then
    each weight)."""
    import torch

    from ..formats.bnb import decode_4bit, nested_absmax

    qs = weight.quant_state
    if qs is None:
        raise MinibloomError(f"{where}: bitsandbytes Params4bit not quantized yet (move it to a device first)")
    shape = tuple(qs.shape)
    bs = int(qs.blocksize)
    code = _np(qs.code)
    fused = _bnb4_fused(module, qs)
    data = weight.data.detach().cpu().contiguous()
    if getattr(qs, "packing_format_for_cpu", False):  # already repacked: [N, K/2] in 32-row blocks, absmax [K/bs, N]
        n, k = shape
        packed = data.view(torch.uint8).numpy().reshape(-1, 32)
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).reshape(n // 32, k // 2, 32, 2)
        q = q.transpose(0, 2, 1, 3).reshape(n, k)  # bitsandbytes' _convert_weight_packed_for_cpu_inverse
        absmax = _np(qs.absmax).T.reshape(-1)
        w = (code[q.reshape(-1)] * absmax[np.arange(n * k) // bs]).reshape(shape)
        return _rounded(w, torch.bfloat16), True
    if qs.nested:
        s2 = qs.state2
        work = np.float32 if fused else np.float64  # the fused kernel's absmax: float32, then bfloat16
        absmax = nested_absmax(_ints(qs.absmax), _np(s2.code), _np(s2.absmax), int(s2.blocksize),
                               float(_np(qs.offset)), work).astype(np.float64)
    else:
        absmax = _np(qs.absmax)
    packed = data.view(-1).view(torch.uint8).numpy()
    if packed.size * 2 < int(np.prod(shape)):
        raise MinibloomError(f"{where}: {packed.size} bytes of 4-bit codes for a weight of shape {list(shape)}")
    if fused:
        absmax = _rounded(absmax, torch.bfloat16)
        return _rounded(decode_4bit(packed, code, absmax, bs, shape, np.float64), torch.bfloat16), True
    return _rounded(decode_4bit(packed, code, absmax, bs, shape, np.float64), qs.dtype), False


def _bnb8(module, where: str) -> np.ndarray:
    """A bitsandbytes ``Linear8bitLt``: int8 rows ``CB`` times ``SCB / 127`` (its products quantize the activations
    per row; an outlier threshold, LLM.int8()'s float16 decomposition, is refused)."""
    threshold = getattr(module.state, "threshold", 0.0)
    if threshold:
        raise MinibloomError(f"{where}: bitsandbytes Linear8bitLt with threshold={threshold} (outlier columns in "
                             "float16) is not supported; use threshold=0.0")
    cb = getattr(module.weight, "CB", None)
    scb = getattr(module.weight, "SCB", None)
    if cb is None or scb is None:
        cb, scb = getattr(module.state, "CB", None), getattr(module.state, "SCB", None)
    if cb is None or scb is None:
        raise MinibloomError(f"{where}: bitsandbytes Linear8bitLt without int8 weights (CB/SCB); quantize it first "
                             "(has_fp16_weights=False, moved to a device)")
    return _ints(cb) * (_np(scb)[:, None] / 127.0)


def _plain(t) -> bool:
    """A floating-point torch tensor or Parameter, not a quantized tensor subclass."""
    import torch

    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype.is_floating_point


def _module_weight(module, name: str):
    """(matrix or None, activations or None) of one module; None when the module holds no quantized weight."""
    kind = type(module).__name__
    where = f"module {name!r} ({type(module).__module__}.{kind})"
    lib = type(module).__module__.split(".")[0]
    if kind == "HQQLinear":
        return _hqq(module, where), None
    if lib == "bitsandbytes" and kind == "Linear8bitLt":
        return _bnb8(module, where), "int8-per-row"
    if lib == "optimum" and hasattr(module, "weight_qtype"):  # quanto's QModuleMixin (QLinear, QConv, ...)
        if getattr(module, "activation_qtype", None) is not None:
            raise MinibloomError(f"{where}: optimum-quanto activation quantization ({module.activation_qtype}) is "
                                 "not supported; quantize the weights only")
        if module.weight_qtype is None:
            return None, None
        return _quanto(module.qweight, where), None
    w = module._parameters.get("weight")
    if w is None:
        w = module._buffers.get("weight")
    if w is None:
        return None, None
    wkind = type(w).__name__
    if wkind == "Params4bit":
        w, fused = _bnb4(w, where, module)
        return w, ("bf16-kernel" if fused else None)
    if wkind in ("Int8Tensor", "IntxUnpackedToInt8Tensor") and type(w).__module__.startswith("torchao"):
        if any(getattr(w, k, None) is not None for k in ("act_quant_kwargs", "act_pre_scale",
                                                           "activation_quantization")):
            raise MinibloomError(f"{where}: torchao {wkind} with activation quantization or pre-scaling is not "
                                 "supported (Int8WeightOnlyConfig, IntxWeightOnlyConfig only)")
        return _torchao(w, where), None
    if wkind in ("WeightQBytesTensor", "WeightQBitsTensor"):
        return _quanto(w, where), None
    if not _plain(w):
        raise MinibloomError(f"{where}: weight of type {type(w).__module__}.{wkind} ({w.dtype}) is not a quantized "
                             "weight minibloom can read (optimum-quanto, torchao Int8Tensor / "
                             "IntxUnpackedToInt8Tensor, HQQLinear, bitsandbytes Linear4bit / Linear8bitLt)")
    return None, None


def _compute(module) -> str:
    """The model's floating-point precision: the dtype of its first plain float parameter."""
    for p in module.parameters():
        if _plain(p):
            name = str(p.dtype).replace("torch.", "")
            if name in _FLOATS:
                return name
    return "float32"


def read(module) -> EngineWeights:
    """The dequantized weights (float64, BLOOM names, [out, in]) of a transformers ``BloomForCausalLM`` /
    ``BloomModel`` quantized in torch (optimum-quanto, torchao, HQQ, bitsandbytes)."""
    try:
        import torch
    except ImportError as e:
        raise MinibloomError("read_torch needs torch: pip install 'minibloom[test]'") from e
    if not isinstance(module, torch.nn.Module):
        raise MinibloomError(f"module: expected a torch.nn.Module (a quantized transformers BLOOM), got "
                             f"{type(module).__name__}")
    matrices: dict[str, np.ndarray] = {}
    activations = set()
    libs = set()
    fused: list[str] = []
    with torch.no_grad():
        for name, sub in module.named_modules():
            w, act = _module_weight(sub, name)
            if w is None:
                continue
            if not np.all(np.isfinite(w)):
                raise MinibloomError(f"module {name!r}: NaN or inf in its dequantized weight")
            matrices[_bloom_name(name)] = w
            if act == "bf16-kernel":  # not an activation quantization: bfloat16 arithmetic in these products
                fused.append(name)
                act = None
            activations.add(act)
            owner = sub if type(sub).__module__.split(".")[0] != "torch" else sub.weight
            libs.add(_LIBRARIES.get(type(owner).__module__.split(".")[0], type(owner).__module__.split(".")[0]))
    if not matrices:
        raise MinibloomError(f"module: {type(module).__name__} holds no quantized weight (optimum-quanto, torchao, "
                             "HQQ or bitsandbytes)")
    if len(activations) > 1:
        raise MinibloomError("module: mixes weight-only layers with layers that quantize their activations "
                             "(bitsandbytes Linear8bitLt); one reference cannot emulate both")
    notes = []
    compute = _compute(module)
    if fused:
        compute = "bfloat16"
        notes.append(f"bitsandbytes runs {len(fused)} Linear4bit layers with its fused AVX512-BF16 CPU kernel (eval "
                     "mode): bfloat16 activations and weights, so the port is a bfloat16 one (--kind bfloat16)")
    return EngineWeights(engine=f"torch ({', '.join(sorted(libs))})", matrices=matrices,
                         activations=activations.pop(), compute=compute, notes=notes)
