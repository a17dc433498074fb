"""The NumPy fast path of ``minibloom.model.forward``: the same maths, fewer passes over memory.

``minibloom.model`` is the teaching path and stays the definition; this module computes the same function for the
NumPy backend (``Bloom.forward`` uses it there; ``tests/test_fast.py`` holds the two equal: float64 to 1e-12,
float32 to float32 rounding). What changes is only how the arrays are handled:

- elementwise work (LayerNorm, GeLU, bias and residual adds) is done in place, in the teaching path's order of
  operations, so the float32 results are bitwise the same and no [T, 4C] temporaries pile up;
- attention runs per batch row, group of heads and block of queries (a block fits in the L2 cache), and a block of
  a row without padding only looks at the keys it can see (causal: keys up to its last query), which skips the
  masked upper half of the prompt's score matrix and confines the mask to the block's last [t, t] square. The
  skipped cells are exact zeros after the softmax, so only the order of the softmax sum changes (rounding). The
  scale goes on q and the softmax's division on the [t, D] result (``attend``): two fewer passes over the scores,
  again only a matter of rounding. Rows with padding see every key, as in the teaching path (a fully masked pad
  query is uniform over all S keys);
- only the logits asked for are computed (``logits="last"`` multiplies one row per sequence by the head); many
  logits go into memory reused from earlier calls' logits once those are gone (``BufferPool``);
- products with a few rows (batched decoding) put the weight first, ``(W @ x.T).T``, which OpenBLAS runs much faster
  than ``x @ W.T`` (``matmul_t``).

Configurations it does not cover run the teaching path: ``output_attentions=True`` and HF's
``pretraining_tp``/``slow_but_exact`` sliced products. So does any call made while a function of
``minibloom.model`` has been replaced (tests and tools patch ``model.linear`` or ``model.block`` to simulate a kernel
or a bug in minibloom; the patch must then take effect).
"""

from __future__ import annotations

import math
import threading
import weakref
from functools import lru_cache

import numpy as np

from . import model as M
from .config import BloomConfig
from .safetensors import anonymous_memory

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
    s = np.add.reduce(x, axis=-1, keepdims=True)
    np.divide(s, x.shape[-1], out=s)
    return s


def layer_norm(x: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    """``model.layer_norm`` with one temporary: (x - mean) / sqrt(var + eps) * weight + bias."""  # [N, C]
    xc = x - _mean(x)
    sq = xc * xc
    var = _mean(sq)
    np.add(var, eps, out=var)
    np.sqrt(var, out=var)
    np.divide(xc, var, out=xc)
    np.multiply(xc, weight, out=xc)
    np.add(xc, bias, out=xc)
    return xc


def gelu_(x: np.ndarray, bias=None) -> np.ndarray:
    """``model.gelu(x + bias)`` in place, in its order of operations:
    x*0.5 * (1 + tanh(0.79788456*x * (1 + 0.044715*x*x))).

    Works through ``x`` [N, F] a block of rows at a time, so the bias add and the two temporaries stay in cache.
    """
    rows = max(1, GELU_BLOCK_ELEMS // x.shape[-1])
    for r in range(0, x.shape[0], rows):
        xb = x[r:r + rows]
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
    dimension, not the N rows, which is 1.5x faster on one thread and several times faster on two (measured with
    N = 2 .. 128 for bloom-560m's shapes). Same products and sums; only BLAS's blocking (so rounding) may differ.
    """
    if 1 < x2.shape[0] <= SKINNY_ROWS and isinstance(w, np.ndarray):
        return np.ascontiguousarray((w @ x2.T).T)
    return x2 @ w.mT


def linear(x2: np.ndarray, p: dict) -> np.ndarray:
    """x2 [N, in] @ W.T + b, the bias added in place."""  # -> [N, out]
    y = matmul_t(x2, p["weight"])
    np.add(y, p["bias"], out=y)
    return y


class BufferPool:
    """Memory for big output arrays (all the logits of a long prompt), reused once an earlier array is gone.

    Fresh memory is paid for on first touch: the kernel faults it in page by page, and on a virtual machine that
    hands freed memory back to its host (free page reporting, as on the 2-core machines of issue 8) the host must
    back it again too. For bloom-560m's 512 x 250880 float32 logits (514 MB) that measured 0.16-1.1 s there,
    against 1.4 s for the head's product itself. The pool keeps the memory of the last such array once nothing
    refers to it any more (no view, no buffer export: ``weakref.finalize`` on the array that owns the mapping, which
    every view keeps alive) and hands it to the next request of a similar size. It holds at most one spare buffer;
    ``clear()`` drops it.
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
            self._spare = buf

    def clear(self) -> None:
        """Forget the spare buffer (its memory goes back to the system)."""
        with self._lock:
            self._spare = None


BUFFERS = BufferPool(POOL_MIN_BYTES)


@lru_cache(maxsize=64)
def _upper(t: int) -> np.ndarray:
    """[t, t] bool, True strictly above the diagonal: the keys after each query in a causal square."""
    return np.triu(np.ones((t, t), bool), 1)


def attend(q, k, v, bias, out, scale: float, allowed=None) -> None:
    """softmax((q * scale) @ k.T + bias, masked) @ v for one block, written into ``out``.

    q [h, t, D], k and v [h, s, D], bias [h, 1, s] (ALiBi), out [h, t, D] (a view of the context array).
    ``allowed`` [1, t, s] masks padding and the causal future; without it the block is causal with its queries
    at the last ``t`` key positions (a row without padding), so only that [t, t] square needs the mask.
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
    np.subtract(scores, np.max(scores, axis=-1, keepdims=True), out=scores)
    np.exp(scores, out=scores)
    den = np.sum(scores, axis=-1, keepdims=True)  # [h, t, 1]
    np.matmul(scores, v, out=out)
    np.divide(out, den, out=out)


def attention(x2, p, alibi, allowed, full_rows, B: int, T: int, n_head: int, cache=None, layer: int = 0,
              keep: int | None = None):
    """BloomAttention on x2 [B*T, C] -> [B*keep, C] (``model.attention`` without returning the probabilities).

    Keys and values are made for all T positions (and cached); queries only for the last ``keep`` (default all T).
    The score matrix is cut into blocks of (batch row, a few heads, a few queries) sized to stay in the L2 cache.
    """
    C = x2.shape[1]
    H, D = n_head, C // n_head
    qkv = np.reshape(linear(x2, p["query_key_value"]), (B, T, H, 3, D))
    q = qkv[:, :, :, 0, :].transpose(0, 2, 1, 3)  # [B, H, T, D] views
    k = qkv[:, :, :, 1, :].transpose(0, 2, 1, 3)
    v = qkv[:, :, :, 2, :].transpose(0, 2, 1, 3)
    if cache is not None:
        k, v = cache.update(layer, k, v)  # [B, H, S, D]
    S = k.shape[2]
    Tq = T if keep is None else keep
    past = S - Tq  # keys before the first query
    q = q[:, :, T - Tq:]
    allowed = allowed[:, :, T - Tq:]
    scale = 1.0 / math.sqrt(D)
    ctx = np.empty((B, Tq, H, D), x2.dtype)
    hg = H if H * Tq * S <= SCORE_BLOCK_ELEMS else min(H, HEADS_PER_BLOCK)  # decoding: all heads in one block
    step = max(1, min(Tq, SCORE_BLOCK_ELEMS // (hg * S)))
    for b in range(B):
        for h0 in range(0, H, hg):
            h = slice(h0, min(H, h0 + hg))
            for t0 in range(0, Tq, step):
                t1 = min(Tq, t0 + step)
                s = past + t1 if full_rows[b] else S  # keys this block can see (all of them when the row has padding)
                mask = None if full_rows[b] else allowed[b, :, t0:t1, :s]
                attend(q[b, h, t0:t1], k[b, h, :s], v[b, h, :s], alibi[b, h, :, :s],
                       ctx[b, t0:t1, h].transpose(1, 0, 2), scale, mask)
    return linear(np.reshape(ctx, (B * Tq, C)), p["dense"])


def _last(x2: np.ndarray, B: int, T: int, keep: int | None) -> np.ndarray:
    """The rows of the last ``keep`` positions of each sequence in x2 [B*T, C] -> [B*keep, C] (all if None)."""
    if keep is None or keep == T:
        return x2
    return np.reshape(np.reshape(x2, (B, T, -1))[:, T - keep:], (B * keep, -1))


def block(x2, p, alibi, allowed, full_rows, B: int, T: int, cfg: BloomConfig, cache=None, layer: int = 0,
          keep: int | None = None):
    """BloomBlock on x2 [B*T, C] (``model.block``); returns a new array, ``x2`` is left as it was.

    ``keep``: only the outputs of each sequence's last ``keep`` positions are wanted ([B*keep, C]); the keys and
    values of all positions are still computed (and cached). ``forward`` uses it in the last layer when only the
    last logits are asked for: that layer's attention output and MLP then run on one row per sequence.
    """
    eps = cfg.layer_norm_epsilon
    post = cfg.apply_residual_connection_post_layernorm
    # each sub-module is read once: lazy layers (low-memory, quantized) widen its weights on every access
    ln = p["input_layernorm"]
    ln1 = layer_norm(x2, ln["weight"], ln["bias"], eps)
    a = attention(ln1, p["self_attention"], alibi, allowed, full_rows, B, T, cfg.n_head, cache, layer, keep)
    np.add(a, _last(ln1 if post else x2, B, T, keep), out=a)  # x = residual + attention
    ln = p["post_attention_layernorm"]
    ln2 = layer_norm(a, ln["weight"], ln["bias"], eps)
    mlp = p["mlp"]
    h4h = mlp["dense_h_to_4h"]
    h = gelu_(matmul_t(ln2, h4h["weight"]), h4h["bias"])  # the bias is added block by block, in cache
    out = linear(h, mlp["dense_4h_to_h"])
    del h, mlp
    np.add(out, ln2 if post else a, out=out)
    return out


def logits_product(x2: np.ndarray, head) -> np.ndarray:
    """x2 [N, C] @ head.T for the head [V, C] -> logits [N, V]; many rows go into reused memory (``BUFFERS``)."""
    if x2.shape[0] > SKINNY_ROWS and isinstance(head, np.ndarray):
        return np.matmul(x2, head.mT, out=BUFFERS.empty((x2.shape[0], head.shape[0]), x2.dtype))
    return matmul_t(x2, head)


_TEACHING = {name: getattr(M, name) for name in ("layer_norm", "gelu", "softmax", "linear", "alibi_bias", "causal_mask",
                                                  "attention", "mlp", "block", "forward")}


def supported(cfg: BloomConfig, output_attentions: bool = False) -> bool:
    """Whether ``forward`` below covers this call (otherwise use ``model.forward``)."""
    patched = any(getattr(M, name) is not f for name, f in _TEACHING.items())
    return not (output_attentions or patched or (cfg.slow_but_exact and cfg.pretraining_tp > 1))


def forward(params, input_ids, attention_mask, cfg: BloomConfig, cache=None, output_hidden_states: bool = False,
            output_attentions: bool = False, logits: str = "all") -> M.BloomOutput:
    """``model.forward`` for NumPy arrays (same arguments, same ``BloomOutput``)."""
    if not supported(cfg, output_attentions):
        return M.forward(params, input_ids, attention_mask, cfg, cache=cache, output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions, logits=logits)
    E = params["word_embeddings"]["weight"]  # [V, C]
    B, T = input_ids.shape
    x = np.take(E, np.reshape(input_ids, (-1,)), axis=0)  # [B*T, C]
    eln = params["word_embeddings_layernorm"]
    x = layer_norm(x, eln["weight"], eln["bias"], cfg.layer_norm_epsilon)
    dtype = x.dtype
    slopes = M._slopes_on(np, cfg.n_head, "float64" if dtype == np.float64 else "float32")
    alibi = M.alibi_bias(attention_mask, slopes).astype(dtype, copy=False)  # [B, H, 1, S]
    allowed = M.causal_mask(attention_mask, T)  # [B, 1, T, S]
    full_rows = np.all(attention_mask != 0, axis=-1)  # [B]: rows without padding
    C = x.shape[1]
    hidden = [x]
    # without all logits or hidden states, the last layer only needs its last position's output (keys and values
    # of every position are still made for the cache)
    keep = None if (logits == "all" or output_hidden_states) else 1
    n = len(params["h"])
    for i, p in enumerate(params["h"]):
        x = block(x, p, alibi, allowed, full_rows, B, T, cfg, cache, i, keep if i == n - 1 else None)
        if output_hidden_states:
            hidden.append(x)
    if cache is not None:
        cache.length += T
    x = layer_norm(x, params["ln_f"]["weight"], params["ln_f"]["bias"], cfg.layer_norm_epsilon)
    if output_hidden_states:
        hidden[-1] = x
        hidden = [np.reshape(h, (B, T, C)) for h in hidden]
    x = np.reshape(x, (B, -1, C))
    if logits == "last":
        x = x[:, -1:, :]
    head = params["lm_head"]["weight"] if "lm_head" in params else E  # tied to the embedding unless stored
    out = None
    if logits != "none":
        Bx, Tx, _ = x.shape
        out = np.reshape(logits_product(np.reshape(x, (-1, C)), head), (Bx, Tx, head.shape[0]))  # [B, T, V]
    return M.BloomOutput(out, hidden if output_hidden_states else None, None)
