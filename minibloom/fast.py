"""The NumPy primitives: drop-ins for ``minibloom.model.REFERENCE`` that compute the same functions with fewer passes
over memory. ``Bloom`` runs ``model.forward`` with this table on the NumPy backend (``PRIMITIVES``); the model itself
exists once, in ``minibloom.model``. ``tests/test_primitives.py`` holds every entry to its reference (float64 to
1e-12, float32 to float32 rounding). How each differs from its reference:

- ``layer_norm``: one temporary instead of three, the same operations in the same order (bitwise equal);
- ``linear``: with a few rows (decoding, up to ``SKINNY_ROWS``) the product is computed as ``(W @ x.T).T``, which
  OpenBLAS runs much faster than ``x @ W.T`` (rounding may differ: BLAS blocks the sum differently); the bias is
  added in place;
- ``linear_gelu``: the bias add and the tanh GeLU run in place, a block of rows at a time (``GELU_BLOCK_ELEMS``), in
  the reference's order of operations (bitwise equal for the same product);
- ``attend``: one query per row (decoding's step, ``attend_one``): the reference's operations in its order on one
  [B, H, 1, S] scores array updated in place, the mask applied only where it hides a key (bitwise equal). More
  queries: per batch row, group of heads and block of queries (a block fits in the L2 cache), for the shapes
  ``model.forward`` passes (q [B, H, T, D], k and v [B, H, S, D] of one float dtype, a mask broadcasting to
  [B, 1, T, S] and ALiBi to [B, H, 1, S]; it checks them, and any other input the reference accepts gets the
  reference's computation). A row whose mask is exactly the causal pattern (query t sees keys up to ``S - T + t``,
  with T <= S: a row without padding, which it checks) only looks at the keys a block can see, which skips the
  masked upper half of the prompt's score matrix and confines the mask to the block's last [t, t] square; a block
  where some query's largest visible score is not above finfo.min / 2 (-inf, NaN, an additive mask in the bias) is
  redone over all keys, as the skipped keys would not weigh 0 in the reference. Every other row (padding, or any
  other mask) sees every key through its mask, as in the reference. The scale goes on q and the softmax's division
  on the [t, D] result. All three only change rounding (the skipped cells are exact zeros after the softmax);
- ``residual_add``: writes into the branch output instead of a new array (bitwise equal);
- ``head``: many rows (a long prompt's logits) go into memory reused from earlier calls' logits once those are gone
  (``BufferPool``); a few rows use ``linear``'s orientation.
"""

from __future__ import annotations

import math
import threading
import weakref
from functools import lru_cache

import numpy as np

from . import model as M
from .backend import anonymous_memory

SCORE_BLOCK_ELEMS = 1 << 18  # heads x queries x keys per attention block (1 MB in float32: stays in L2)
HEADS_PER_BLOCK = 4  # heads per attention block (fewer, larger BLAS calls than one head at a time)
GELU_BLOCK_ELEMS = 1 << 16  # elements per block of the in-place GeLU (256 KB in float32)
SKINNY_ROWS = 128  # up to this many rows, x @ W.T is computed as (W @ x.T).T (see matmul_t)
POOL_MIN_BYTES = 64 << 20  # logits arrays from this size on reuse the memory of earlier ones (see BufferPool)


def _mean(x: np.ndarray) -> np.ndarray:
    """``np.mean(x, axis=-1, keepdims=True)`` (same sum, same division) without its Python-level bookkeeping, which
    costs more than the arithmetic on the single rows of decoding."""
    if x.dtype == np.float16:  # np.mean sums float16 in float32
        return np.mean(x, axis=-1, keepdims=True)
    s = np.add.reduce(x, -1, None, None, True)  # positional: the keyword parsing costs as much as a row's sum
    np.divide(s, x.shape[-1], out=s)
    return s


def layer_norm(x: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    """``model.layer_norm`` with one temporary: (x - mean) / sqrt(var + eps) * weight + bias."""  # [N, C]
    xc = np.subtract(x, _mean(x))
    var = _mean(np.multiply(xc, xc))
    np.add(var, eps, out=var)
    np.sqrt(var, out=var)
    np.divide(xc, var, out=xc)
    np.multiply(xc, weight, out=xc)
    np.add(xc, bias, out=xc)
    return xc


def gelu_(x: np.ndarray, bias=None) -> np.ndarray:
    """``model.gelu(x + bias)`` in place, in its order of operations:
    x*0.5 * (1 + tanh(0.79788456*x * (1 + 0.044715*x*x))).

    Works through ``x`` [N, F] a block of rows at a time, so the bias add and the two temporaries stay in cache
    (decoding's few rows are one block).
    """
    rows = max(1, GELU_BLOCK_ELEMS // x.shape[-1])
    for r in range(0, x.shape[0], rows):
        xb = x if rows >= x.shape[0] else x[r:r + rows]
        if bias is not None:
            np.add(xb, bias, out=xb)
        t = np.multiply(xb, 0.044715)
        np.multiply(t, xb, out=t)
        np.add(t, 1.0, out=t)
        u = np.multiply(xb, 0.79788456)
        np.multiply(u, t, out=u)
        np.tanh(u, out=u)
        np.add(u, 1.0, out=u)
        np.multiply(xb, 0.5, out=xb)
        np.multiply(xb, u, out=xb)
    return x


def matmul_t(x2: np.ndarray, w) -> np.ndarray:
    """x2 [N, in] @ w.T for w [out, in] -> [N, out], C-ordered.

    With a few rows (decoding: N = batch) it is computed as (w @ x2.T).T: OpenBLAS then splits the long ``out``
    dimension, not the N rows, and uses its threads on the big dimension (``benchmarks/bench.py`` measures decoding,
    which runs on this path). Same products and sums; only BLAS's blocking (so rounding) may differ.
    """
    if 1 < x2.shape[0] <= SKINNY_ROWS and isinstance(w, np.ndarray):
        return np.ascontiguousarray((w @ np.ascontiguousarray(x2.T)).T)
    return x2 @ w.mT


def _reshape(x, shape: tuple[int, ...]) -> np.ndarray:
    """``np.reshape`` (the method for an ndarray: the function's dispatch costs more than a decoding row's add)."""
    return x.reshape(shape) if type(x) is np.ndarray else np.reshape(x, shape)


def linear(x: np.ndarray, weight, bias, tp: int = 1) -> np.ndarray:
    """``model.linear``: x @ weight.T + bias, the bias added in place."""  # [..., in] -> [..., out]
    if tp > 1:  # HF's sliced products (pretraining_tp with slow_but_exact): as the reference computes them
        return M.linear(x, weight, bias, tp)
    y = matmul_t(_reshape(x, (-1, x.shape[-1])), weight)
    np.add(y, bias, out=y)
    return _reshape(y, (*x.shape[:-1], weight.shape[0]))


def linear_gelu(x: np.ndarray, weight, bias) -> np.ndarray:
    """``model.linear_gelu``: the product, then the bias add and GeLU in place, block by block."""
    y = gelu_(matmul_t(_reshape(x, (-1, x.shape[-1])), weight), bias)
    return _reshape(y, (*x.shape[:-1], weight.shape[0]))


def residual_add(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``model.residual_add`` into ``a`` (a fresh branch output nothing else refers to)."""
    np.add(a, x, out=a)
    return a


class BufferPool:
    """Memory for big output arrays (all the logits of a long prompt), reused once an earlier array is gone.

    Fresh memory is paid for on first touch: the kernel faults it in page by page, and on a virtual machine that
    hands freed memory back to its host (free page reporting) the host must back it again too; for a long prompt's
    logits (hundreds of MB) that is a sizeable fraction of the head's product itself. The pool keeps the memory of
    such an array once nothing refers to it any more (no view, no buffer export: ``weakref.finalize`` on the array
    that owns the mapping, which every view keeps alive) and hands it to the next request it fits without being
    more than twice too big. It holds one spare buffer, the biggest returned, so a short prompt's logits never
    evict a long one's.
    """

    def __init__(self, min_bytes: int):
        self.min_bytes = min_bytes
        self._spare = None
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised C-ordered array, in pooled memory if it is at least ``min_bytes``."""
        dtype = np.dtype(dtype)
        n = math.prod(shape)
        nbytes = n * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        with self._lock:
            buf = self._spare
            if buf is not None and nbytes <= len(buf) <= 2 * nbytes:  # the spare fits (not much too big either)
                self._spare = None
            else:
                buf = None
        if buf is None:
            buf = anonymous_memory(nbytes)
        owner = np.frombuffer(buf, dtype, n)
        weakref.finalize(owner, self._give_back, buf).atexit = False
        return owner.reshape(shape)

    def _give_back(self, buf) -> None:
        with self._lock:
            if self._spare is None or len(buf) >= len(self._spare):
                self._spare = buf


BUFFERS = BufferPool(POOL_MIN_BYTES)


@lru_cache(maxsize=64)
def _upper(t: int) -> np.ndarray:
    """[t, t] bool, True strictly above the diagonal: the keys after each query in a causal square."""
    return np.triu(np.ones((t, t), bool), 1)


def _attend_block(q, k, v, bias, out, scale: float, allowed=None, probs=None, cut: bool = False) -> bool:
    """softmax((q * scale) @ k.T + bias, masked) @ v for one block, written into ``out``; False (nothing written)
    when a cut causal block cannot stand for the full row.

    q [h, t, D], k and v [h, s, D], bias [h, 1, s] (ALiBi), out [h, t, D] (a view of the context array).
    ``allowed`` [1, t, s] masks padding and the causal future; without it the block is causal with its queries
    at the last ``t`` key positions (a row without padding), so only that [t, t] square needs the mask. ``cut``:
    the row's keys after ``s`` were left out. The reference weighs them exp(finfo.min - row max), exactly 0 unless
    a query's row max is itself near finfo.min, -inf or NaN: then the block returns False, for its caller to
    compute it over all keys.
    ``probs`` [h, t, s], if given, receives the attention probabilities.
    Two passes over the [h, t, s] scores are saved against the teaching path: the scale multiplies q ([t, D]) rather
    than the scores, and the softmax is normalised after the product with ``v`` ([t, D] divisions instead of
    [t, s]). Both only change rounding (nothing at all for the scale when it is a power of two, as for D = 64).
    """
    scores = np.multiply(q, scale) @ k.transpose(0, 2, 1)  # [h, t, s]
    np.add(scores, bias, out=scores)
    lowest = np.finfo(scores.dtype).min
    if allowed is not None:
        np.copyto(scores, lowest, where=~allowed)
    else:
        t = scores.shape[1]
        np.copyto(scores[:, :, scores.shape[2] - t:], lowest, where=_upper(t))
    top = np.max(scores, axis=-1, keepdims=True)  # [h, t, 1]
    if cut and not np.min(top) > lowest / 2:  # the cut keys would not weigh exactly 0 (NaN compares False)
        return False
    np.subtract(scores, top, out=scores)
    np.exp(scores, out=scores)
    den = np.sum(scores, axis=-1, keepdims=True)  # [h, t, 1]
    np.matmul(scores, v, out=out)
    np.divide(out, den, out=out)
    if probs is not None:  # the probabilities themselves, when asked for: [h, t, s]
        np.divide(scores, den, out=probs)
    return True


def _blockwise(q, k, v, alibi, allowed) -> bool:
    """Whether ``attend``'s blocks compute these inputs as the reference does: q [B, H, T, D] and k, v [B, H, S, D]
    of one float dtype that already holds the reference's result type, no empty axis, and ``allowed`` / ``alibi``
    broadcasting to [B, 1, T, S] / [B, H, 1, S] (the shapes ``model.forward`` builds). Anything else the reference
    accepts (a mask or bias per head or per query, q, k, v broadcasting against each other, mixed dtypes that
    promote, an empty axis) is left to the reference."""
    if not all(isinstance(a, np.ndarray) for a in (q, k, v, alibi)) or not q.ndim == k.ndim == v.ndim == 4:
        return False
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D or 0 in q.shape or 0 in k.shape:
        return False
    if q.dtype.kind != "f" or np.result_type(q, k, v, alibi) != q.dtype:
        return False
    S = k.shape[2]
    return _broadcasts_to(np.shape(allowed), (B, 1, T, S)) and _broadcasts_to(alibi.shape, (B, H, 1, S))


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` broadcasts to exactly ``target`` (``np.broadcast_shapes`` without its cost)."""
    return len(shape) <= len(target) and all(n == 1 or n == t for n, t in zip(reversed(shape), reversed(target)))


def attend(q, k, v, alibi, allowed, probs: bool = False):
    """``model.attend`` in L2-sized blocks: q [B, H, T, D], k and v [B, H, S, D], alibi [B, H, 1, S], allowed
    [B, 1, T, S] -> context [B, T, H, D] (and probabilities [B, H, T, S] when ``probs``).

    What it exploits, and how it checks each assumption (inputs outside them get the reference's computation):

    - the shapes and dtypes ``model.forward`` passes (``_blockwise``); ``allowed`` and ``alibi`` may still broadcast
      over the batch, and ``allowed`` may be any dtype (read as truthiness, as the reference's ``where`` does);
    - a causal row: a batch row whose mask equals the causal pattern (``causal_mask``, with T <= S so every query
      sees a key) has its blocks cut to the keys they can see (see ``_attend_block``). The cut keys would get
      exp(finfo.min - row max) = 0 in the reference, which holds while every query's largest visible score is above
      finfo.min / 2: a block whose row maximum is lower, -inf or NaN is recomputed over all S keys with its mask.
      Any other row (padding, a bidirectional or arbitrary mask, a query that sees nothing) is masked in full.
    """
    if _one_query(q, k, v, alibi, allowed):
        return attend_one(q, k, v, alibi, allowed, probs)
    if not _blockwise(q, k, v, alibi, allowed):
        return M.attend(q, k, v, alibi, allowed, probs)
    B, H, T, D = q.shape
    S = k.shape[2]
    past = S - T  # keys before the first query
    allowed = np.asarray(allowed)
    allowed = np.broadcast_to(allowed if allowed.dtype == bool else allowed.astype(bool), (B, 1, T, S))
    alibi = np.broadcast_to(alibi, (B, H, 1, S))
    causal = causal_mask(T, S) if past >= 0 else None
    if causal is None:
        full_rows = [False] * B
    elif allowed.strides[0] == 0:  # one mask for the whole batch: checked once
        full_rows = [np.array_equal(allowed[0, 0], causal)] * B
    else:
        full_rows = [np.array_equal(allowed[b, 0], causal) for b in range(B)]
    scale = 1.0 / math.sqrt(D)
    ctx = np.empty((B, T, H, D), q.dtype)
    weights = np.zeros((B, H, T, S), q.dtype) if probs else None
    hg = H if H * T * S <= SCORE_BLOCK_ELEMS else min(H, HEADS_PER_BLOCK)  # decoding: all heads in one block
    step = max(1, min(T, SCORE_BLOCK_ELEMS // (hg * S)))
    for b in range(B):
        for h0 in range(0, H, hg):
            h = slice(h0, min(H, h0 + hg))
            for t0 in range(0, T, step):
                t1 = min(T, t0 + step)
                out = ctx[b, t0:t1, h].transpose(1, 0, 2)
                if full_rows[b]:  # only the keys this block can see
                    s = past + t1
                    if _attend_block(q[b, h, t0:t1], k[b, h, :s], v[b, h, :s], alibi[b, h, :, :s], out, scale,
                                     None, None if weights is None else weights[b, h, t0:t1, :s], cut=s < S):
                        continue
                _attend_block(q[b, h, t0:t1], k[b, h], v[b, h], alibi[b, h], out, scale, allowed[b, :, t0:t1],
                              None if weights is None else weights[b, h, t0:t1])
    return ctx, weights


def _one_query(q, k, v, alibi, allowed) -> bool:
    """Whether ``attend_one`` takes these inputs: one query per row (q [B, H, 1, D]), k and v [B, H, S, D], all four
    arrays of one float dtype, ``alibi`` and ``allowed`` broadcasting to the scores' shape [B, H, 1, S]."""
    if type(q) is not np.ndarray or q.ndim != 4 or q.shape[2] != 1 or type(k) is not np.ndarray \
            or type(v) is not np.ndarray or type(alibi) is not np.ndarray:
        return False
    dt = q.dtype
    if dt.kind != "f" or k.dtype != dt or v.dtype != dt or alibi.dtype != dt or k.shape != v.shape or k.ndim != 4:
        return False
    B, H, _, D = q.shape
    S = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D or 0 in q.shape or S == 0:
        return False
    scores = (B, H, 1, S)
    mask = allowed.shape if type(allowed) is np.ndarray else np.shape(allowed)
    return (alibi.shape == scores or _broadcasts_to(alibi.shape, scores)) \
        and (mask == (B, 1, 1, S) or _broadcasts_to(mask, scores))  # the shapes model.forward builds, then others


def attend_one(q, k, v, alibi, allowed, probs: bool = False):
    """``model.attend`` for one query per row (decoding): the reference's operations in its order, on one scores
    array [B, H, 1, S] updated in place (bitwise equal to the reference). No blocking, no causal cut (a single
    last query sees every key the mask allows) and no broadcast copy of the mask: the mask is applied only where it
    hides a key (a left-padded row), and read as truthiness as the reference's ``where`` does.

    q [B, H, 1, D], k and v [B, H, S, D], alibi and allowed broadcasting to [B, H, 1, S] (``_one_query``) ->
    context [B, 1, H, D] (C-ordered) and the probabilities [B, H, 1, S] when ``probs``.
    """
    scores = np.matmul(q, k.mT)  # [B, H, 1, S]
    np.multiply(scores, 1.0 / math.sqrt(q.shape[-1]), out=scores)
    np.add(alibi, scores, out=scores)
    allowed = np.asarray(allowed)
    if not allowed.all():
        hidden = np.logical_not(allowed) if allowed.dtype == bool else allowed == 0
        np.copyto(scores, np.finfo(scores.dtype).min, where=hidden)
    top = np.maximum.reduce(scores, axis=-1, keepdims=True)
    np.subtract(scores, top, out=scores)
    np.exp(scores, out=scores)
    np.divide(scores, np.add.reduce(scores, axis=-1, keepdims=True), out=scores)
    B, H, _, D = q.shape
    ctx = np.empty((B, 1, H, D), q.dtype)
    np.matmul(scores, v, out=ctx.reshape(B, H, 1, D))  # [B, H, 1, D] and [B, 1, H, D] share their memory order
    return ctx, (scores if probs else None)


@lru_cache(maxsize=16)
def causal_mask(T: int, S: int) -> np.ndarray:
    """[T, S] booleans: query t (the last T of S positions) sees keys 0 .. S - T + t."""
    m = np.tri(T, S, S - T, dtype=bool)
    m.setflags(write=False)
    return m


def head(x: np.ndarray, weight) -> np.ndarray:
    """``model.head``: x [B, T, C] @ weight.T -> [B, T, V] (``logits_product``)."""
    B, T, C = x.shape
    return _reshape(logits_product(_reshape(x, (-1, C)), weight), (B, T, weight.shape[0]))


def logits_product(x2: np.ndarray, head) -> np.ndarray:
    """x2 [N, C] @ head.T for the head [V, C] -> logits [N, V]; many rows go into reused memory (``BUFFERS``)."""
    if x2.shape[0] > SKINNY_ROWS and isinstance(head, np.ndarray):
        return np.matmul(x2, head.mT, out=BUFFERS.empty((x2.shape[0], head.shape[0]), x2.dtype))
    return matmul_t(x2, head)


# ---------------------------------------------------------------------------------------------------------------
# Training kernels: minibloom.backward's hot spots, in place and in cache-sized blocks (same formulas)


def gelu(x: np.ndarray) -> np.ndarray:
    """``model.gelu`` into a new array (``gelu_`` on a copy: the caller keeps the pre-activation)."""
    y = np.array(x, copy=True)
    gelu_(np.reshape(y, (-1, y.shape[-1])))
    return y


def gelu_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``backward.gelu_backward`` written into ``dy``, a block of rows at a time."""
    d2, x2 = np.reshape(dy, (-1, dy.shape[-1])), np.reshape(x, (-1, x.shape[-1]))
    a, b = 0.79788456, 0.044715
    rows = max(1, GELU_BLOCK_ELEMS // x2.shape[-1])
    for r in range(0, x2.shape[0], rows):
        xb, db = x2[r:r + rows], d2[r:r + rows]
        sq = np.multiply(xb, xb)
        t = np.multiply(sq, b)
        np.add(t, 1.0, out=t)
        np.multiply(t, xb, out=t)
        np.multiply(t, a, out=t)
        np.tanh(t, out=t)  # tanh u
        np.multiply(sq, 3.0 * b, out=sq)
        np.add(sq, 1.0, out=sq)
        np.multiply(sq, a, out=sq)  # a (1 + 3 b x^2)
        u = np.multiply(t, t)
        np.subtract(1.0, u, out=u)  # 1 - tanh^2 u
        np.multiply(u, xb, out=u)
        np.multiply(u, sq, out=u)  # x (1 - tanh^2 u) a (1 + 3 b x^2)
        np.add(t, 1.0, out=t)
        np.add(t, u, out=t)
        np.multiply(t, 0.5, out=t)
        np.multiply(db, t, out=db)
    return dy


def attend_backward(dctx, q, k, v, probs):
    """``backward.attend_backward`` one batch row at a time, the softmax's backward in place in ``probs``.

    A causal row of T = S queries is done in two halves of queries: the first half's probabilities on the second
    half's keys are exactly 0 (checked), so its products skip those keys, a quarter of the work. Any other row (a
    pad's uniform row, a past) runs over all keys.
    """
    dctx, q, k, v, probs = (np.asarray(a) for a in (dctx, q, k, v, probs))
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(D)
    dq, dk, dv = np.empty_like(q), np.zeros_like(k), np.zeros_like(v)
    half = T // 2 if T == S and T >= 64 else 0
    for b in range(B):
        p = probs[b]  # [H, T, S]
        cut = half and not p[:, :half, half:].any()
        for t0, t1, s in ((0, half, half), (half, T, S)) if cut else ((0, T, S),):
            g = dctx[b, t0:t1].transpose(1, 0, 2)  # [H, t, D]
            pb = p[:, t0:t1, :s]  # [H, t, s]
            dv[b, :, :s] += pb.transpose(0, 2, 1) @ g  # dv = p^T dctx
            dp = g @ v[b, :, :s].transpose(0, 2, 1)  # [H, t, s]
            row = np.einsum("hts,hts->ht", dp, pb)[..., None]  # sum(dp p) over keys
            np.subtract(dp, row, out=dp)
            np.multiply(dp, pb, out=dp)  # ds
            np.matmul(dp, k[b, :, :s], out=dq[b, :, t0:t1])
            dk[b, :, :s] += dp.transpose(0, 2, 1) @ q[b, :, t0:t1]
    np.multiply(dq, scale, out=dq)
    np.multiply(dk, scale, out=dk)
    return dq, dk, dv


def layer_norm_backward(dy, x, weight, eps: float):
    """``backward.layer_norm_backward`` with fewer temporaries (x^ is rebuilt in place, g written into it)."""
    xc = x - _mean(x)
    r = _mean(xc * xc)
    np.add(r, eps, out=r)
    np.sqrt(r, out=r)
    np.divide(1.0, r, out=r)  # [..., 1]
    xhat = np.multiply(xc, r, out=xc)
    C = x.shape[-1]
    dy2 = np.reshape(dy, (-1, C))
    grads = {"weight": np.einsum("nc,nc->c", dy2, np.reshape(xhat, (-1, C))), "bias": np.add.reduce(dy2, axis=0)}
    g = dy * weight
    m1 = _mean(g)
    m2 = np.einsum("...c,...c->...", g, xhat)[..., None]
    np.divide(m2, C, out=m2)
    np.multiply(xhat, m2, out=xhat)
    np.subtract(g, m1, out=g)
    np.subtract(g, xhat, out=g)
    np.multiply(g, r, out=g)
    return g, grads


def cross_entropy(logits, labels):
    """``backward.cross_entropy`` with the gradient written over ``logits`` (one [B, T, V] pass per step)."""
    logits = np.ascontiguousarray(logits)
    B, T, V = logits.shape
    z, y = logits[:, :-1, :], np.asarray(labels)[:, 1:]
    scored = y != -100
    w = scored.astype(logits.dtype)
    w /= w.sum()
    y = np.where(scored, y, 0)[..., None]
    np.subtract(z, np.max(z, axis=-1, keepdims=True), out=z)
    picked = np.take_along_axis(z, y, axis=-1)[..., 0]  # z[label] after the shift
    np.exp(z, out=z)
    sum_e = np.sum(z, axis=-1)
    loss = -np.sum((picked - np.log(sum_e)) * w)
    np.multiply(z, (w / sum_e)[..., None], out=z)  # softmax / n
    np.put_along_axis(z, y, np.take_along_axis(z, y, axis=-1) - w[..., None], axis=-1)  # minus onehot / n
    logits[:, -1, :] = 0
    return loss, logits


PRIMITIVES = M.Primitives("numpy", layer_norm, linear, linear_gelu, attend, residual_add, head, gelu=gelu,
                          gelu_backward=gelu_backward, attend_backward=attend_backward, cross_entropy=cross_entropy,
                          layer_norm_backward=layer_norm_backward)
