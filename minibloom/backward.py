"""BLOOM's backward pass, by hand: one ``*_backward`` function per forward function of ``minibloom.model``.

References:
- Rumelhart, Hinton, Williams, "Learning representations by back-propagating errors" (Nature, 1986).
- karpathy/llm.c ``train_gpt2.c``: GPT-2's forward and backward written function by function, each checked against
  PyTorch; this module does the same for BLOOM (ALiBi instead of learned positions, fused per-head QKV, an
  embedding LayerNorm, the post-LayerNorm residual option).
- huggingface/transformers ``modeling_bloom.py`` (v5.23) and ``loss/loss_utils.py`` (``ForCausalLMLoss``): the
  gradients here are those torch autograd computes through ``BloomForCausalLM`` (tests/test_backward.py).

Each backward takes ``dy`` (dL/dy, the shape of the forward's output) and what the forward saw or kept (a block's
``minibloom.model.LayerActivations``, recorded by ``forward(..., tape=Tape(backward=True))``), and returns the
gradient of the input first, then the gradients of the parameters in a tree shaped like ``params`` (HF names).
Shapes use the model's notation (B batch, T tokens, S key positions = T here, C hidden, H heads, D = C // H, V vocab).
The functions are pure array API, so NumPy, CuPy and array_api_strict train alike.

The derivations, y the output, dy = dL/dy:

- linear, y = x W^T + b:            dx = dy W,  dW = dy^T x (summed over tokens),  db = sum dy.
- LayerNorm, y = x^ w + b with x^ = (x - mean) r, r = 1 / sqrt(var + eps):
                                    dw = sum dy x^,  db = sum dy,
                                    dx = r (g - mean(g) - x^ mean(g x^)),  g = dy w   (mean over C).
- tanh GeLU, y = x (1 + tanh u) / 2, u = a (x + b x^3):
                                    dx = dy [(1 + tanh u) / 2 + x (1 - tanh^2 u) a (1 + 3 b x^2) / 2].
- softmax, p = softmax(s):          ds = p (dp - sum(dp p))  (sum over keys).
- attention, s = alibi + q k^T / sqrt(D) where allowed, p = softmax(s), ctx = p v:
                                    dv = p^T dctx,  dp = dctx v^T,  dq = ds k / sqrt(D),  dk = ds^T q / sqrt(D);
                                    ALiBi and the mask are constants. The mask is HF's: finfo.min added to
                                    masked scores, so ds passes through it; it is 0 where p = 0 (a masked key of
                                    a query that sees some key), and for a query that sees no key (a left pad,
                                    whose p is uniform) it is the gradient torch computes.
- cross entropy over labelled positions, L = -mean log softmax(z)[label]:
                                    dz = (softmax(z) - onehot(label)) / n_labelled, 0 on ignored positions.
- embedding, x = E[ids]:            dE[i] = sum of dx over the positions holding token i.

``pretraining_tp`` slices only change how the forward's sums are rounded, not the function: its gradient is the
plain linear's.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from . import model as M
from .config import BloomConfig
from .errors import MinibloomError

IGNORE_INDEX = -100  # a label that is not scored (transformers' and torch's ignore_index)
GELU_A, GELU_B = 0.79788456, 0.044715  # the constants of ``model.gelu``


def _ns(x):
    return x.__array_namespace__()


def _rows(x):
    """x [..., n] -> [N, n] (all leading axes as one)."""
    return _ns(x).reshape(x, (-1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------------------------
# Elementwise pieces and the linear map


def linear_backward(dy, x, weight, bias: bool = True):
    """``model.linear``: dy [..., out], x [..., in], weight [out, in] -> dx [..., in], {"weight", "bias"} (no
    "bias" when ``bias`` is False: the LM head)."""
    xp = _ns(dy)
    dy2 = _rows(dy)  # [N, out]
    dx = xp.reshape(dy2 @ weight, (*x.shape[:-1], weight.shape[1]))  # dx = dy W
    grads = {"weight": dy2.mT @ _rows(x)}  # dW = dy^T x
    if bias:
        grads["bias"] = xp.sum(dy2, axis=0)  # db = sum dy
    return dx, grads


def layer_norm_backward(dy, x, weight, eps: float):
    """``model.layer_norm``: dy and x [..., C], weight [C] -> dx [..., C], {"weight", "bias"}."""
    xp = _ns(dy)
    xc = x - xp.mean(x, axis=-1, keepdims=True)
    r = 1.0 / xp.sqrt(xp.mean(xc * xc, axis=-1, keepdims=True) + eps)  # [..., 1]
    xhat = xc * r
    g = dy * weight
    dx = r * (g - xp.mean(g, axis=-1, keepdims=True) - xhat * xp.mean(g * xhat, axis=-1, keepdims=True))
    return dx, {"weight": xp.sum(_rows(dy * xhat), axis=0), "bias": xp.sum(_rows(dy), axis=0)}


def gelu_backward(dy, x):
    """``model.gelu``: the exact derivative of BLOOM's tanh GeLU with its literal constants.  # [...] -> [...]"""
    xp = _ns(dy)
    t = xp.tanh(GELU_A * x * (1.0 + GELU_B * x * x))
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (GELU_A * (1.0 + 3.0 * GELU_B * x * x)))


def softmax_backward(dp, p):
    """``model.softmax`` over the last axis: dp, p [..., S] -> ds [..., S]."""
    xp = _ns(dp)
    return p * (dp - xp.sum(dp * p, axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------------------------
# Attention, MLP, block


def attend_backward(dctx, q, k, v, probs):
    """``model.attend``: dctx [B, T, H, D], q [B, H, T, D], k and v [B, H, S, D], probs [B, H, T, S]
    -> dq [B, H, T, D], dk and dv [B, H, S, D]."""
    xp = _ns(dctx)
    dctx = xp.permute_dims(dctx, (0, 2, 1, 3))  # [B, T, H, D] -> [B, H, T, D]
    dv = probs.mT @ dctx  # [B, H, S, D]
    ds = softmax_backward(dctx @ v.mT, probs)  # dp = dctx v^T [B, H, T, S]
    scale = 1.0 / math.sqrt(q.shape[-1])
    return (ds @ k) * scale, (ds.mT @ q) * scale, dv


def self_attention_backward(dy, a: M.LayerActivations, p, n_head: int, ops: M.Primitives):
    """``model.attention`` (HF's ``self_attention`` module): dy [B, T, C] -> d(ln1) [B, T, C], grads of
    {"query_key_value", "dense"}."""
    xp = _ns(dy)
    B, T, C = dy.shape
    dctx, g_dense = linear_backward(dy, a.ctx, p["dense"]["weight"])  # [B, T, C]
    dq, dk, dv = ops.attend_backward(xp.reshape(dctx, (B, T, n_head, C // n_head)), a.q, a.k, a.v, a.probs)
    # undo the per-head interleave: q, k, v of head h are rows h*3D .. h*3D+3D of the fused output
    dqkv = xp.stack([xp.permute_dims(d, (0, 2, 1, 3)) for d in (dq, dk, dv)], axis=3)  # [B, T, H, 3, D]
    dx, g_qkv = linear_backward(xp.reshape(dqkv, (B, T, 3 * C)), a.ln1, p["query_key_value"]["weight"])
    return dx, {"query_key_value": g_qkv, "dense": g_dense}


def mlp_backward(dy, a: M.LayerActivations, p, ops: M.Primitives):
    """``model.mlp``: dy [B, T, C] -> d(ln2) [B, T, C], grads of {"dense_h_to_4h", "dense_4h_to_h"}."""
    dg, g_out = linear_backward(dy, a.g, p["dense_4h_to_h"]["weight"])  # [B, T, 4C]
    dx, g_in = linear_backward(ops.gelu_backward(dg, a.h), a.ln2, p["dense_h_to_4h"]["weight"])
    return dx, {"dense_h_to_4h": g_in, "dense_4h_to_h": g_out}


def residual_backward(dy, d_branch, x, weight, cfg: BloomConfig, ops: M.Primitives):
    """One residual branch ``y = branch(LN(x)) + r``: dy = dL/dy and d_branch = dL/d(LN(x)) through the branch ->
    dx and the LayerNorm's grads. The residual r is x, or LN(x) with ``apply_residual_connection_post_layernorm``:
    dy joins the gradient after the LayerNorm's backward, or before it."""
    post = cfg.apply_residual_connection_post_layernorm
    dx, grads = ops.layer_norm_backward(d_branch + dy if post else d_branch, x, weight, cfg.layer_norm_epsilon)
    return (dx if post else dx + dy), grads


def layer_backward(dy, a: M.LayerActivations, p, cfg: BloomConfig, ops: M.Primitives):
    """``model.block``, one layer ``h[i]``: dy [B, T, C] -> dx [B, T, C] and the layer's grads (same tree as ``p``).

    Forward: ln1 = LN(x); x1 = attention(ln1) + r1; ln2 = LN(x1); y = mlp(ln2) + r2, with the residuals r1, r2 the
    LayerNorm inputs (x, x1) or, with ``apply_residual_connection_post_layernorm``, their outputs (ln1, ln2).
    """
    dln2, g_mlp = mlp_backward(dy, a, p["mlp"], ops)
    dx1, g_ln2 = residual_backward(dy, dln2, a.x1, p["post_attention_layernorm"]["weight"], cfg, ops)
    dln1, g_att = self_attention_backward(dx1, a, p["self_attention"], cfg.n_head, ops)
    dx, g_ln1 = residual_backward(dx1, dln1, a.x, p["input_layernorm"]["weight"], cfg, ops)
    return dx, {"input_layernorm": g_ln1, "self_attention": g_att, "post_attention_layernorm": g_ln2, "mlp": g_mlp}


# ---------------------------------------------------------------------------------------------------------------
# Loss, head, embedding, the whole model


def check_labels(labels, vocab: int, shape: tuple[int, ...]) -> None:
    """Labels must be token ids or ``IGNORE_INDEX``, in the shape of the input ids (NumPy, before the forward)."""
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise MinibloomError(f"labels: shape {labels.shape} does not match input_ids {tuple(shape)}")
    if labels.dtype.kind not in "iu":
        raise MinibloomError(f"labels: expected integer token ids, got dtype {labels.dtype}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise MinibloomError(f"labels: {labels[bad].flat[0]} is neither a token id (0 .. {vocab - 1}) nor "
                             f"{IGNORE_INDEX} (ignored)")
    if not (labels[:, 1:] != IGNORE_INDEX).any():
        raise MinibloomError(f"labels: no position after the first is labelled (all are {IGNORE_INDEX}), so there "
                             "is no loss to differentiate")


def cross_entropy(logits, labels):
    """transformers' causal-LM loss and its gradient: position t predicts label t + 1; labels equal to
    ``IGNORE_INDEX`` are not scored; the mean is over the scored positions.

    logits [B, T, V], labels [B, T] ints -> (loss, a 0-d array; dlogits [B, T, V]).
    """
    xp = _ns(logits)
    B, T, V = logits.shape
    z, y = logits[:, :-1, :], labels[:, 1:]  # [B, T-1, V], [B, T-1]
    scored = y != IGNORE_INDEX  # [B, T-1]
    w = xp.astype(scored, logits.dtype)
    w = w / xp.sum(w)  # the weight of each position in the mean
    y = xp.where(scored, y, 0)[..., None]  # [B, T-1, 1]
    z = z - xp.max(z, axis=-1, keepdims=True)
    e = xp.exp(z)
    sum_e = xp.sum(e, axis=-1)  # [B, T-1]
    loss = -xp.sum((xp.take_along_axis(z, y, axis=-1)[..., 0] - xp.log(sum_e)) * w)  # -mean log p(label)
    onehot = xp.arange(V)[None, None, :] == y
    p = e / sum_e[..., None]
    dz = xp.where(onehot, p - 1, p) * w[..., None]  # (softmax - onehot) / n on scored positions
    return loss, xp.concat([dz, xp.zeros((B, 1, V), dtype=logits.dtype)], axis=1)


def embedding_backward(dx, ids, n_rows: int):
    """``take(E, ids)``: dx [B, T, C], ids [B, T] -> dE [n_rows, C], each position's gradient added to its row."""
    xp = _ns(dx)
    dx2, flat = _rows(dx), xp.reshape(ids, (-1,))
    add_at = getattr(getattr(xp, "add", None), "at", None)  # NumPy's (and CuPy's) unbuffered scatter-add
    if add_at is not None:
        dE = xp.zeros((n_rows, dx.shape[-1]), dtype=dx.dtype)
        try:
            add_at(dE, flat, dx2)
            return dE
        except (NotImplementedError, TypeError):  # a namespace whose ufuncs lack a working ``at``
            pass
    onehot = xp.astype(flat[:, None] == xp.arange(n_rows)[None, :], dx.dtype)  # [N, n_rows]: the same sum, by GEMM
    return onehot.mT @ dx2


def with_backward(ops: M.Primitives) -> M.Primitives:
    """``ops`` with this module's reference function for every training kernel it does not provide."""
    fallbacks = {"gelu_backward": gelu_backward, "attend_backward": attend_backward, "cross_entropy": cross_entropy,
                 "layer_norm_backward": layer_norm_backward}
    return replace(ops, **{name: getattr(ops, name) or f for name, f in fallbacks.items()})


def value_and_grad(params, input_ids, attention_mask, labels, cfg: BloomConfig, *, ops: M.Primitives = M.REFERENCE):
    """The causal-LM loss of ``minibloom.model.forward`` and its gradient for every parameter.

    ids, attention_mask, labels [B, T] on the parameters' namespace -> (loss, a 0-d array; grads, a tree shaped
    like ``params``, with ``lm_head`` only when the head is untied). The forward runs with ``ops``; the backward
    is this module's, with the training kernels of ``ops``.
    """
    ops = with_backward(ops)
    eps = cfg.layer_norm_epsilon
    tape = M.Tape(backward=True)
    logits = M.forward(params, input_ids, attention_mask, cfg, primitives=ops, tape=tape)  # [B, T, V]
    loss, dlogits = ops.cross_entropy(logits, labels)
    del logits
    E = params["word_embeddings"]["weight"]  # [V, C]
    tied = "lm_head" not in params
    dx, g_head = linear_backward(dlogits, tape.head_input, params["lm_head"]["weight"] if not tied else E, bias=False)
    del dlogits
    dx, g_lnf = ops.layer_norm_backward(dx, tape.norms[-1][0], params["ln_f"]["weight"], eps)
    acts, embedded = tape.layers(), tape.norms[0][0]
    del tape  # the activations live on in ``acts`` only, freed layer by layer below
    layers = [None] * len(params["h"])
    for i in reversed(range(len(params["h"]))):
        dx, layers[i] = layer_backward(dx, acts[i], params["h"][i], cfg, ops)
        acts[i] = None  # this layer's activations are no longer needed
    dx, g_eln = ops.layer_norm_backward(dx, embedded, params["word_embeddings_layernorm"]["weight"], eps)
    dE = embedding_backward(dx, input_ids, E.shape[0])
    grads = {"word_embeddings": {"weight": dE + g_head["weight"] if tied else dE},
             "word_embeddings_layernorm": g_eln, "h": layers, "ln_f": g_lnf}
    if not tied:
        grads["lm_head"] = {"weight": g_head["weight"]}
    return loss, grads
