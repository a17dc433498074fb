"""Activation quantization as engines do it at run time, emulated in float64 for the same-weights reference of a port
that quantizes activations too (kind ``int8-activations``): the reference runs the engine's own (dequantized)
weights, and every product with a weight matrix first rounds its input the way the engine does.

Schemes (the keys of ``minibloom.oracle.engine_weights.ACTIVATIONS``):

- ``int8-per-row``: CTranslate2's int8 compute (``src/cpu/kernels.cc``, ``quantize_s8_row``): per row (token),
  scale = 127 / amax(|x|) (1 for an all-zero row), q = nearbyint(x * scale) (round half to even); the int32 product is
  divided by both scales (``dequantize_gemm_output_row``). On CPUs where CTranslate2 uses oneDNN or MKL the
  activation is shifted to uint8 (q + 128) and the shift compensated exactly with the weights' column sums
  (``weight_compensation``): the same values. Every ``Dense`` layer quantizes its input, the output projection too.
- ``int8-per-row-sat16``: the same quantization on CPUs without VNNI, where oneDNN's and MKL's u8s8s32 GEMM
  multiply with ``vpmaddubsw``: (q + 128) x int8 weight, two adjacent products along K summed in int16 with
  saturation, then summed exactly in int32 and the shift removed with the weights' column sums. Large activations
  times large weights saturate, and CTranslate2's int8 logits move far from ``int8-per-row`` (on such a CPU, or with
  ``ONEDNN_MAX_CPU_ISA=AVX2``); the emulation needs the engine's integer weights, recovered from its dequantized
  per-row weights (max |q| = 127 per row).
- ``uint8-per-tensor``: ONNX ``DynamicQuantizeLinear`` (onnx.ai operator spec): one scale for the whole input,
  scale = (max(0, max x) - min(0, min x)) / 255, zero point = saturate(round(-min(0, min x) / scale)),
  q = saturate(round(x / scale) + zero point), rounding half to even; ``MatMulInteger`` then multiplies
  (q - zero point) exactly and the scales are applied after. The scale covers every row of the batch (padding too).
  On x86 CPUs without VNNI, ONNX Runtime's u8s8 kernels can saturate the same way (its ``session.x64quantprecision``
  option); that path is not emulated here.
- ``int8-per-group``: symmetric int8 with one scale (amax / 127) per group of ``group`` consecutive input columns.
- ``static``: activation scales fixed at calibration time (``quantize_static``): no run-time rule to emulate; the
  reference runs float activations and the verdict says so.
"""

from __future__ import annotations

import numpy as np

from .. import model as M
from ..errors import MinibloomError
from .engine_weights import ACTIVATIONS


def int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CTranslate2's per-row symmetric int8 (its activations and its weights): (q, scale) with scale = 127 / amax per
    row ([..., 1]; 1 for an all-zero row) and q = rint(x * scale), so that x ~ q / scale."""
    amax = np.max(np.abs(x), axis=-1, keepdims=True)
    scale = np.where(amax > 0, 127.0 / np.where(amax > 0, amax, 1.0), 1.0)
    return np.rint(x * scale), scale


def quant_rows_int8(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to per-row symmetric int8 (``int8_rows``) and back: q / scale (an all-zero row stays zero)."""
    with np.errstate(invalid="ignore", divide="ignore"):  # a NaN / inf row: handled below
        q, scale = int8_rows(x)
        value = q / scale
    finite = np.isfinite(np.max(np.abs(x), axis=-1, keepdims=True))
    return np.where(finite, value, np.nan)  # a NaN / inf row stays NaN, as an engine's would


def quant_tensor_uint8(x: np.ndarray) -> np.ndarray:
    """ONNX's DynamicQuantizeLinear: uint8 with a zero point, one scale for the whole tensor (range includes 0),
    dequantized: (q - zero point) * scale."""
    lo, hi = min(0.0, float(np.min(x))), max(0.0, float(np.max(x)))
    if hi == lo:
        return x
    scale = (hi - lo) / 255.0
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale


def quant_groups_int8(x: np.ndarray, group: int) -> np.ndarray:
    """Symmetric int8 with one scale (amax / 127) per group of ``group`` consecutive columns (the last group may be
    shorter); q = rint(x / scale)."""
    n = x.shape[-1]
    out = np.empty_like(x)
    for lo in range(0, n, group):
        out[..., lo:lo + group] = quant_rows_int8(x[..., lo:lo + group])
    return out


def _int8_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) of a weight dequantized from per-row symmetric int8 (``int8_rows``: max |q| = 127 per row), checked
    to be such a weight."""
    q, scale = int8_rows(w)
    if np.max(np.abs(q - w * scale), initial=0.0) > 1e-3:
        raise MinibloomError("int8-per-row-sat16: the weights are not per-row int8 values (pass the engine's "
                             "dequantized weights)")
    return q, scale


def u8s8_sat16_linear(x: np.ndarray, weight: np.ndarray, bias) -> np.ndarray:
    """``x @ weight.T + bias`` as a u8s8s32 GEMM without VNNI computes it: x quantized per row (int8-per-row) and
    shifted to uint8, weight as its per-row int8 values, products of adjacent pairs along K summed with int16
    saturation, the shift compensated exactly; scales and bias applied after, in float64.

    The exact integer product is one GEMM; a pair can only saturate when 255 * (|q_2j| + |q_2j+1|) > 32767, so only
    those (rare) weight pairs are recomputed and clipped."""
    x = np.asarray(x, np.float64)
    lead, K = x.shape[:-1], x.shape[-1]
    qx, sx = int8_rows(x.reshape(-1, K))
    u = qx + 128.0  # [N, K] in [1, 255]
    qw, sw = _int8_weights(np.asarray(weight, np.float64))  # [O, K] in [-127, 127]
    acc = u @ qw.T  # [N, O], exact: integers below 2^53
    pairs_w = np.pad(qw, ((0, 0), (0, K % 2))).reshape(qw.shape[0], -1, 2)  # [O, K/2, 2]
    o_idx, j_idx = np.nonzero(np.max(u, initial=0.0) * np.abs(pairs_w).sum(-1) > 32767.0)
    if o_idx.size:
        pairs_u = np.pad(u, ((0, 0), (0, K % 2))).reshape(u.shape[0], -1, 2)  # [N, K/2, 2]
        pair = np.einsum("npc,pc->np", pairs_u[:, j_idx, :], pairs_w[o_idx, j_idx, :])  # [N, P]
        np.add.at(acc.T, o_idx, (np.clip(pair, -32768.0, 32767.0) - pair).T)  # acc[:, o] += clipped - exact
    acc -= 128.0 * qw.sum(-1)[None, :]
    y = acc / sx / sw.reshape(1, -1) + bias
    return y.reshape(*lead, qw.shape[0])


def _check(scheme: str, group: int | None) -> None:
    if scheme not in ACTIVATIONS:
        raise MinibloomError(f"activations: {scheme!r} is not one of {', '.join(ACTIVATIONS)}")
    if scheme == "int8-per-group" and not (isinstance(group, (int, np.integer)) and 0 < group <= 1 << 20):
        raise MinibloomError(f"group: int8-per-group needs a positive group size, got {group!r}")


def parse_scheme(value, group: int | None = None, what: str = "activations") -> tuple[str | None, int | None]:
    """``"int8-per-group:32"`` / ``"int8-per-row"`` / ``"none"`` -> (scheme or None, group): how a run-time
    activation quantization is named on the command line and in ``minibloom_dequantized.json``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "float", "")):
        return None, None
    if not isinstance(value, str):
        raise MinibloomError(f"{what}: expected a scheme name such as 'int8-per-row', got {type(value).__name__}")
    name, _, size = value.strip().partition(":")
    if size:
        if not size.isdigit() or len(size) > 7:
            raise MinibloomError(f"{what}: group size {size[:20]!r} is not a positive integer")
        group = int(size)
    if name == "int8-per-group" and group is None:
        raise MinibloomError(f"{what}: int8-per-group needs its group size, e.g. 'int8-per-group:32'")
    _check(name, group if name == "int8-per-group" else None)
    return name, (group if name == "int8-per-group" else None)


# The emulations a correct engine with a recorded scheme may match: which one depends on the CPU it ran on (int8
# products without VNNI saturate pairs at int16 in oneDNN and MKL), which the reference cannot know.
EMULATIONS = {"int8-per-row": ("int8-per-row", "int8-per-row-sat16")}


def quantize_activations(x, scheme: str, group: int | None = None) -> np.ndarray:
    """``x`` (the input of one product with a weight matrix, [..., in]) rounded as ``scheme`` rounds it, in float64.

    ``scheme``: a key of ``ACTIVATIONS``; ``group``: the group size of "int8-per-group". "static" returns ``x``
    unchanged (fixed scales, not a run-time rule: see the module docstring).
    """
    _check(scheme, group)
    x = np.asarray(x, np.float64)
    if scheme in ("int8-per-row", "int8-per-row-sat16"):
        return quant_rows_int8(x)
    if scheme == "uint8-per-tensor":
        return quant_tensor_uint8(x)
    if scheme == "int8-per-group":
        return quant_groups_int8(x, int(group))
    return x


def activation_primitives(scheme: str, group: int | None = None, base: M.Primitives = M.REFERENCE, *,
                          head: bool = True) -> M.Primitives:
    """``base`` with every linear layer's input (and the LM head's, when ``head``: CTranslate2 and ONNX Runtime's
    ``quantize_dynamic`` quantize the head like any product) quantized by ``scheme`` before the product, which
    ``base`` then computes (in float64 for the reference). The weights are not touched: pass the engine's own
    (dequantized) weights as the parameters."""
    _check(scheme, group)
    if scheme == "int8-per-row-sat16":
        return _sat16_primitives(base, head)

    def q(x):
        return quantize_activations(x, scheme, group)

    def linear(x, weight, bias, tp=1):
        return base.linear(q(x), weight, bias, tp)

    def linear_gelu(x, weight, bias):
        return base.linear_gelu(q(x), weight, bias)

    def head_fn(x, weight):
        return base.head(q(x) if head else x, weight)

    return M.Primitives(f"{base.name} + {scheme} activations", base.layer_norm, linear, linear_gelu, base.attend,
                        base.residual_add, head_fn, base.gelu)


def _sat16_primitives(base: M.Primitives, head: bool) -> M.Primitives:
    """``base`` with every product with a weight matrix computed by ``u8s8_sat16_linear``."""

    def linear(x, weight, bias, tp=1):
        return u8s8_sat16_linear(x, weight, bias)

    def linear_gelu(x, weight, bias):
        return base.gelu(u8s8_sat16_linear(x, weight, bias))

    def head_fn(x, weight):
        return u8s8_sat16_linear(x, weight, 0.0) if head else base.head(x, weight)

    return M.Primitives(f"{base.name} + int8-per-row-sat16 products", base.layer_norm, linear, linear_gelu,
                        base.attend, base.residual_add, head_fn, base.gelu)
