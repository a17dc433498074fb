"""BLOOM's forward pass, written to read like the maths.

References:
- BigScience, "BLOOM: A 176B-Parameter Open-Access Multilingual Language Model" (arXiv:2211.05100).
- Press, Smith, Lewis, "Train Short, Test Long: Attention with Linear Biases" (ALiBi, arXiv:2108.12409).
- huggingface/transformers ``src/transformers/models/bloom/modeling_bloom.py`` (v5.23): every function below names
  the part of that file it mirrors, and parameters keep its names (``query_key_value``, ``dense_h_to_4h`` ...), so
  the two can be read side by side.

The functions are pure and take arrays of any array-API namespace (NumPy, CuPy, array_api_strict); the namespace is
read off the input (``x.__array_namespace__()``) and the dtype of the weights is the compute dtype.

Shapes, in one notation everywhere:
    B batch, T new tokens, S all key positions (past + new), C hidden size, H heads, D = C // H head dim,
    V vocab (rows of the embedding, 250880 for the released models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from .config import BloomConfig


def _ns(x):
    """The array namespace of ``x`` (NumPy, CuPy, array_api_strict ...)."""
    return x.__array_namespace__()


# ---------------------------------------------------------------------------------------------------------------
# Elementwise pieces


def layer_norm(x, weight, bias, eps: float):
    """torch.nn.LayerNorm: biased variance, eps inside the square root."""  # [..., C] -> [..., C]
    xp = _ns(x)
    mean = xp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = xp.mean(xc * xc, axis=-1, keepdims=True)
    return xc / xp.sqrt(var + eps) * weight + bias


def gelu(x):
    """BLOOM's tanh GeLU with HF's literal constants (``bloom_gelu_forward``; 0.79788456 is sqrt(2/pi) cut short)."""
    xp = _ns(x)
    return x * 0.5 * (1.0 + xp.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def softmax(x):
    """Softmax over the last axis, shifted by the row maximum (so an all-masked row is uniform, never NaN)."""
    xp = _ns(x)
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def linear(x, weight, bias, tp: int = 1):
    """``x @ weight.T + bias`` with PyTorch's ``[out, in]`` weight layout.  # [..., in] -> [..., out]

    ``tp > 1`` is HF's ``pretraining_tp`` + ``slow_but_exact`` path: the same product summed over ``tp`` slices of the
    input dimension in order. Only the rounding changes. (HF's slow path also forgets the bias; we do not.)
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    xp = _ns(x)
    x2 = xp.reshape(x, (-1, n_in))  # one GEMM over all tokens, not one per batch row
    if tp == 1:
        y = x2 @ weight.mT
    else:
        s = n_in / tp
        y = None
        for i in range(tp):
            lo, hi = int(i * s), int((i + 1) * s)
            part = x2[:, lo:hi] @ weight[:, lo:hi].mT
            y = part if y is None else y + part
    return xp.reshape(y + bias, (*lead, weight.shape[0]))


# ---------------------------------------------------------------------------------------------------------------
# ALiBi and masks (``_get_alibi_slopes``, ``build_alibi_tensor``, ``masking_utils.create_causal_mask``)


def alibi_slopes(n_head: int, dtype=np.float32) -> np.ndarray:
    """One slope per head: 2^(-8k/n) for a power-of-two n; otherwise the closest power of two p gets 2^(-8k/p) and
    the remaining heads take the odd powers of 2^(-4/p) (BLOOM-176B has 112 heads: 64 + 48 extra).

    float32 (default) reproduces transformers: the base is rounded to float32 first, as ``torch.full(..., float32)``
    does. float64 is the oracle mode: exact powers of two, computed in float64.
    """  # -> [H]
    p = 2 ** math.floor(math.log2(n_head))
    k = np.arange(1, p + 1, dtype=np.float64)
    extra = np.arange(1, 1 + 2 * min(p, n_head - p), 2, dtype=np.float64)
    if np.dtype(dtype) == np.float64:
        return np.concatenate([2.0 ** (-8.0 * k / p), 2.0 ** (-4.0 * extra / p)])
    base = np.float64(np.float32(2 ** (-(2 ** -(math.log2(p) - 3)))))
    extra_base = np.float64(np.float32(2 ** (-(2 ** -(math.log2(2 * p) - 3)))))
    return np.concatenate([base**k, extra_base**extra]).astype(np.float32)


@lru_cache(maxsize=64)
def _slopes_on(xp, n_head: int, dtype_name: str):
    # computed once per namespace/dtype: no host->device copy in the hot path
    return xp.asarray(alibi_slopes(n_head, np.float64 if dtype_name == "float64" else np.float32))


def alibi_bias(attention_mask, slopes):
    """ALiBi bias of every key: slope x absolute key position, the same for all query rows.

    Positions come from the cumulative mask, so a left-padded row sees the same positions as the row alone: pads get
    0 and the first real token 0. (HF adds slope*key, not slope*(key-query); softmax ignores the per-row constant.)
    """  # [B, S] ints, [H] -> [B, H, 1, S]
    xp = _ns(slopes)
    pos = (xp.cumulative_sum(attention_mask, axis=-1) - 1) * attention_mask  # [B, S]
    pos = xp.astype(pos, slopes.dtype)  # float32 x float32 in float32 mode, as torch does
    return slopes[None, :, None, None] * pos[:, None, None, :]


def causal_mask(attention_mask, n_new: int):
    """Which keys each new query may see: no future keys, no padding.  # [B, S] -> bool [B, 1, T, S]"""
    xp = _ns(attention_mask)
    S = attention_mask.shape[-1]
    q = xp.arange(S - n_new, S)[:, None]  # absolute positions of the new tokens
    k = xp.arange(S)[None, :]
    return (k <= q)[None, None, :, :] & (attention_mask != 0)[:, None, None, :]


# ---------------------------------------------------------------------------------------------------------------
# The transformer


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions (no re-concatenation per step).

    ``k[i]``/``v[i]``: [B, H, max_len, D]; positions ``0 .. length-1`` are filled.
    """

    def __init__(self, xp, n_layer: int, batch: int, n_head: int, head_dim: int, max_len: int, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Store the new keys/values at ``length ..``; return all keys/values so far."""  # [B,H,T,D] -> [B,H,S,D]
        start, stop = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:stop, :] = k
        self.v[layer][:, :, start:stop, :] = v
        return self.k[layer][:, :, :stop, :], self.v[layer][:, :, :stop, :]


# ---------------------------------------------------------------------------------------------------------------
# The primitives: the few kernels the model is written in. ``REFERENCE`` below is the definition (pure array API);
# ``minibloom.fast.PRIMITIVES`` computes the same functions faster on NumPy, and a test holds each one to its
# reference (tests/test_primitives.py).


def attend(q, k, v, alibi, allowed, probs: bool = False, *, softmax_fn=softmax):
    """ALiBi-biased causal softmax attention (the core of ``BloomAttention.forward``).

    q [B, H, T, D], k and v [B, H, S, D], alibi [B, H, 1, S], allowed [B, 1, T, S] -> context [B, T, H, D] (heads side
    by side, ready to merge) and the probabilities [B, H, T, S] when ``probs`` (else None). ``softmax_fn`` lets a
    tool emulate another engine's softmax (``minibloom.oracle.calibrate``).
    """
    xp = _ns(q)
    scores = alibi + (q @ k.mT) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, T, S]  (HF: alibi.baddbmm(q, k, 1/sqrt D))
    scores = xp.where(allowed, scores, xp.finfo(scores.dtype).min)  # HF adds finfo.min to masked cells
    weights = softmax_fn(scores)  # [B, H, T, S]
    ctx = xp.permute_dims(weights @ v, (0, 2, 1, 3))  # [B, H, T, D] -> [B, T, H, D]  (_merge_heads)
    return ctx, (weights if probs else None)


def linear_gelu(x, weight, bias):
    """gelu(x @ weight.T + bias): the MLP's first half."""  # [..., C] -> [..., 4C]
    return gelu(linear(x, weight, bias))


def residual_add(a, x):
    """a + x: a branch's output added to the residual stream (the fast primitive may overwrite ``a``)."""
    return a + x


def head(x, weight):
    """The LM head: x @ weight.T (the embedding when tied)."""  # [B, T, C] -> [B, T, V]
    xp = _ns(x)
    B, T, C = x.shape
    return xp.reshape(xp.reshape(x, (-1, C)) @ weight.mT, (B, T, weight.shape[0]))


@dataclass(frozen=True)
class Primitives:
    """The kernels ``attention``, ``mlp``, ``block`` and ``forward`` call; swap the table to swap the kernels.

    Each entry computes the function of the reference entry of the same name; only rounding may differ.
    """

    name: str
    layer_norm: Callable  # (x [..., C], weight, bias, eps) -> [..., C]
    linear: Callable  # (x [..., in], weight [out, in], bias, tp=1) -> [..., out]
    linear_gelu: Callable  # (x [..., in], weight, bias) -> gelu(linear) [..., out]
    attend: Callable  # (q, k, v, alibi, allowed, probs) -> (context [B, T, H, D], probabilities or None)
    residual_add: Callable  # (a, x) -> a + x (may write into a, a fresh branch output)
    head: Callable  # (x [B, T, C], weight [V, C]) -> logits [B, T, V]
    gelu: Callable = gelu  # (x) -> gelu(x), a new array (training keeps x: the MLP's pre-activation)
    # training kernels, the hot spots of minibloom.backward; None: that module's reference function
    gelu_backward: Callable | None = None  # (dy, x) -> dx (may write into dy)
    attend_backward: Callable | None = None  # (dctx, q, k, v, probs) -> dq, dk, dv (may write into probs)
    cross_entropy: Callable | None = None  # (logits, labels) -> loss, dlogits (may write into logits)
    layer_norm_backward: Callable | None = None  # (dy, x, weight, eps) -> dx, {"weight", "bias"}


REFERENCE = Primitives("reference", layer_norm, linear, linear_gelu, attend, residual_add, head)


# ---------------------------------------------------------------------------------------------------------------
# The transformer


def _last(x, keep: int | None):
    """The last ``keep`` positions of x [B, T, ...] (all of them when ``keep`` is None)."""
    return x if keep is None else x[:, x.shape[1] - keep:, :]


def attention(x, p, alibi, allowed, n_head: int, tp: int = 1, cache: KVCache | None = None, layer: int = 0, *,
              keep: int | None = None, ops: Primitives = REFERENCE, probs: bool = True, saved: dict | None = None):
    """BloomAttention: fused QKV, ALiBi-biased causal softmax attention, output projection (without residual).

    x [B, T, C] -> ([B, T, C], probabilities [B, H, T, S] or None). Keys and values are made (and cached) for all
    T positions; queries only for the last ``keep`` (default all), and the output has those rows only.
    ``saved``: a dict that receives what ``minibloom.backward.self_attention_backward`` needs (q, k, v, probs, ctx).
    """
    xp = _ns(x)
    B, T, C = x.shape
    H, D = n_head, C // n_head
    qkv = ops.linear(x, p["query_key_value"]["weight"], p["query_key_value"]["bias"])  # [B, T, C] -> [B, T, 3C]
    qkv = xp.reshape(qkv, (B, T, H, 3, D))  # per-head interleave: q, k, v of head h are rows h*3D .. h*3D+3D (_reshape)
    q = xp.permute_dims(qkv[:, :, :, 0, :], (0, 2, 1, 3))  # [B, H, T, D]
    k = xp.permute_dims(qkv[:, :, :, 1, :], (0, 2, 1, 3))  # [B, H, T, D]
    v = xp.permute_dims(qkv[:, :, :, 2, :], (0, 2, 1, 3))  # [B, H, T, D]
    if cache is not None:
        k, v = cache.update(layer, k, v)  # [B, H, S, D]
    if keep is not None:
        q, allowed = q[:, :, T - keep:, :], allowed[:, :, T - keep:, :]
    ctx, weights = ops.attend(q, k, v, alibi, allowed, probs or saved is not None)  # [B, Tq, H, D]
    ctx = xp.reshape(ctx, (B, q.shape[2], C))  # heads back side by side (_merge_heads)
    if saved is not None:
        saved.update(q=q, k=k, v=v, probs=weights, ctx=ctx)
    return ops.linear(ctx, p["dense"]["weight"], p["dense"]["bias"], tp), weights


def mlp(x, p, tp: int = 1, *, ops: Primitives = REFERENCE, saved: dict | None = None):
    """BloomMLP: C -> 4C, GeLU, 4C -> C (without residual).  # [B, T, C] -> [B, T, C]

    ``saved`` receives the pre-activation ``h`` and ``g = gelu(h)`` for ``minibloom.backward.mlp_backward``.
    """
    h4h, h4 = p["dense_h_to_4h"], p["dense_4h_to_h"]
    if saved is None:
        g = ops.linear_gelu(x, h4h["weight"], h4h["bias"])  # [B, T, 4C]
    else:  # the backward pass needs the pre-activation too
        h = ops.linear(x, h4h["weight"], h4h["bias"])  # [B, T, 4C]
        g = ops.gelu(h)
        saved.update(h=h, g=g)
    return ops.linear(g, h4["weight"], h4["bias"], tp)


def block(x, p, alibi, allowed, cfg: BloomConfig, cache: KVCache | None = None, layer: int = 0, *,
          keep: int | None = None, ops: Primitives = REFERENCE, probs: bool = True, saved: dict | None = None):
    """BloomBlock: two residual branches, each behind a LayerNorm.  # [B, T, C] -> [B, T, C] (or [B, keep, C])

    With ``apply_residual_connection_post_layernorm`` the residual is the LayerNorm output instead of its input.
    Each sub-module of ``p`` is read once (a lazily widened layer builds it on every read). ``saved`` receives the
    activations ``minibloom.backward.layer_backward`` needs.
    """
    tp = cfg.pretraining_tp if cfg.slow_but_exact else 1
    eps, post = cfg.layer_norm_epsilon, cfg.apply_residual_connection_post_layernorm
    ln = p["input_layernorm"]
    ln1 = ops.layer_norm(x, ln["weight"], ln["bias"], eps)
    sub = None if saved is None else {"x": x, "ln1": ln1, "attention": {}, "mlp": {}}
    a, weights = attention(ln1, p["self_attention"], alibi, allowed, cfg.n_head, tp, cache, layer, keep=keep,
                           ops=ops, probs=probs, saved=None if sub is None else sub["attention"])
    x = ops.residual_add(a, _last(ln1 if post else x, keep))
    ln = p["post_attention_layernorm"]
    ln2 = ops.layer_norm(x, ln["weight"], ln["bias"], eps)
    if sub is not None:
        saved.update(sub, x1=x, ln2=ln2)
    m = mlp(ln2, p["mlp"], tp, ops=ops, saved=None if sub is None else sub["mlp"])
    return ops.residual_add(m, ln2 if post else x), weights


@dataclass
class BloomOutput:
    """``logits`` [B, T, V] (or [B, 1, V] with ``logits="last"``); ``hidden_states``: n_layer + 1 arrays [B, T, C]
    in transformers' convention (embedding-LayerNorm output, each block's output, the last one after ``ln_f``);
    ``attentions``: n_layer arrays [B, H, T, S]."""

    logits: object
    hidden_states: list | None = None
    attentions: list | None = None


def forward(params, input_ids, attention_mask, cfg: BloomConfig, cache: KVCache | None = None,
            output_hidden_states: bool = False, output_attentions: bool = False, logits: str = "all", *,
            ops: Primitives = REFERENCE, saved: dict | None = None) -> BloomOutput:
    """BloomForCausalLM.forward.  # ids [B, T], mask [B, S] -> logits [B, T, V]

    ``params`` is the nested dict of HF names (``params["h"][i]["self_attention"]["dense"]["weight"]``).
    ``attention_mask`` covers past and new tokens (S = cache.length + T). ``logits``: "all", "last" or "none".
    ``ops``: the primitives to compute with (``REFERENCE``, or ``minibloom.fast.PRIMITIVES`` on NumPy).
    ``saved``: a dict that receives the activations of every layer for ``minibloom.backward`` (training).
    """
    E = params["word_embeddings"]["weight"]  # [V, C]
    eln = params["word_embeddings_layernorm"]
    xp = _ns(eln["weight"])
    B, T = input_ids.shape
    x = xp.reshape(xp.take(E, xp.reshape(input_ids, (-1,)), axis=0), (B, T, E.shape[1]))  # [B, T, C]
    if saved is not None:
        saved.update(embedded=x, layers=[{} for _ in range(len(params["h"]))])
    x = ops.layer_norm(x, eln["weight"], eln["bias"], cfg.layer_norm_epsilon)
    dtype = x.dtype
    slopes = _slopes_on(xp, cfg.n_head, "float64" if dtype == xp.float64 else "float32")
    alibi = xp.astype(alibi_bias(attention_mask, slopes), dtype)  # [B, H, 1, S]
    allowed = causal_mask(attention_mask, T)  # [B, 1, T, S]
    # with neither all logits, nor hidden states, nor attention probabilities wanted, the last layer only needs its
    # last position's output (keys and values of every position are still made, for the cache)
    keep = 1 if logits != "all" and not (output_hidden_states or output_attentions or saved is not None) else None
    hidden, attns = [x], []
    n = len(params["h"])
    for i, p in enumerate(params["h"]):
        x, probs = block(x, p, alibi, allowed, cfg, cache, i, keep=keep if i == n - 1 else None, ops=ops,
                         probs=output_attentions, saved=None if saved is None else saved["layers"][i])
        if output_hidden_states:
            hidden.append(x)
        if output_attentions:
            attns.append(probs)
    if cache is not None:
        cache.length += T
    if saved is not None:
        saved.update(alibi=alibi, allowed=allowed, final=x)
    x = ops.layer_norm(x, params["ln_f"]["weight"], params["ln_f"]["bias"], cfg.layer_norm_epsilon)
    hidden[-1] = x
    if logits == "last":
        x = x[:, x.shape[1] - 1:, :]
    weight = params["lm_head"]["weight"] if "lm_head" in params else E  # tied to the embedding unless stored
    if saved is not None:
        saved["ln_f"] = x
    out = None if logits == "none" else ops.head(x, weight)  # [B, T, C] -> [B, T, V]
    return BloomOutput(out, hidden if output_hidden_states else None, attns if output_attentions else None)
