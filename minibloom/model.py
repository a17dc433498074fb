"""BLOOM's forward pass, written to read like the maths.

References:
- BigScience, "BLOOM: A 176B-Parameter Open-Access Multilingual Language Model" (arXiv:2211.05100).
- Press, Smith, Lewis, "Train Short, Test Long: Attention with Linear Biases" (ALiBi, arXiv:2108.12409).
- huggingface/transformers ``src/transformers/models/bloom/modeling_bloom.py`` (v5.23): every function below names
  the part of that file it mirrors, and parameters keep its names (``query_key_value``, ``dense_h_to_4h`` ...), so
  the two can be read side by side.

The first part of this file is the model, from the embedding to the logits: the few kernels it is written in (the
*primitives*: LayerNorm, the linear map, attention ...), ALiBi and the mask, then ``attention``, ``mlp``, ``block``
and ``forward``. The model calls its kernels as ``ops.layer_norm(...)``, ``ops.linear(...)``: ``ops`` is the
primitives table in use, this file's reference definitions unless ``forward`` was given another table (NumPy
kernels that make fewer passes over memory, ``minibloom.fast``; an emulated engine, ``minibloom.oracle``). The
second part is what engines attach without touching the model: that table, the KV cache, and a ``Tape`` that records
the activations the backward pass (``minibloom.backward``) and the hidden-state outputs need.

The functions take arrays of any array-API namespace (NumPy, CuPy, array_api_strict); the namespace is read off the
input (``x.__array_namespace__()``) and the dtype of the weights is the compute dtype.

Shapes, in one notation everywhere:
    B batch, T new tokens, S all key positions (past + new), C hidden size, H heads, D = C // H head dim,
    V vocab (rows of the embedding, 250880 for the released models).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable

import numpy as np

from .config import BloomConfig


def _ns(x):
    """The array namespace of ``x`` (NumPy, CuPy, array_api_strict ...)."""
    return x.__array_namespace__()


# ===============================================================================================================
# The model: embedding to logits
# ---------------------------------------------------------------------------------------------------------------
# The primitives, as the reference defines them


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
    xp = _ns(x)
    x2 = xp.reshape(x, (-1, x.shape[-1]))  # one GEMM over all tokens, not one per batch row
    if tp == 1:
        y = x2 @ weight.mT
    else:  # the same sum, one slice of the input dimension at a time, in order
        s = x.shape[-1] / tp
        y = x2[:, :int(s)] @ weight[:, :int(s)].mT
        for i in range(1, tp):
            y = y + x2[:, int(i * s):int((i + 1) * s)] @ weight[:, int(i * s):int((i + 1) * s)].mT
    return xp.reshape(y + bias, (*x.shape[:-1], weight.shape[0]))


def linear_gelu(x, weight, bias):
    """gelu(x @ weight.T + bias): the MLP's first half."""  # [..., C] -> [..., 4C]
    return gelu(linear(x, weight, bias))


def attend(q, k, v, alibi, mask, probs: bool = False, *, softmax_fn=softmax):
    """ALiBi-biased causal softmax attention (the core of ``BloomAttention.forward``).

    q [B, H, T, D], k and v [B, H, S, D], alibi [B, H, 1, S], mask [B, 1, T, S] (True: may attend) -> context
    [B, T, H, D] (heads side by side, ready to merge) and the probabilities [B, H, T, S] when ``probs`` (else None).
    ``softmax_fn`` lets a tool emulate another engine's softmax (``minibloom.oracle.emulate``).
    """
    xp = _ns(q)
    scores = alibi + (q @ k.mT) * (1.0 / math.sqrt(q.shape[-1]))  # [B, H, T, S]  (HF: alibi.baddbmm(q, k, 1/sqrt D))
    scores = xp.where(mask, scores, xp.finfo(scores.dtype).min)  # HF adds finfo.min to masked cells
    weights = softmax_fn(scores)  # [B, H, T, S]
    ctx = xp.permute_dims(weights @ v, (0, 2, 1, 3))  # [B, H, T, D] -> [B, T, H, D]  (_merge_heads)
    return ctx, (weights if probs else None)


def residual_add(a, x):
    """a + x: a branch's output ``a`` added to the residual stream ``x`` (``dropout_add`` at inference)."""
    return a + x


def head(x, weight):
    """The LM head: x @ weight.T (the embedding when tied)."""  # [B, T, C] -> [B, T, V]
    xp = _ns(x)
    B, T, C = x.shape
    return xp.reshape(xp.reshape(x, (-1, C)) @ weight.mT, (B, T, weight.shape[0]))


# ---------------------------------------------------------------------------------------------------------------
# ALiBi and the mask (``_get_alibi_slopes``, ``build_alibi_tensor``, ``masking_utils.create_causal_mask``)


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
# The transformer (``BloomAttention``, ``BloomMLP``, ``BloomBlock``, ``BloomModel``, ``BloomForCausalLM``)


def attention(x, p, alibi, mask, cfg: BloomConfig, cache: LayerCache | None = None):
    """BloomAttention: fused QKV, ALiBi-biased causal softmax attention, output projection (without residual).

    x [B, T, C] -> [B, T, C]. ``p``: the layer's ``self_attention`` parameters; ``cache``: this layer's keys and
    values of earlier positions, which the new ones join.
    """
    xp = _ns(x)
    B, T, C = x.shape
    H, D = cfg.n_head, C // cfg.n_head
    qkv = ops.linear(x, p["query_key_value"]["weight"], p["query_key_value"]["bias"])  # [B, T, 3C]
    qkv = xp.reshape(qkv, (B, T, H, 3, D))  # per-head interleave: q, k, v of head h are rows h*3D .. h*3D+3D (_reshape)
    q = xp.permute_dims(qkv[:, :, :, 0, :], (0, 2, 1, 3))  # [B, H, T, D]
    k = xp.permute_dims(qkv[:, :, :, 1, :], (0, 2, 1, 3))  # [B, H, T, D]
    v = xp.permute_dims(qkv[:, :, :, 2, :], (0, 2, 1, 3))  # [B, H, T, D]
    if cache is not None:
        k, v = cache.update(k, v)  # [B, H, S, D]: the past positions' keys and values, then these
    ctx, _ = ops.attend(q, k, v, alibi, mask)  # [B, T, H, D]
    ctx = xp.reshape(ctx, (B, T, C))  # heads back side by side (_merge_heads)
    return ops.linear(ctx, p["dense"]["weight"], p["dense"]["bias"], _tp(cfg))


def mlp(x, p, cfg: BloomConfig):
    """BloomMLP: C -> 4C, GeLU, 4C -> C (without residual).  # [B, T, C] -> [B, T, C]"""
    h = ops.linear_gelu(x, p["dense_h_to_4h"]["weight"], p["dense_h_to_4h"]["bias"])  # [B, T, 4C]
    return ops.linear(h, p["dense_4h_to_h"]["weight"], p["dense_4h_to_h"]["bias"], _tp(cfg))


def block(x, p, alibi, mask, cfg: BloomConfig, cache: LayerCache | None = None):
    """BloomBlock: two residual branches, each behind a LayerNorm.  # [B, T, C] -> [B, T, C]

    With ``apply_residual_connection_post_layernorm`` the residual is the LayerNorm's output instead of its input.
    """
    eps, post = cfg.layer_norm_epsilon, cfg.apply_residual_connection_post_layernorm
    ln = p["input_layernorm"]
    h = ops.layer_norm(x, ln["weight"], ln["bias"], eps)
    x = ops.residual_add(attention(h, p["self_attention"], alibi, mask, cfg, cache), h if post else x)
    ln = p["post_attention_layernorm"]
    h = ops.layer_norm(x, ln["weight"], ln["bias"], eps)
    return ops.residual_add(mlp(h, p["mlp"], cfg), h if post else x)


def forward(params, input_ids, attention_mask, cfg: BloomConfig, cache: KVCache | None = None, *,
            logits: str = "all", primitives: Primitives | None = None, tape: Tape | None = None):
    """BloomForCausalLM.forward.  # ids [B, T], mask [B, S] -> logits [B, T, V] ([B, 1, V] for "last")

    ``params`` is the nested dict of HF names (``params["h"][i]["self_attention"]["dense"]["weight"]``).
    ``attention_mask`` covers past and new tokens (S = cache.length + T). ``logits``: "all", "last" or "none" (then
    None is returned). ``primitives``: the kernels to compute with (default ``REFERENCE``); ``tape``: a ``Tape`` that
    records the hidden states, attention probabilities or the backward pass's activations.
    """
    with using(primitives, tape):
        E = params["word_embeddings"]["weight"]  # [V, C]
        eln = params["word_embeddings_layernorm"]
        xp = _ns(eln["weight"])
        B, T = input_ids.shape
        x = xp.reshape(xp.take(E, xp.reshape(input_ids, (-1,)), axis=0), (B, T, E.shape[1]))  # [B, T, C]
        x = ops.layer_norm(x, eln["weight"], eln["bias"], cfg.layer_norm_epsilon)
        slopes = _slopes_on(xp, cfg.n_head, "float64" if x.dtype == xp.float64 else "float32")
        alibi = xp.astype(alibi_bias(attention_mask, slopes), x.dtype)  # [B, H, 1, S]
        mask = causal_mask(attention_mask, T)  # [B, 1, T, S]
        for i, p in enumerate(params["h"]):
            x = block(x, p, alibi, mask, cfg, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += T
        x = ops.layer_norm(x, params["ln_f"]["weight"], params["ln_f"]["bias"], cfg.layer_norm_epsilon)
        if logits == "last":
            x = x[:, T - 1:, :]  # only the next token's logits are wanted (nanoGPT's x[:, [-1], :])
        weight = params["lm_head"]["weight"] if "lm_head" in params else E  # tied to the embedding unless stored
        return None if logits == "none" else ops.head(x, weight)  # [B, T, C] -> [B, T, V]


# ===============================================================================================================
# What engines attach: the primitives table, the KV cache, the tape


def _tp(cfg: BloomConfig) -> int:
    """The slices of HF's ``slow_but_exact`` products (1: one product)."""
    return cfg.pretraining_tp if cfg.slow_but_exact else 1


@lru_cache(maxsize=64)
def _slopes_on(xp, n_head: int, dtype_name: str):
    # computed once per namespace/dtype: no host->device copy in the hot path
    return xp.asarray(alibi_slopes(n_head, np.float64 if dtype_name == "float64" else np.float32))


@dataclass(frozen=True)
class Primitives:
    """The kernels ``attention``, ``mlp``, ``block`` and ``forward`` call; swap the table to swap the kernels.

    Each entry computes the function of the reference entry of the same name; only rounding may differ.
    """

    name: str
    layer_norm: Callable  # (x [..., C], weight, bias, eps) -> [..., C]
    linear: Callable  # (x [..., in], weight [out, in], bias, tp=1) -> [..., out]
    linear_gelu: Callable  # (x [..., in], weight, bias) -> gelu(linear) [..., out]
    attend: Callable  # (q, k, v, alibi, mask, probs) -> (context [B, T, H, D], probabilities or None)
    residual_add: Callable  # (a, x) -> a + x (may write into a, a fresh branch output)
    head: Callable  # (x [B, T, C], weight [V, C]) -> logits [B, T, V]
    gelu: Callable = gelu  # (x) -> gelu(x), a new array (training keeps x: the MLP's pre-activation)
    # training kernels, the hot spots of minibloom.backward; None: that module's reference function
    gelu_backward: Callable | None = None  # (dy, x) -> dx (may write into dy)
    attend_backward: Callable | None = None  # (dctx, q, k, v, probs) -> dq, dk, dv (may write into probs)
    cross_entropy: Callable | None = None  # (logits, labels) -> loss, dlogits (may write into logits)
    layer_norm_backward: Callable | None = None  # (dy, x, weight, eps) -> dx, {"weight", "bias"}


REFERENCE = Primitives("reference", layer_norm, linear, linear_gelu, attend, residual_add, head)

_ACTIVE: ContextVar[Primitives | None] = ContextVar("minibloom_primitives", default=None)


class _Ops:
    """``ops.layer_norm`` ...: the entry of the primitives table in use in this thread (``using``; ``REFERENCE``
    when none is)."""

    def __getattr__(self, name: str):
        return getattr(_ACTIVE.get() or REFERENCE, name)


ops = _Ops()


@contextmanager
def using(primitives: Primitives | None = None, tape: Tape | None = None):
    """Run the model's functions with ``primitives`` (default: the table already in use), recorded on ``tape``
    when one is given: ``with using(fast.PRIMITIVES): block(...)``."""
    table = primitives or _ACTIVE.get() or REFERENCE
    token = _ACTIVE.set(table if tape is None else tape.recording(table))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions (no re-concatenation per step).

    ``k[i]``/``v[i]``: [B, H, max_len, D]; positions ``0 .. length-1`` are filled. ``layers[i]``: layer i's view,
    which ``attention`` takes.
    """

    def __init__(self, xp, n_layer: int, batch: int, n_head: int, head_dim: int, max_len: int, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(n_layer)]
        self.length = 0
        self.max_len = max_len
        self.layers = [LayerCache(self, i) for i in range(n_layer)]

    def update(self, layer: int, k, v):
        """Store the new keys/values at ``length ..``; return all keys/values so far."""  # [B,H,T,D] -> [B,H,S,D]
        start, stop = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:stop, :] = k
        self.v[layer][:, :, start:stop, :] = v
        return self.k[layer][:, :, :stop, :], self.v[layer][:, :, :stop, :]


@dataclass(frozen=True)
class LayerCache:
    """One layer of a ``KVCache``: ``update(k, v)`` appends this step's keys and values and returns all so far."""

    cache: KVCache
    layer: int

    def update(self, k, v):
        return self.cache.update(self.layer, k, v)


@dataclass
class LayerActivations:
    """What ``minibloom.backward.layer_backward`` needs of one block (llm.c's ``ActivationTensors``, per layer)."""

    x: object  # [B, T, C] the block's input
    ln1: object  # [B, T, C] input_layernorm(x)
    q: object  # [B, H, T, D]
    k: object  # [B, H, S, D]
    v: object  # [B, H, S, D]
    probs: object  # [B, H, T, S] the attention probabilities
    ctx: object  # [B, T, C] the heads' merged context, the input of ``dense``
    x1: object  # [B, T, C] the residual stream after the attention branch
    ln2: object  # [B, T, C] post_attention_layernorm(x1)
    h: object  # [B, T, 4C] dense_h_to_4h(ln2), before the GeLU
    g: object  # [B, T, 4C] gelu(h)


@dataclass
class Tape:
    """A record of one forward pass, taken from its primitives' calls (micrograd's and tinygrad's tape): the model's
    code stays as it is, and ``forward(..., tape=Tape())`` keeps what its hidden-state outputs need; with
    ``attentions`` the attention probabilities too; with ``backward`` every activation ``minibloom.backward`` uses.

    The calls come in the model's order: the embedding's LayerNorm; per block its two LayerNorms, three linear maps,
    one attention and one MLP; ``ln_f``; the head.
    """

    attentions: bool = False
    backward: bool = False
    norms: list = field(default_factory=list)  # (input, output) of every LayerNorm: embedding, ln1, ln2 ..., ln_f
    attends: list = field(default_factory=list)  # (q, k, v, alibi, mask, probs) per block
    linears: list = field(default_factory=list)  # the input of every linear map (qkv, dense, dense_4h_to_h) per block
    mlps: list = field(default_factory=list)  # (h, gelu(h)) per block
    head_input: object = None  # [B, T, C] (ln_f's output, its last position only for logits="last")

    def recording(self, ops: Primitives) -> Primitives:
        """``ops`` with every call recorded on this tape (the MLP's GeLU as its own call when ``backward``, to keep
        the pre-activation)."""
        def layer_norm(x, weight, bias, eps):
            y = ops.layer_norm(x, weight, bias, eps)
            self.norms.append((x, y))
            return y

        def attend(q, k, v, alibi, mask, probs=False):
            ctx, p = ops.attend(q, k, v, alibi, mask, probs or self.attentions or self.backward)
            self.attends.append((q, k, v, alibi, mask, p) if self.backward else (None,) * 5 + (p,))
            return ctx, p

        def linear(x, weight, bias, tp=1):
            if self.backward:
                self.linears.append(x)
            return ops.linear(x, weight, bias, tp)

        def linear_gelu(x, weight, bias):
            if not self.backward:
                return ops.linear_gelu(x, weight, bias)
            h = ops.linear(x, weight, bias)
            g = ops.gelu(h)
            self.mlps.append((h, g))
            return g

        def head(x, weight):
            self.head_input = x
            return ops.head(x, weight)

        return replace(ops, name=f"{ops.name} (recorded)", layer_norm=layer_norm, attend=attend, linear=linear,
                       linear_gelu=linear_gelu, head=head)

    @property
    def hidden_states(self) -> list:
        """n_layer + 1 arrays [B, T, C], transformers' convention: the embedding LayerNorm's output, each block's
        output (the next LayerNorm's input), the last one after ``ln_f``."""
        n_layer = (len(self.norms) - 2) // 2
        return [self.norms[0][1]] + [self.norms[1 + 2 * i][0] for i in range(1, n_layer)] + [self.norms[-1][1]]

    @property
    def probs(self) -> list:
        """n_layer arrays [B, H, T, S] (recorded with ``attentions`` or ``backward``)."""
        return [a[-1] for a in self.attends]

    def layers(self) -> list[LayerActivations]:
        """Each block's activations (a tape recorded with ``backward``)."""
        out = []
        for i, (q, k, v, _, _, probs) in enumerate(self.attends):
            (x, ln1), (x1, ln2) = self.norms[1 + 2 * i], self.norms[2 + 2 * i]
            out.append(LayerActivations(x, ln1, q, k, v, probs, self.linears[3 * i + 1], x1, ln2, *self.mlps[i]))
        return out


@dataclass
class BloomOutput:
    """``logits`` [B, T, V] (or [B, 1, V] with ``logits="last"``); ``hidden_states``: n_layer + 1 arrays [B, T, C]
    in transformers' convention (embedding-LayerNorm output, each block's output, the last one after ``ln_f``);
    ``attentions``: n_layer arrays [B, H, T, S]."""

    logits: object
    hidden_states: list | None = None
    attentions: list | None = None


def forward_outputs(params, input_ids, attention_mask, cfg: BloomConfig, cache: KVCache | None = None, *,
                    logits: str = "all", primitives: Primitives | None = None, hidden_states: bool = False,
                    attentions: bool = False) -> BloomOutput:
    """``forward`` with transformers' optional outputs (``output_hidden_states``, ``output_attentions``), read off a
    ``Tape``."""
    tape = Tape(attentions=attentions) if hidden_states or attentions else None
    out = forward(params, input_ids, attention_mask, cfg, cache, logits=logits, primitives=primitives, tape=tape)
    return BloomOutput(out, tape.hidden_states if hidden_states else None,
                       tape.probs if attentions else None)
