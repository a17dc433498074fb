"""Oracle calibration: how far *correct* ports of BLOOM land from minibloom's float64 logits, per implementation kind,
and how far *buggy* ports land — the two populations every verdict policy in ``minibloom.testing`` sits between.

``minibloom calibrate`` (or ``python -m minibloom.oracle.calibrate``) rebuilds ``minibloom/oracle/policies.json``,
the one table the policies are read from, and prints it as Markdown: the correct-port table and the bug matrix
(kinds x bugs).

A *kind* is a family of implementations that round the same way. Each is emulated here in NumPy, by running
``minibloom.model.forward`` with a primitives table (``primitives_for``) whose entries round as that kind's engines
do; transformers' own float32 / float16 / bfloat16 runs are added to the population when torch can be imported:

==================== ============================================================================ =================
kind                 what rounds (emulated as)                                                    reference
==================== ============================================================================ =================
float32              float32 everywhere (minibloom's two primitive tables; transformers)             float64, same file
float32-gelu-table   llama.cpp f32 on CPU: GeLU through ggml's fp16 table, Q/K/V in the fp16 KV      float64, same file
                     cache, attention probabilities rounded to fp16 for the V product
float16 / bfloat16   weights and every activation rounded (transformers' cast of the model)        float64, unquantized
int8-weight-only     weight-only int8 per output channel, symmetric (quanto qint8, torchao) or      float64, unquantized
                     asymmetric (NNCF INT8_ASYM), or 8-bit groups of 64 asymmetric (HQQ)
int4-weight-only     group-wise int4 round-to-nearest, sym (amax / 7, q in [-8, 7]) and asym       float64, unquantized
                     ((max - min) / 15 with a zero point), groups of 32, 64 and 128
int8-dynamic         int8 weights, activations quantized per call: per row int8 (CTranslate2) or    float64, unquantized
                     per tensor int8 weights and uint8 activations with a zero point (ONNX
                     Runtime ``quantize_dynamic``'s default, ``per_channel=False``)
q8_0, q4_0, q4_k     ggml: activations quantized to Q8_0 (Q8_K for k-quants) blocks for each product, float64, same file
                     plus the float32-gelu-table rounding
nf4                  bitsandbytes 4-bit: dequantized weights and activations in the compute dtype   float64, same file
                     (float16, bfloat16 or float32)
==================== ============================================================================ =================

"Same file" means the reference runs the weights the port runs (a GGUF or bnb file dequantized exactly); "unquantized"
means the engine quantized or cast the weights itself, so the reference is the original checkpoint. The
*same-weights path* (``SAME_WEIGHTS``) is the third: a weight-only port whose engine weights were dequantized
(``minibloom dequantize``) is judged at its compute precision, so float32 / float16 / bfloat16 run on each case's
weights quantized (int8 per channel, int4 group-wise) against float64 on those same weights; those runs join the float
kinds' evidence, and the bugs are planted on them too (the second matrix). ``int8-activations`` (the same weights
with the engine's activation quantization emulated in the reference) is measured on real engines, not here
(``EXTERNAL``).

The *bugs* (``BUGS``) are the classic ways a BLOOM port goes wrong; each is planted on top of every kind. Evidence:
random checkpoints (every parameter randomized) of several depths, head counts (8, 12 and 16), both residual layouts
and weight scales (``STDS``), over ``seeds`` seeds, and the trained models shipped in ``weights/`` (random weights
hide activation bugs). A bug is
*separable* from a kind when the policy fails it on every model it applies to; the matrix says where it is not.

Policies: rounding noise in the logits grows with the model as ``scale = sqrt(n_layer * hidden_size)`` (noise /
scale varies little between the shapes of the evidence, from 2 layers x 64 to the bloom-560m shape), so each kind's
limits are coefficients per unit of scale: the worst correct-port figure / scale over all evidence times a margin
(``MARGIN_REL`` for the relative error and the top-1 disagreement; ``MARGIN_KL`` for the KL divergences, per scale
squared, as they grow with the square of the logit error), never below the absolute ``FLOOR_*``.
``minibloom.testing.limits`` turns them into the limits for one model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import model as M
from ..config import BloomConfig
from ..errors import MinibloomError
from ..formats.safetensors import round_to_bf16
from .activations import quant_rows_int8, quant_tensor_uint8, u8s8_sat16_linear
from .testing import limits, scale, top1_fails

KINDS = ("float32", "float32-gelu-table", "float16", "bfloat16", "int8-weight-only", "int4-weight-only",
         "int8-dynamic", "q8_0", "q4_0", "q4_k", "nf4")
STATISTICAL = ("float16", "bfloat16", "int8-weight-only", "int4-weight-only", "int8-dynamic")  # vs unquantized
REFERENCE = {k: ("unquantized" if k in STATISTICAL else "same file") for k in KINDS}
# Kinds whose limits are not calibrated here but measured on real engines (their activation quantization is emulated
# in the reference, so no emulated port would measure anything but the emulation against itself): written into
# policies.json as they stand there. A PLACEHOLDER until measured: int8-dynamic's coefficients / 5.
EXTERNAL = {"int8-activations": {
    "rel": 0.0015, "hidden_rel": 0.0015, "kl_mean": 1.6e-06, "kl_max": 3.8e-06, "disagreement": 0.0014,
    "floors": {"rel": 2e-05, "kl": 1e-07, "disagreement": 0.02}, "reference": "same weights",
    "measured_on": "real engines on their own dequantized weights (benchmarks/int8_activations.py): CTranslate2 int8 "
                   "under every CT2_FORCE_CPU_ISA and with ONEDNN_MAX_CPU_ISA=AVX2 / AVX512_CORE (no VNNI), ONNX "
                   "Runtime quantize_dynamic per tensor and per channel, OpenVINO dynamic quantization; random 3 x "
                   "64-160 (8 and 12 heads, weight std 0.02 and 0.08), 12 x 512, 24 x 512 and weights/default",
    "note": "worst real figure per unit of scale times the margins (2.5 rel and top-1, 6 KL): rel 5.7e-4, KL mean "
            "2.6e-7, KL max 6.3e-7, top-1 disagreement 5.6e-4 per unit of scale"}}
# The same-weights path: float compute on the very quantized weights the reference runs (a weight-only port whose
# engine weights were dequantized with `minibloom dequantize`): the float kinds judge it.
SAME_WEIGHTS_KINDS = ("float32", "float16", "bfloat16")

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

MARGIN_REL = 2.5
MARGIN_KL = 6.0
# Floors: float32 rounding grows with width and depth (2e-6 observed at the bloom-560m shape against 9e-7 here), and
# a KL limit below ~1e-7 nats would judge float32 noise on models whose logits span more than these do.
FLOOR_REL = {"float32": 2e-5}
FLOOR_KL = {"float32": 1e-7}
FLOOR_DISAGREE = 0.02  # top-1 disagreement allowed at least (near-ties flip under any rounding)
POLICY_FILE = os.path.join(os.path.dirname(__file__), "policies.json")


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
    out = M.forward(p, ids, run_mask, c, output_hidden_states=True, ops=ops)
    return np.asarray(out.logits, np.float64), [np.asarray(h, np.float64) for h in out.hidden_states]


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cast(v, dtype) for v in tree]
    return np.asarray(tree, dtype)


# ---- transformers as a real port (when torch is importable) -----------------------------------------------------
def hf_logits(params: dict, cfg: BloomConfig, ids: np.ndarray, mask: np.ndarray, dtype: str):
    """(logits, hidden states) of transformers' ``BloomForCausalLM`` run in ``dtype`` on these float64 parameters;
    None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    hc = transformers.BloomConfig(vocab_size=params["word_embeddings"]["weight"].shape[0],
                                  hidden_size=cfg.hidden_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                  layer_norm_epsilon=cfg.layer_norm_epsilon,
                                  apply_residual_connection_post_layernorm=cfg.apply_residual_connection_post_layernorm,
                                  tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager")
    model = transformers.BloomForCausalLM(hc).eval()
    state = {f"transformer.{k}": torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in _flat(params)}
    if "lm_head.weight" in {k for k, _ in _flat(params)}:
        state["lm_head.weight"] = state.pop("transformer.lm_head.weight")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model = model.to(getattr(torch, dtype))
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
    return out.logits.double().numpy(), [h.double().numpy() for h in out.hidden_states]


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


HF_KINDS = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


# ---- evidence: models and inputs --------------------------------------------------------------------------------
@dataclass
class Case:
    """One model with its inputs: a random checkpoint or a trained one."""

    name: str
    cfg: BloomConfig
    params: dict  # float64, nested
    ids: np.ndarray
    mask: np.ndarray
    trained: bool = False
    bugs: bool = True  # whether the bug matrix is measured on this case too (not only the correct ports)


SAME_WEIGHTS = {  # weight schemes of the same-weights path: what `minibloom dequantize` hands the reference
    "int8": quant_rows_int8,
    "int4": lambda w: quant_groups(w, 4, 64, False),
}


def random_checkpoint(cfg: BloomConfig, vocab: int, seed: int, std: float = 0.08) -> dict:
    """Every parameter random (as tests/factory.py does): matrices and biases N(0, std), LayerNorm weights
    1 + N(0, 0.2), LayerNorm biases N(0, 0.1) — so no loader or port bug hides behind a 0 or a 1."""
    from ..formats.weights import expected_shapes, nest

    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in expected_shapes(cfg, vocab).items():
        noise = rng.standard_normal(shape)
        if "layernorm" in name or name.startswith("ln_f"):
            flat[name] = 1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise
        else:
            flat[name] = std * noise
    return nest(flat)


def calibration_mask(B: int, T: int) -> np.ndarray:
    """Rows: full, left-padded, right-padded, and (from 4 rows on) one with a hole in the middle."""
    mask = np.ones((B, T), np.int64)
    if B > 1:
        mask[1, : T // 4] = 0
    if B > 2:
        mask[2, T - T // 5:] = 0
    if B > 3:
        mask[3, : T // 8] = 0
        mask[3, T // 2: T // 2 + 2] = 0
    return mask


RANDOM_SHAPES = (  # (layers, hidden, heads, post-LN), every seed
    (2, 64, 8, False),
    (4, 96, 12, False),
    (6, 96, 12, True),
    (12, 192, 12, False),
    (24, 128, 16, False),
)
WIDE_SHAPES = ((24, 512, 16, False),)  # one seed: the depth of bloom-560m at half its width
STDS = (0.02, 0.05, 0.1)  # weight scales of the random checkpoints: each shape meets each over three seeds


def random_cases(seeds: int, vocab: int = 512, B: int = 4, T: int = 24, seed0: int = 0,
                 shapes=RANDOM_SHAPES, stds=STDS) -> list[Case]:
    """Random checkpoints of every shape in ``shapes`` for seeds ``seed0 .. seed0 + seeds - 1``; the matrices' std
    cycles through ``stds`` with the seed and the shape (so three seeds give every shape every std)."""
    cases = []
    for seed in range(seed0, seed0 + seeds):
        for i, (n_layer, C, H, post) in enumerate(shapes):
            std = stds[(seed + i) % len(stds)]
            cfg = BloomConfig(vocab_size=vocab, hidden_size=C, n_layer=n_layer, n_head=H,
                              apply_residual_connection_post_layernorm=post)
            rng = np.random.default_rng(1000 + seed)
            cases.append(Case(f"random {n_layer}x{C} {H}h{' post-LN' if post else ''} std {std:g} seed {seed}", cfg,
                              random_checkpoint(cfg, vocab, seed * 100 + n_layer, std),
                              rng.integers(0, vocab, (B, T)), calibration_mask(B, T)))
    return cases


def trained_cases(directories, text_path: str | None, B: int = 4, T: int = 32) -> list[Case]:
    """Trained checkpoints with real text (held-out end of the corpus) as input."""
    from ..bloom import load

    cases = []
    for d in directories:
        model = load(d, dtype="float64")
        if text_path and os.path.isfile(text_path) and model.tokenizer is not None:
            with open(text_path, encoding="utf-8") as f:
                text = f.read()[-20000:]
            enc = model.encode(text)
            ids = np.asarray(getattr(enc, "ids", enc), np.int64)[: B * T].reshape(B, T)
        else:
            ids = np.random.default_rng(0).integers(0, model.vocab_size, (B, T))
        cases.append(Case(f"trained {os.path.basename(os.path.normpath(d))}", model.config, model.params, ids,
                          calibration_mask(B, T), trained=True))
    return cases


# ---- metrics ---------------------------------------------------------------------------------------------------
def metrics(actual: tuple, reference: tuple, mask: np.ndarray) -> dict:
    """``minibloom.testing.logit_metrics`` of (logits, hidden states) against the reference's, plus ``hidden_rel``:
    the worst layer's max|a - r| / max|r| over real positions."""
    from .testing import logit_metrics, rel_error

    m = logit_metrics(actual[0], reference[0], mask)
    real = mask.astype(bool)
    m["hidden_rel"] = max(rel_error(a[real], r[real]) for a, r in zip(actual[1], reference[1]))
    return m


# ---- the whole calibration -------------------------------------------------------------------------------------
@dataclass
class Calibration:
    correct: dict = field(default_factory=dict)  # kind -> case -> worst metrics over the kind's ports
    bugs: dict = field(default_factory=dict)  # kind -> bug -> case -> metrics
    cases: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)  # case -> (n_layer, hidden_size)
    same: dict = field(default_factory=dict)  # "float32 on int8" -> bug -> case -> metrics (same-weights path)


FIGURES = ("rel", "kl_mean", "kl_max", "top1", "hidden_rel")


def _worst(a: dict | None, b: dict) -> dict:
    if a is None:
        return {**{k: b[k] for k in FIGURES}, "positions": b["positions"]}
    return {"rel": max(a["rel"], b["rel"]), "kl_mean": max(a["kl_mean"], b["kl_mean"]),
            "kl_max": max(a["kl_max"], b["kl_max"]), "top1": min(a["top1"], b["top1"]),
            "hidden_rel": max(a["hidden_rel"], b["hidden_rel"]), "positions": b["positions"]}


def default_trained() -> tuple[str, ...]:
    """The trained checkpoints of the evidence: ``weights/default`` and ``weights/calib-12h`` of the clone."""
    from ..paths import weights_dir

    return tuple(os.path.join(weights_dir(), name) for name in ("default", "calib-12h"))


def default_text() -> str:
    from ..paths import REPO_ROOT

    return os.path.join(REPO_ROOT, "data", "tinyshakespeare.txt")


def calibrate(seeds: int = 3, trained: tuple[str, ...] | None = None, text: str | None = None,
              kinds=KINDS, bugs=tuple(BUGS), use_hf: bool = True, progress: bool = True, *, wide: bool = False,
              same_weights=tuple(SAME_WEIGHTS), stds=STDS) -> Calibration:
    """Measure every kind's correct ports and every (kind, bug) pair on every case; and on the same-weights path,
    the float kinds (``SAME_WEIGHTS_KINDS``) on each case's weights quantized by each scheme of ``same_weights``
    (their correct figures join the float kinds' evidence as cases "<case> on <scheme> weights")."""
    from tqdm.auto import tqdm

    trained = default_trained() if trained is None else trained
    missing = [d for d in trained if not os.path.isdir(d)]
    if missing:
        raise MinibloomError(f"calibrate: trained checkpoint {missing[0]} not found (run from a clone, or name the "
                             "trained checkpoints with --trained)")
    cases = (random_cases(seeds, stds=stds) + (random_cases(1, shapes=WIDE_SHAPES, stds=stds) if wide else [])
             + trained_cases(trained, default_text() if text is None else text))
    cal = Calibration(cases=[c.name for c in cases],
                      sizes={c.name: (c.cfg.n_layer, c.cfg.hidden_size) for c in cases})
    same_kinds = [k for k in SAME_WEIGHTS_KINDS if k in kinds]
    total = sum(1 + len(bugs) * c.bugs for c in cases) * (len(kinds) + len(same_weights) * len(same_kinds))
    bar = tqdm(total=total, desc="calibrate", unit="run", disable=not progress)
    for case in cases:
        for kind in kinds:
            worst, per_bug = _measure(kind, file_weights(kind, case.params), case, bugs if case.bugs else (), use_hf,
                                      bar)
            cal.correct.setdefault(kind, {})[case.name] = worst
            for bug, m in per_bug.items():
                cal.bugs.setdefault(kind, {}).setdefault(bug, {})[case.name] = m
        for scheme in same_weights:
            params = map_matrices(case.params, SAME_WEIGHTS[scheme], head=False)
            name = f"{case.name} on {scheme} weights"
            cal.sizes[name] = cal.sizes[case.name]
            for kind in same_kinds:
                worst, per_bug = _measure(kind, params, case, bugs if case.bugs else (), False, bar)
                cal.correct[kind][name] = worst
                for bug, m in per_bug.items():
                    cal.same.setdefault(f"{kind} on {scheme}", {}).setdefault(bug, {})[case.name] = m
    bar.close()
    return cal


def _measure(kind: str, params: dict, case: Case, bugs, use_hf: bool, bar) -> tuple[dict, dict]:
    """(worst correct-port metrics, bug -> metrics) of ``kind`` on ``params`` against float64 on ``params``."""
    out = M.forward(params, case.ids, case.mask, case.cfg, output_hidden_states=True)
    ref = (out.logits, out.hidden_states)
    worst, first = None, None
    for port in ports_for(kind):
        prepared = prepare(port, params)
        first = first or prepared
        worst = _worst(worst, metrics(run_port(port, None, prepared, case.cfg, case.ids, case.mask), ref, case.mask))
    if use_hf and kind in HF_KINDS:
        hf = hf_logits(params, case.cfg, case.ids, case.mask, HF_KINDS[kind])
        if hf is not None:
            worst = _worst(worst, metrics(hf, ref, case.mask))
    bar.update(1)
    port = ports_for(kind)[0]
    per_bug = {}
    for bug in bugs:
        bar.update(1)
        if applies(bug, case.cfg, case.mask):
            per_bug[bug] = metrics(run_port(port, bug, first, case.cfg, case.ids, case.mask), ref, case.mask)
    return worst, per_bug


def derive_policies(cal: Calibration) -> dict:
    """Each kind's coefficients from its worst correct port, per unit of ``scale`` (KL: per scale squared), times the
    margins; the floors are absolute. ``minibloom.testing.Tolerance.at`` turns them into limits for one model."""
    out = {}
    for kind, per_case in cal.correct.items():
        sc = {c: scale(*cal.sizes[c]) for c in per_case}
        worst = {f: max(per_case, key=lambda c: _per_scale(per_case[c], f, sc[c])) for f in FIGURES}
        coef = {f: _per_scale(per_case[worst[f]], f, sc[worst[f]]) for f in FIGURES}
        out[kind] = {"rel": _sig(MARGIN_REL * coef["rel"]),
                     "hidden_rel": _sig(MARGIN_REL * coef["hidden_rel"]),
                     "kl_mean": _sig(MARGIN_KL * coef["kl_mean"]),
                     "kl_max": _sig(MARGIN_KL * coef["kl_max"]),
                     "disagreement": _sig(MARGIN_REL * coef["top1"]),
                     "floors": {"rel": FLOOR_REL.get(kind, 0.0), "kl": FLOOR_KL.get(kind, 0.0),
                                "disagreement": FLOOR_DISAGREE},
                     "reference": REFERENCE[kind],
                     "worst_correct": {f: {"case": worst[f], "value": per_case[worst[f]][f],
                                           "per_scale": coef[f]} for f in FIGURES}}
    return out


def _per_scale(m: dict, figure: str, s: float) -> float:
    if figure == "top1":
        return (1.0 - m["top1"]) / s
    return m[figure] / (s * s if figure.startswith("kl") else s)


def _sig(x: float) -> float:
    """Round up to two significant digits (a limit never drops below what it was derived from)."""
    if x <= 0:
        return x
    e = math.floor(math.log10(x)) - 1
    return float(f"{math.ceil(x / 10.0 ** e - 1e-9) * 10.0 ** e:.2g}")


def verdict_of(m: dict, pol: dict) -> list[str]:
    """The parts of policy ``pol`` that metrics ``m`` fail."""
    failed = []
    if not m["rel"] <= pol["rel"]:
        failed.append("rel")
    if not m["kl_mean"] <= pol["kl_mean"]:
        failed.append("kl_mean")
    if not m["kl_max"] <= pol["kl_max"]:
        failed.append("kl_max")
    if top1_fails(m["top1"], m.get("positions"), pol["top1"]):
        failed.append("top1")
    return failed


def bug_matrix(cal: Calibration, policies: dict, same_weights: bool = False) -> dict:
    """column -> bug -> {"rel": smallest relative error over the cases, "kl_mean": smallest KL mean, "caught": n,
    "of": n, "separable": bool}. Columns: the kinds (each against its own reference), or with ``same_weights`` the
    "<float kind> on <scheme>" runs of the same-weights path, judged by that float kind's policy."""
    out = {}
    for column, per_bug in (cal.same if same_weights else cal.bugs).items():
        pol = policies[column.split(" on ")[0]]
        for bug, per_case in per_bug.items():
            caught = sum(bool(verdict_of(m, limits(pol, *cal.sizes[c]))) for c, m in per_case.items())
            out.setdefault(column, {})[bug] = {
                "rel": _least(m["rel"] for m in per_case.values()),
                "kl_mean": _least(m["kl_mean"] for m in per_case.values()),
                "caught": caught, "of": len(per_case), "separable": caught == len(per_case)}
    return out


def _least(values) -> float:
    """The smallest value; NaN (a port that produced NaN logits) counts as infinitely far."""
    return min(float("inf") if math.isnan(v) else v for v in values)


def _matrix_lines(matrix: dict) -> list[str]:
    lines = ["| bug | " + " | ".join(matrix) + " |", "|---|" + "---|" * len(matrix)]
    for bug in BUGS:
        cells = []
        for column in matrix:
            c = matrix[column].get(bug)
            if c is None:
                cells.append("n/a")
            else:
                v = "FAIL" if c["separable"] else f"pass {c['of'] - c['caught']}/{c['of']}"
                cells.append(f"{'NaN/inf' if math.isinf(c['rel']) else format(c['rel'], '.1e')} {v}")
        lines.append(f"| {bug} | " + " | ".join(cells) + " |")
    return lines


def markdown(policies: dict, matrix: dict, cases: list[str], same: dict | None = None) -> str:
    """The correct-port table and the bug matrices as Markdown (README and closing notes paste it): the statistical
    path (each kind against its reference) and, when given, the same-weights path (``same``)."""
    lines = ["Correct ports: the worst figure over every case, and the limits it gives at two model sizes "
             "(limits scale with sqrt(n_layer x hidden); KL with its square)", "",
             "| kind | reference | worst rel (case) | worst KL mean | limit rel: 4 x 256 / 24 x 1024 | limit KL mean "
             "| limit KL max | min top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, p in policies.items():
        small, big = limits(p, 4, 256), limits(p, 24, 1024)
        w = p.get("worst_correct")
        worst = (f"{w['rel']['value']:.2e} ({w['rel']['case']}) | {w['kl_mean']['value']:.1e}" if w else
                 f"not calibrated here (measured on: {p.get('measured_on', '?')}) | -")
        lines.append(f"| {kind} | {p['reference']} | {worst} | {small['rel']:.2g} / {big['rel']:.2g} | "
                     f"{small['kl_mean']:.2g} / {big['kl_mean']:.2g} | {small['kl_max']:.2g} / {big['kl_max']:.2g} | "
                     f"{100 * small['top1']:.1f}% / {100 * big['top1']:.1f}% |")
    lines += ["", "Bug matrix, statistical path (each kind against its reference: the unquantized model for "
              "float16, bfloat16 and the int kinds): smallest relative error over the cases the bug applies to, and "
              "how many of them the policy fails (FAIL = every one: separable; pass k/n = k cases pass although the "
              "port is wrong)", ""] + _matrix_lines(matrix)
    if same:
        lines += ["", "Bug matrix, same-weights path (float32 / float16 / bfloat16 compute on int8 per-channel and "
                  "int4 group-64 weights, against float64 on those same weights; judged by the float kind's "
                  "policy)", ""] + _matrix_lines(same)
    lines += ["", f"Cases ({len(cases)}): " + "; ".join(cases)]
    return "\n".join(lines)


def external_policies(path: str = POLICY_FILE) -> dict:
    """The kinds measured outside this calibration (``EXTERNAL``), as the policies file at ``path`` holds them
    (``EXTERNAL`` is their one source: a recalibration writes them as measured)."""
    return {k: dict(v) for k, v in EXTERNAL.items()}


def write_policies(policies: dict, matrix: dict, cal: Calibration, path: str = POLICY_FILE,
                   same: dict | None = None) -> None:
    """policies.json: the limits, the bug matrices, and every case's correct-port figures (the evidence)."""
    doc = {"generated_by": "minibloom calibrate", "margins": {"rel": MARGIN_REL, "kl": MARGIN_KL},
           "scale": "limit = max(coefficient * sqrt(n_layer * hidden_size), floor); KL: coefficient * n_layer * "
                    "hidden_size; top-1: 1 - max(disagreement * sqrt(n_layer * hidden_size), floor)",
           "cases": cal.cases, "sizes": cal.sizes, "policies": policies, "bug_matrix": matrix,
           "same_weights_matrix": same or {},
           "correct_ports": {k: {c: {**{n: float(f"{m[n]:.4g}") for n in FIGURES}, "positions": m["positions"]}
                                 for c, m in per.items()}
                             for k, per in cal.correct.items()}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minibloom calibrate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


MAX_SEEDS = 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=None,
                   help=f"random seeds per checkpoint shape, 1..{MAX_SEEDS} (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="one seed (a smoke run of the whole matrix, not for --write)")
    p.add_argument("--wide", action="store_true", help="add a 24 x 512 random checkpoint (one seed; slow)")
    p.add_argument("--trained", action="append", metavar="DIR",
                   help="trained checkpoint directories (default: weights/default and weights/calib-12h)")
    p.add_argument("--text", help="text for the trained models' inputs (default: the clone's data/tinyshakespeare.txt)")
    p.add_argument("--kind", action="append", choices=KINDS, help="only these kinds (default: all)")
    p.add_argument("--no-transformers", action="store_true", help="leave transformers' runs out of the population")
    p.add_argument("--no-same-weights", action="store_true", help="skip the same-weights path")
    p.add_argument("--write", metavar="JSON", nargs="?", const=POLICY_FILE,
                   help="write the policies (default path: the package's policies.json)")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE")


def check_arguments(args) -> None:
    """Every input of a calibration checked before any work: one-line ``MinibloomError`` naming the option."""
    seeds = 3 if args.seeds is None else args.seeds
    if args.quick and args.seeds is None:
        seeds = 1
    if not 1 <= seeds <= MAX_SEEDS:
        raise MinibloomError(f"--seeds: must be in 1..{MAX_SEEDS}, got {seeds}")
    args.seeds = seeds
    for option, path in (("--write", args.write), ("--markdown", args.markdown)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise MinibloomError(f"{option}: {path} is a directory (name the file to write)")
        if not os.path.isdir(folder):
            raise MinibloomError(f"{option}: directory {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise MinibloomError(f"{option}: directory {folder} is not writable")
    if args.text is not None:
        if not os.path.isfile(args.text):
            raise MinibloomError(f"--text: {args.text} is not a regular file")
        try:
            with open(args.text, encoding="utf-8") as f:
                f.read()
        except UnicodeDecodeError as e:
            raise MinibloomError(f"--text: {args.text} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise MinibloomError(f"--text: cannot read {args.text} ({e.strerror})") from None
    for d in args.trained or ():
        if not os.path.isdir(d):
            raise MinibloomError(f"--trained: {d} is not a directory")


def run(args) -> int:
    check_arguments(args)
    cal = calibrate(seeds=args.seeds, trained=tuple(args.trained) if args.trained else None,
                    text=args.text, kinds=tuple(args.kind or KINDS), use_hf=not args.no_transformers,
                    wide=args.wide, same_weights=() if args.no_same_weights else tuple(SAME_WEIGHTS))
    policies = derive_policies(cal)
    policies.update(external_policies(args.write or POLICY_FILE))
    matrix = bug_matrix(cal, policies)
    same = bug_matrix(cal, policies, same_weights=True)
    md = markdown(policies, matrix, cal.cases, same)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    if args.write:
        write_policies(policies, matrix, cal, args.write, same)
        print(f"\nwrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
