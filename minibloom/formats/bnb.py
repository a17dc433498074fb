"""bitsandbytes 4-bit (NF4 / FP4) BLOOM checkpoints, as transformers saves them, decoded with NumPy.

Follows bitsandbytes ``QuantState.as_dict(packed=True)`` / ``dequantize_4bit`` (``bitsandbytes/functional.py``,
``backends/default/ops.py``) and transformers' ``BitsAndBytesConfig`` (the ``quantization_config`` in config.json).
Per quantized ``Linear`` the file holds::

    <m>.weight                               packed 4-bit codes, two per byte, HIGH nibble first (any storage dtype)
    <m>.weight.quant_map                     the 16-entry code table (NF4 or FP4), float32
    <m>.weight.absmax                        one scale per ``blocksize`` weights: float32, or uint8 codes when nested
    <m>.weight.nested_absmax / nested_quant_map   double quantization: float32 scale per 256 absmax codes, 256-entry map
    <m>.weight.quant_state.bitsandbytes__nf4 JSON: quant_type, blocksize, dtype, shape (+ nested_blocksize, offset)

    absmax = nested_quant_map[absmax_code] * nested_absmax[block // nested_blocksize] + nested_offset   (if nested)
    W      = quant_map[code] * absmax[flat_index // blocksize], reshaped to ``shape``, rounded to ``dtype``

all in float32, exactly as bitsandbytes computes it. Everything else (embedding, LayerNorms, biases) is a plain tensor.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import BloomConfig
from ..errors import MinibloomError, shown
from ..jsonfile import parse_json
from .safetensors import round_to_bf16
from .weights import (Checkpoint, _progress, check_finite, check_layer_count, check_names, embedding_rows,
                      expected_shapes, nest)

STATE_PREFIX = "quant_state.bitsandbytes__"
QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
OUT_DTYPES = ("float16", "bfloat16", "float32")
MAX_BLOCKSIZE = 1 << 16  # bitsandbytes uses 64 .. 4096
F32_MAX = float(np.finfo(np.float32).max)  # nested_offset is added in float32


def check_quantization_config(qc: dict, where: str) -> None:
    """Accept transformers' 4-bit bitsandbytes configs only (8-bit uses another format)."""
    if qc.get("quant_method") != "bitsandbytes":
        raise MinibloomError(f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}; "
                             "minibloom reads 'bitsandbytes' 4-bit checkpoints (and .gguf files)")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise MinibloomError(f"{where}: bitsandbytes 8-bit (load_in_8bit) checkpoints are not supported, only 4-bit")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise MinibloomError(f"{where}: quantization_config has neither load_in_4bit nor load_in_8bit set")
    qt = qc.get("bnb_4bit_quant_type", "fp4")
    if qt not in ("nf4", "fp4"):
        raise MinibloomError(f"{where}: quantization_config.bnb_4bit_quant_type {qt!r} is not 'nf4' or 'fp4'")


def round_to(x: np.ndarray, dtype_name: str) -> np.ndarray:
    """float32 -> the value bitsandbytes returns in ``dtype_name`` (round to nearest even), back in float32."""
    if dtype_name == "float32":
        return x
    if dtype_name == "float16":
        return x.astype(np.float16).astype(np.float32)
    return round_to_bf16(x)


def _state(ckpt: Checkpoint, name: str) -> tuple[str, dict]:
    """The one ``<name>.quant_state.bitsandbytes__*`` tensor of a quantized weight, parsed."""
    keys = [k for k in ckpt.where if k.startswith(f"{name}.{STATE_PREFIX}")]
    if len(keys) != 1:
        raise MinibloomError(f"{ckpt.describe(name)}: expected one '{name}.{STATE_PREFIX}<nf4|fp4>' tensor, "
                             f"found {len(keys)}")
    key = keys[0]
    raw = ckpt.raw(key)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise MinibloomError(f"{ckpt.describe(key)}: quant state must be a 1-D uint8 tensor of JSON bytes")
    meta = parse_json(raw.tobytes(), f"{ckpt.describe(key)}: quant state", max_bytes=1 << 16)
    if not isinstance(meta, dict):
        raise MinibloomError(f"{ckpt.describe(key)}: quant state is not valid JSON (not an object)")
    return key, meta


def _field(meta: dict, field: str, where: str, check, what: str):
    v = meta.get(field)
    if v is None or not check(v):
        raise MinibloomError(f"{where}: quant state field {field!r} must be {what}, got {shown(v)}")
    return v


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _floats(ckpt: Checkpoint, key: str, n: int, owner: str) -> np.ndarray:
    if key not in ckpt.where:
        raise MinibloomError(f"{ckpt.describe(owner)}: missing {key!r}")
    info = ckpt.info(key)
    if info.dtype not in ("F32", "F16", "BF16", "F64") or tuple(info.shape) != (n,):
        raise MinibloomError(f"{ckpt.describe(key)}: expected a float tensor of shape [{n}], "
                             f"got {info.dtype} {list(info.shape)}")
    return ckpt.get(key, np.float32)


def _code_table(ckpt: Checkpoint, key: str, n: int, name: str) -> np.ndarray:
    """A code table (``quant_map``, ``nested_quant_map``): bitsandbytes normalises its NF4, FP4 and dynamic 8-bit
    tables to a largest magnitude of exactly 1, so an entry outside [-1, 1] (or NaN) is a forged table whose
    weights could overflow the forward pass."""
    table = _floats(ckpt, key, n, name)
    if not np.all(np.abs(table) <= 1):
        bad = int(np.flatnonzero(~(np.abs(table) <= 1))[0])
        raise MinibloomError(f"{ckpt.describe(key)}: entry {bad} is {float(table[bad])!r}; bitsandbytes' code tables "
                             "lie in [-1, 1]")
    return table


def nested_absmax(codes: np.ndarray, nested_map: np.ndarray, nested_scale: np.ndarray, nested_blocksize: int,
                  offset: float, dtype=np.float32) -> np.ndarray:
    """Double quantization: ``nested_map[code] * nested_scale[block // nested_blocksize] + offset`` per block of
    4-bit weights (bitsandbytes computes it in float32; ``minibloom.oracle.read_torch`` in float64)."""
    codes = np.asarray(codes).astype(np.intp).reshape(-1)
    scale = np.asarray(nested_scale).astype(dtype).reshape(-1)
    return np.asarray(nested_map).astype(dtype)[codes] * scale[np.arange(codes.size) // nested_blocksize] \
        + np.asarray(offset, dtype)


def decode_4bit(packed: np.ndarray, code: np.ndarray, absmax: np.ndarray, blocksize: int, shape: tuple[int, ...],
                dtype=np.float32) -> np.ndarray:
    """Packed 4-bit codes (two per byte, HIGH nibble first) -> ``code[q] * absmax[flat_index // blocksize]`` in
    ``dtype``, reshaped to ``shape``: bitsandbytes' ``dequantize_4bit`` before its rounding to the output dtype."""
    n = math.prod(shape)
    packed = np.asarray(packed).reshape(-1).view(np.uint8)
    q = np.empty(packed.size * 2, np.uint8)
    q[0::2] = packed >> 4  # high nibble first (bitsandbytes), unlike GGUF's low-nibble-first Q4_0
    q[1::2] = packed & 0x0F
    scale = np.asarray(absmax).astype(dtype).reshape(-1)
    return (np.asarray(code).astype(dtype)[q[:n]] * scale[np.arange(n) // blocksize]).reshape(shape)


def dequantize_4bit(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One bitsandbytes 4-bit weight -> float32 array of ``shape`` (bnb's value in its stored ``dtype``)."""
    key, meta = _state(ckpt, name)
    where = ckpt.describe(key)
    qtype = key.rsplit("__", 1)[1]
    _field(meta, "quant_type", where, lambda v: v == qtype, f"{qtype!r} (as in the tensor name)")
    bs = _field(meta, "blocksize", where, lambda v: _int(v) and v <= MAX_BLOCKSIZE,
                f"a positive integer up to {MAX_BLOCKSIZE}")
    out_dtype = _field(meta, "dtype", where, lambda v: v in OUT_DTYPES, f"one of {OUT_DTYPES}")
    _field(meta, "shape", where, lambda v: isinstance(v, list) and tuple(v) == tuple(shape),
           f"the weight's shape {list(shape)}")
    n = math.prod(shape)
    n_blocks = -(-n // bs)

    packed = np.ascontiguousarray(ckpt.raw(name)).reshape(-1).view(np.uint8)  # any quant_storage: raw bytes
    if packed.size != (n + 1) // 2:
        raise MinibloomError(f"{ckpt.describe(name)}: {packed.size} bytes of packed 4-bit codes, expected "
                             f"{(n + 1) // 2} for shape {list(shape)}")
    code = _code_table(ckpt, f"{name}.quant_map", 16, name)

    nested = f"{name}.nested_absmax" in ckpt.where
    if nested:
        nbs = _field(meta, "nested_blocksize", where, lambda v: _int(v) and v <= MAX_BLOCKSIZE,
                     f"a positive integer up to {MAX_BLOCKSIZE}")
        # compared as is: a huge int would overflow math.isfinite, and NaN fails every comparison
        offset = _field(meta, "nested_offset", where, lambda v: isinstance(v, (int, float)) and not isinstance(
            v, bool) and abs(v) <= F32_MAX, "a finite float32 number")
        akey = f"{name}.absmax"
        if akey not in ckpt.where:
            raise MinibloomError(f"{ckpt.describe(name)}: missing {akey!r}")
        a_info = ckpt.info(akey)
        if a_info.dtype != "U8" or tuple(a_info.shape) != (n_blocks,):
            raise MinibloomError(f"{ckpt.describe(akey)}: expected uint8 codes of shape [{n_blocks}] (double "
                                 f"quantization), got {a_info.dtype} {list(a_info.shape)}")
        acodes = ckpt.raw(akey).astype(np.intp)
        nmap = _code_table(ckpt, f"{name}.nested_quant_map", 256, name)
        nabs = _floats(ckpt, f"{name}.nested_absmax", -(-n_blocks // nbs), name)
        absmax = nested_absmax(acodes, nmap, nabs, nbs, offset)
    else:
        if f"{name}.nested_quant_map" in ckpt.where:
            raise MinibloomError(f"{ckpt.describe(name)}: nested_quant_map without nested_absmax")
        absmax = _floats(ckpt, f"{name}.absmax", n_blocks, name)

    w = round_to(decode_4bit(packed, code, absmax, bs, shape), out_dtype)
    if not np.all(np.isfinite(w)):
        raise MinibloomError(f"{ckpt.describe(name)}: NaN or inf after dequantization (corrupt absmax?)")
    return w


def read_bnb_params(ckpt: Checkpoint, cfg: BloomConfig, np_dtype, config_path: str, progress=None) -> dict:
    """Every tensor of a transformers bitsandbytes 4-bit BLOOM checkpoint, dequantized, nested under HF names."""
    where = ckpt.files[0].path
    check_quantization_config(cfg.quantization_config or {}, config_path)
    vocab = embedding_rows(ckpt, cfg, where)
    check_layer_count(cfg, len(ckpt.where), where)
    want = expected_shapes(cfg, vocab)
    quantized = {n for n in want if any(k.startswith(f"{n}.{STATE_PREFIX}") for k in ckpt.where)} \
        if any(STATE_PREFIX in k for k in ckpt.where) else set()
    allowed = set(want) | {"lm_head.weight"}
    for n in quantized:
        allowed |= {f"{n}.{s}" for s in QUANT_SUFFIXES}
        allowed |= {k for k in ckpt.where if k.startswith(f"{n}.{STATE_PREFIX}")}
    check_names(ckpt.where, want, where, cfg.n_layer, allowed)

    flat = {}
    bar = _progress(sum(ckpt.info(n).nbytes for n in want), "dequantizing 4-bit", progress)
    for name, shape in want.items():
        if name in quantized:
            flat[name] = dequantize_4bit(ckpt, name, shape).astype(np_dtype, copy=False)
        else:
            info = ckpt.info(name)
            if info.dtype not in ("F64", "F32", "F16", "BF16"):
                raise MinibloomError(f"{ckpt.describe(name)}: dtype {info.dtype} is not a float type "
                                     "(and there is no bitsandbytes quant_state for it)")
            if tuple(info.shape) != shape:
                raise MinibloomError(f"{ckpt.describe(name)}: shape {list(info.shape)}, expected {list(shape)}")
            flat[name] = check_finite(ckpt.get(name, np_dtype), ckpt.describe(name))
        bar.update(ckpt.info(name).nbytes)
    bar.close()
    return nest(flat)
