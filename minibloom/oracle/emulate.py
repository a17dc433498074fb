"""Emulated ports of BLOOM and planted port bugs: minibloom's own forward pass (``minibloom.model.forward``) run with
a primitives table whose entries round the way one family of engines rounds (a *kind*), on weights quantized the way
those engines quantize them, with or without one of the classic port bugs planted.

``minibloom calibrate`` (``minibloom.oracle.calibrate``) measures these populations to derive the verdict policies;
``minibloom.testing`` runs a kind's correct ports on the very model and input under test to size a statistical
verdict by that model's own sensitivity (``Tolerance.probe``). The kinds and their emulations are tabled in
``calibrate``'s docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import model as M
from ..config import BloomConfig
from ..errors import MinibloomError
from ..formats.safetensors import round_to_bf16
from .activations import quant_rows_int8, quant_tensor_uint8, u8s8_sat16_linear

KINDS = ("float32", "float32-gelu-table", "float16", "bfloat16", "int8-weight-only", "int4-weight-only",
         "int8-dynamic", "q8_0", "q4_0", "q4_k", "nf4")
STATISTICAL = ("float16", "bfloat16", "int8-weight-only", "int4-weight-only", "int8-dynamic")  # vs unquantized
REFERENCE = {k: ("unquantized" if k in STATISTICAL else "same file") for k in KINDS}

BUGS = {
    "slopes-pow2": "ALiBi slopes from the power-of-two formula 2^(-8k/n) on a non-power-of-two head count",
    "gelu-erf": "erf GeLU instead of BLOOM's tanh GeLU",
    "layernorm-eps": "LayerNorm epsilon 1e-12 instead of the config's 1e-5",
    "pads-attended": "the attention mask ignored: padding attended and counted in ALiBi positions",
    "causal-off-by-one": "causal mask off by one: each query also sees the next token",
    "qkv-blocks": "fused QKV read as [q; k; v] blocks instead of BLOOM's per-head interleave",
    "dense-bias-dropped": "self_attention.dense bias dropped",
    "mlp-bias-dropped": "mlp.dense_4h_to_h bias dropped",
    "untied-head": "a separate, freshly initialised lm_head where the head is tied to the embedding",
    "post-ln-ignored": "apply_residual_connection_post_layernorm ignored (a post-LN checkpoint run as pre-LN)",
    "softmax-half": "attention softmax computed in float16",
    "scale-1/D": "attention scores scaled by 1/D instead of 1/sqrt(D)",
    "positions-arange": "ALiBi positions from arange instead of the cumulative mask (seen only with a mask that has "
                        "holes)",
    "alibi-scaled": "the ALiBi bias also multiplied by 1/sqrt(head_dim)",
    "slopes-reversed": "ALiBi slopes in reversed head order",
    "layernorm-unbiased": "LayerNorm with the unbiased variance (divided by N - 1)",
    "layernorms-swapped": "input_layernorm and post_attention_layernorm of each block swapped",
    "embedding-ln-skipped": "word_embeddings_layernorm skipped",
    "final-ln-skipped": "ln_f skipped",
    "layer-dropped": "the last block skipped",
    "softmax-no-max-f16": "attention softmax in float16 without subtracting the row maximum (exp overflows to inf: "
                          "NaN or a saturated row)",
}


# ---- rounding and quantization, each as the engines do it ------------------------------------------------------
def round_f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 (nearest even), saturating at +-65504 so masked scores stay finite; back in x's dtype."""
    return np.clip(x, -65504.0, 65504.0).astype(np.float16).astype(x.dtype)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest even), saturating below bfloat16's largest value; back in x's dtype."""
    return round_to_bf16(np.clip(x, -3.3e38, 3.3e38)).astype(x.dtype)


def quant_blocks(x: np.ndarray, block: int, fp16_scale: bool) -> np.ndarray:
    """ggml's activation quantization for a product (Q8_0: blocks of 32, fp16 scale; Q8_K: 256, float32 scale):
    scale d = amax / 127, q = round(x / d) half away from zero, value q * d."""
    n = x.shape[-1]
    if n % block:
        return quant_blocks(x, 32, True) if block != 32 else x
    b = x.reshape(*x.shape[:-1], n // block, block)
    d = np.max(np.abs(b), axis=-1, keepdims=True) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.trunc(b * inv + np.copysign(0.5, b))  # roundf
    d = d.astype(np.float16).astype(x.dtype) if fp16_scale else d.astype(np.float32).astype(x.dtype)
    return (q * d).reshape(x.shape)


def quant_rows_uint8(x: np.ndarray) -> np.ndarray:
    """Asymmetric 8-bit with one scale and zero point per output row (NNCF INT8_ASYM's weights)."""
    return quant_groups(x, 8, x.shape[-1], sym=False)


def quant_groups(w: np.ndarray, bits: int, group: int, sym: bool) -> np.ndarray:
    """Group-wise round-to-nearest along the input axis (the last): groups of ``group`` weights, one scale each.
    Symmetric: scale = amax / (2^(bits-1) - 1), q in [-2^(bits-1), 2^(bits-1) - 1] (int4: amax / 7, q in [-8, 7]);
    asymmetric: scale = (max - min) / (2^bits - 1), zero point round(-min / scale), q in [0, 2^bits - 1] (int4: 15).
    A width that is not a multiple of ``group`` ends with a shorter group."""
    n = w.shape[-1]
    pad = -n % group
    x = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)], mode="edge") if pad else w
    g = x.reshape(*x.shape[:-1], -1, group)
    if sym:
        hi = 2 ** (bits - 1) - 1
        sc = np.max(np.abs(g), axis=-1, keepdims=True) / hi
        inv = np.divide(1.0, sc, out=np.zeros_like(sc), where=sc > 0)
        q = np.clip(np.rint(g * inv), -hi - 1, hi) * sc
    else:
        top = 2 ** bits - 1
        lo, up = np.min(g, axis=-1, keepdims=True), np.max(g, axis=-1, keepdims=True)
        sc = (up - lo) / top
        inv = np.divide(1.0, sc, out=np.zeros_like(sc), where=sc > 0)
        zp = np.clip(np.rint(-lo * inv), 0, top)
        q = np.where(sc > 0, (np.clip(np.rint(g * inv) + zp, 0, top) - zp) * sc, g)
    return q.reshape(x.shape)[..., :n]


def quant_tensor_int8(x: np.ndarray) -> np.ndarray:
    """Symmetric int8 with one scale for the whole tensor (ONNX Runtime's default QInt8 weights)."""
    amax = float(np.max(np.abs(x)))
    return x if amax == 0 else np.rint(x * (127.0 / amax)) * (amax / 127.0)


NF4_CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                     0.7229568362236023, 1.0])  # bitsandbytes' NF4 code book


def quant_nf4(w: np.ndarray, block: int = 64) -> np.ndarray:
    """bitsandbytes NF4: blocks of ``block`` weights, absmax scale, nearest code value."""
    flat = w.reshape(-1, block)
    absmax = np.max(np.abs(flat), axis=-1, keepdims=True)
    norm = np.divide(flat, absmax, out=np.zeros_like(flat), where=absmax > 0)
    idx = np.argmin(np.abs(norm[..., None] - NF4_CODE), axis=-1)
    return (NF4_CODE[idx] * absmax).reshape(w.shape)


def quant_ggml(w: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize and dequantize a weight matrix with the gguf package (the values a GGUF file of that type holds)."""
    from gguf import GGMLQuantizationType, quants

    t = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[qtype]
    w32 = np.ascontiguousarray(w, np.float32)
    return quants.dequantize(quants.quantize(w32, t), t).astype(w.dtype)


def gelu_table(x: np.ndarray) -> np.ndarray:
    """ggml's CPU GeLU (``ggml_vec_gelu_f32`` with ``GGML_GELU_FP16``): x <= -10 -> 0, x >= 10 -> x, otherwise the
    input rounded to fp16 and looked up in a table of fp16 GeLU values (computed in float32)."""
    h = x.astype(np.float16).astype(np.float32)
    y = (0.5 * h * (1.0 + np.tanh(np.float32(0.7978845608028654) * h * (1.0 + np.float32(0.044715) * h * h))))
    y = y.astype(np.float16).astype(x.dtype)
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, y)).astype(x.dtype)


def erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7: far below the erf-vs-tanh GeLU gap of ~1e-3)."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GeLU: x/2 * (1 + erf(x / sqrt 2))."""
    return (0.5 * x * (1.0 + erf(np.asarray(x, np.float64) / math.sqrt(2.0)))).astype(x.dtype)


def softmax_no_max_half(x: np.ndarray) -> np.ndarray:
    """Softmax in float16 without the max shift: exp of a score above ~11.09 overflows to inf, and inf / inf is NaN
    (a row with one overflow saturates: inf / inf NaN there, 0 elsewhere)."""
    h = np.clip(x, -65504.0, 65504.0).astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e = np.exp(h)
        return (e / np.sum(e, axis=-1, keepdims=True, dtype=np.float16)).astype(x.dtype)


def layer_norm_unbiased(x, weight, bias, eps):
    """LayerNorm with the unbiased variance (sum of squares / (N - 1)), as ``numpy.var(ddof=1)`` / torch.var gives."""
    xc = x - np.mean(x, axis=-1, keepdims=True)
    var = np.sum(xc * xc, axis=-1, keepdims=True) / (x.shape[-1] - 1)
    return xc / np.sqrt(var + eps) * weight + bias


def softmax_half(x: np.ndarray) -> np.ndarray:
    """Softmax computed entirely in float16 (a port that forgot BLOOM's float32 upcast)."""
    h = np.clip(x, -65504.0, 65504.0).astype(np.float16)
    with np.errstate(over="ignore"):  # masked cells: -65504 - max overflows to -inf, whose exp is the 0 wanted
        e = np.exp(h - np.max(h, axis=-1, keepdims=True))
    return (e / np.sum(e, axis=-1, keepdims=True, dtype=np.float16)).astype(x.dtype)


# ---- emulated ports -------------------------------------------------------------------------------------------
@dataclass
class Port:
    """How one implementation rounds: wrappers around the teaching path's primitives, and a weight transform."""

    name: str
    compute: type = np.float64
    weights: Callable[[np.ndarray], np.ndarray] | None = None  # applied to each 2-D matrix (linear layers)
    head_weights: bool = False  # the weight transform applies to the embedding / tied head too
    act_in: Callable[[np.ndarray], np.ndarray] | None = None  # activations entering a product with weights
    out: Callable[[np.ndarray], np.ndarray] | None = None  # every primitive's output (cast models)
    qkv: Callable[[np.ndarray], np.ndarray] | None = None  # Q, K, V (ggml's fp16 KV cache)
    probs: Callable[[np.ndarray], np.ndarray] | None = None  # attention probabilities before the V product
    gelu: Callable | None = None  # a different GeLU
    product: Callable | None = None  # (x, weight, bias) -> y: an integer product of its own (replaces act_in)


def ports_for(kind: str) -> list[Port]:
    """The emulated correct implementations of ``kind`` (the population is the worst of them)."""
    f16, bf16 = round_f16, round_bf16
    ggml = dict(gelu=gelu_table, qkv=f16, probs=f16)
    if kind == "float32":
        return [Port("minibloom float32 (NumPy primitives)", np.float32),
                Port("float32 reference primitives", np.float32)]
    if kind == "float32-gelu-table":
        return [Port("ggml f32", np.float32, **ggml)]
    if kind == "float16":
        return [Port("float16 cast", weights=f16, head_weights=True, out=f16)]
    if kind == "bfloat16":
        return [Port("bfloat16 cast", weights=bf16, head_weights=True, out=bf16)]
    if kind == "int8-weight-only":  # quanto qint8 / torchao int8 weight-only; NNCF INT8_ASYM; HQQ 8-bit
        return [Port("int8 per-channel sym", np.float32, weights=quant_rows_int8),
                Port("int8 per-channel sym + head", np.float32, weights=quant_rows_int8, head_weights=True),
                Port("uint8 per-channel asym", np.float32, weights=quant_rows_uint8),
                Port("8-bit group-64 asym", np.float32, weights=lambda w: quant_groups(w, 8, 64, False))]
    if kind == "int4-weight-only":  # OpenVINO INT4_SYM / INT4_ASYM, quanto qint4, HQQ 4-bit, torchao int4
        return [Port(f"int4 group-{g} {'sym' if sym else 'asym'}{' + head' if head else ''}", np.float32,
                     weights=lambda w, g=g, sym=sym: quant_groups(w, 4, g, sym), head_weights=head)
                for g, sym, head in ((32, True, False), (32, False, False), (64, True, False), (64, False, False),
                                     (128, True, False), (128, False, False), (128, True, True))]
    if kind == "int8-dynamic":
        return [Port("CTranslate2-style int8", np.float32, weights=quant_rows_int8, head_weights=True,
                     act_in=quant_rows_int8),
                Port("CTranslate2-style int8 without VNNI (int16 pair saturation)", np.float32,
                     weights=quant_rows_int8, head_weights=True, product=u8s8_sat16_linear),
                Port("ONNX Runtime-style dynamic int8", np.float32, weights=quant_tensor_int8, head_weights=True,
                     act_in=quant_tensor_uint8)]
    if kind == "q8_0" or kind == "q4_0":
        return [Port(f"ggml {kind}", np.float32, act_in=lambda x: quant_blocks(x, 32, True), **ggml)]
    if kind == "q4_k":
        return [Port("ggml q4_K", np.float32, act_in=lambda x: quant_blocks(x, 256, False), **ggml)]
    if kind == "nf4":
        return [Port("bnb nf4, float16 compute", weights=f16, head_weights=False, out=f16),
                Port("bnb nf4, bfloat16 compute", weights=bf16, head_weights=False, out=bf16),
                Port("bnb nf4, float32 compute", np.float32)]
    raise MinibloomError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")


def file_weights(kind: str, params: dict) -> dict:
    """The weights a quantized file of ``kind`` holds (what both the port and the same-file reference run)."""
    if kind in ("q8_0", "q4_0", "q4_k"):
        q = "q8_0" if kind == "q8_0" else "q4_0"
        return map_matrices(params, lambda w: quant_ggml(w, q) if w.shape[-1] % 32 == 0 else w, head=True)
    if kind == "nf4":
        return map_matrices(params, quant_nf4, head=False)
    return params


LINEARS = (("self_attention", "query_key_value"), ("self_attention", "dense"), ("mlp", "dense_h_to_4h"),
           ("mlp", "dense_4h_to_h"))


def map_matrices(params: dict, fn, head: bool) -> dict:
    """A copy of the nested parameter dict with ``fn`` applied to every linear layer's weight matrix, and to the
    embedding / head too when ``head``."""
    p = {**params, "h": []}
    for layer in params["h"]:
        new = {k: dict(v) for k, v in layer.items()}
        for sub, name in LINEARS:
            new[sub][name] = {**layer[sub][name], "weight": fn(layer[sub][name]["weight"])}
        p["h"].append(new)
    if head:
        for name in ("word_embeddings", "lm_head"):
            if name in params:
                p[name] = {**params[name], "weight": fn(params[name]["weight"])}
    return p


def primitives_for(port: Port, bug: str | None, n_head: int, n_layer: int | None = None) -> M.Primitives:
    """The primitives of ``minibloom.model`` as ``port`` computes them, with ``bug`` planted where it lives in the
    attention (slopes, positions, the causal mask, the softmax), the GeLU or the LayerNorms (``n_layer`` blocks:
    which call is the embedding / final LayerNorm). One table serves one forward pass."""
    ident = lambda x: x  # noqa: E731
    out, act_in = port.out or ident, port.act_in or ident
    qkv, probs_r = port.qkv or ident, port.probs or ident
    ref = M.REFERENCE
    gelu_fn = gelu_erf if bug == "gelu-erf" else (port.gelu or M.gelu)
    softmax_fn = {"softmax-half": softmax_half, "softmax-no-max-f16": softmax_no_max_half}.get(bug, M.softmax)
    ln_fn = layer_norm_unbiased if bug == "layernorm-unbiased" else ref.layer_norm
    calls = [0]  # LayerNorm calls so far: 0 the embedding's, 1 .. 2 n_layer the blocks', then ln_f

    def linear(x, weight, bias, tp=1):
        y = out(np.asarray(port.product(x, weight, bias), x.dtype) if port.product
                else ref.linear(out(act_in(x)), weight, bias, tp))
        return qkv(y) if weight.shape[0] == 3 * weight.shape[1] else y

    def layer_norm(x, weight, bias, eps):
        i = calls[0]
        calls[0] += 1
        if (bug == "embedding-ln-skipped" and i == 0) or (bug == "final-ln-skipped" and n_layer is not None
                                                           and i == 2 * n_layer + 1):
            return out(x)
        return out(ln_fn(out(x), weight, bias, eps))

    def linear_gelu(x, weight, bias):
        return out(gelu_fn(linear(x, weight, bias)))

    def softmax(scores):
        return probs_r(out(softmax_fn(out(scores))))

    def attend(q, k, v, alibi, allowed, probs=False):
        S = k.shape[2]
        slopes = M.alibi_slopes(n_head, np.float64).astype(alibi.dtype)
        if bug == "slopes-pow2":  # the power-of-two formula for every head count
            alibi = alibi * (2.0 ** (-8.0 * np.arange(1, n_head + 1) / n_head) / slopes)[None, :, None, None]
        if bug == "slopes-reversed":  # head h gets the slope of head H-1-h
            alibi = alibi * (slopes[::-1] / slopes).astype(alibi.dtype)[None, :, None, None]
        if bug == "alibi-scaled":  # the bias scaled with the scores
            alibi = alibi * alibi.dtype.type(1.0 / math.sqrt(q.shape[-1]))
        if bug == "positions-arange":  # key positions 0 .. S-1 whatever the mask says
            alibi = slopes[None, :, None, None] * np.arange(S, dtype=alibi.dtype)[None, None, None, :]
        if bug == "causal-off-by-one":  # each query also sees the next key
            real_keys = allowed[:, 0, -1, :]  # [B, S]: the last query sees every real key
            qpos = np.arange(S - q.shape[2], S)[:, None]
            allowed = (np.arange(S)[None, :] <= qpos + 1)[None, None] & real_keys[:, None, None, :]
        return ref.attend(q, k, v, alibi, allowed, probs, softmax_fn=softmax)

    def residual_add(a, x):
        return out(ref.residual_add(a, x))

    def head(x, weight):
        return linear(x, weight, 0.0)

    return M.Primitives(f"{port.name}{' + ' + bug if bug else ''}", layer_norm, linear, linear_gelu, attend,
                        residual_add, head)


def bug_params(bug: str | None, params: dict, cfg: BloomConfig, rng: np.random.Generator) -> tuple[dict, BloomConfig]:
    """The parameters and config a port with ``bug`` ends up running (the bugs that live in the weights/config)."""
    if bug in (None, "slopes-pow2", "gelu-erf", "pads-attended", "causal-off-by-one", "softmax-half",
               "positions-arange", "alibi-scaled", "slopes-reversed", "layernorm-unbiased", "embedding-ln-skipped",
               "final-ln-skipped", "softmax-no-max-f16"):
        return params, cfg
    if bug == "layernorm-eps":
        return params, BloomConfig(**{**cfg.to_dict(), "layer_norm_epsilon": 1e-12})
    if bug == "post-ln-ignored":
        return params, BloomConfig(**{**cfg.to_dict(), "apply_residual_connection_post_layernorm": False})
    p = {**params, "h": [dict(layer) for layer in params["h"]]}
    if bug == "layer-dropped":
        p["h"] = p["h"][:-1]
    if bug == "layernorms-swapped":
        for layer in p["h"]:
            layer["input_layernorm"], layer["post_attention_layernorm"] = (layer["post_attention_layernorm"],
                                                                           layer["input_layernorm"])
    C, H = cfg.hidden_size, cfg.n_head
    D = C // H
    for layer in p["h"]:
        att, mlp = dict(layer["self_attention"]), dict(layer["mlp"])
        if bug == "qkv-blocks":  # the port takes rows [j*C + h*D + d] as head h's q/k/v (j = 0, 1, 2)
            rows = np.arange(3 * C).reshape(3, H, D).transpose(1, 0, 2).reshape(-1)
            att["query_key_value"] = {k: v[rows] for k, v in att["query_key_value"].items()}
        if bug == "scale-1/D":  # q scaled once more by 1/sqrt(D): scores * 1/D
            s = np.ones((H, 3, D))
            s[:, 0, :] = 1.0 / math.sqrt(D)
            s = s.reshape(-1)
            qkv = att["query_key_value"]
            att["query_key_value"] = {"weight": qkv["weight"] * s[:, None], "bias": qkv["bias"] * s}
        if bug == "dense-bias-dropped":
            att["dense"] = {**att["dense"], "bias": np.zeros_like(att["dense"]["bias"])}
        if bug == "mlp-bias-dropped":
            mlp["dense_4h_to_h"] = {**mlp["dense_4h_to_h"], "bias": np.zeros_like(mlp["dense_4h_to_h"]["bias"])}
        layer["self_attention"], layer["mlp"] = att, mlp
    if bug == "untied-head":
        E = params["word_embeddings"]["weight"]
        p["lm_head"] = {"weight": 0.02 * rng.standard_normal(E.shape)}
    return p, cfg


def applies(bug: str, cfg: BloomConfig, mask: np.ndarray) -> bool:
    """Whether ``bug`` changes anything on this model and input (else it is left out of the evidence)."""
    if bug == "slopes-pow2":
        return cfg.n_head & (cfg.n_head - 1) != 0
    if bug == "post-ln-ignored":
        return cfg.apply_residual_connection_post_layernorm
    if bug == "pads-attended":
        return not mask.all()
    if bug == "positions-arange":
        return bool(np.any(np.diff(mask, axis=-1) > 0) and np.any((np.cumsum(mask, -1) > 0) & (mask == 0)))
    if bug == "untied-head":
        return cfg.tie_word_embeddings
    if bug == "slopes-reversed":
        return cfg.n_head > 1
    if bug == "layer-dropped":
        return cfg.n_layer > 1
    return True


def prepare(port: Port, params: dict) -> dict:
    """The parameters as ``port`` holds them: its weight transform applied, cast to its compute dtype."""
    p = params if port.weights is None else map_matrices(params, port.weights, head=port.head_weights)
    return _cast(p, port.compute)


def run_port(port: Port, bug: str | None, prepared: dict, cfg: BloomConfig, ids: np.ndarray, mask: np.ndarray,
             seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [B, T, V] and hidden states (float64) of ``port`` with ``bug`` planted, on ``prepare(port, params)``
    (the weight and config bugs are applied to the port's own weights)."""
    p, c = bug_params(bug, prepared, cfg, np.random.default_rng(seed))
    p = _cast(p, port.compute)
    run_mask = np.ones_like(mask) if bug == "pads-attended" else mask
    if port.name == "minibloom float32 (NumPy primitives)" and bug is None:
        from ..fast import PRIMITIVES as ops
    else:
        ops = primitives_for(port, bug, c.n_head, len(p["h"]))
    out = M.forward_outputs(p, ids, run_mask, c, primitives=ops, hidden_states=True)
    return np.asarray(out.logits, np.float64), [np.asarray(h, np.float64) for h in out.hidden_states]


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cast(v, dtype) for v in tree]
    return np.asarray(tree, dtype)
