"""How far one model's logits move from another's: the quantization report behind ``minibloom compare``.

Over a prompt set, with model A as the reference (e.g. the float32 source) and B the candidate (e.g. its GGUF Q4_0):

    max_abs  = max |zA - zB|                 max_rel = max_abs / max |zA|        mean_abs = mean |zA - zB|
    KL(A||B) = sum_v pA(v) (log pA(v) - log pB(v))   per position, in float64 (nats), then mean and max
    top1     = share of positions where argmax zA == argmax zB

(the KL of llama.cpp's ``llama-perplexity --kl-divergence``, on the same positions and prompts for both models).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from ..scoring import log_softmax64
from ..errors import MinibloomError


@dataclass
class CompareReport:
    a: str
    b: str
    prompts: int
    positions: int
    max_abs: float
    max_rel: float
    mean_abs: float
    kl_mean: float
    kl_max: float
    top1: float

    def table(self) -> str:
        rows = [("reference (A)", self.a), ("candidate (B)", self.b),
                ("prompts x positions", f"{self.prompts} prompts, {self.positions} positions"),
                ("max |A-B|", f"{self.max_abs:.4g}"), ("max |A-B| / max |A|", f"{self.max_rel:.3e}"),
                ("mean |A-B|", f"{self.mean_abs:.4g}"), ("KL(A||B) mean (nats)", f"{self.kl_mean:.3e}"),
                ("KL(A||B) max (nats)", f"{self.kl_max:.3e}"), ("top-1 agreement", f"{100 * self.top1:.2f} %")]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray) -> np.ndarray:
    """KL(P || Q) per position (all axes but the last), float64, from logits."""
    lp, lq = log_softmax64(logits_p), log_softmax64(logits_q)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def random_prompts(vocab: int, n: int = 4, length: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` prompts of ``length`` uniformly random token ids [n, length]."""
    if n <= 0 or length <= 0:
        raise MinibloomError(f"prompts: need a positive count and length, got {n} x {length}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise MinibloomError(f"seed: must be an integer in [0, 2**63), got {seed!r}")
    return np.random.default_rng(seed).integers(0, vocab, (n, length))


def _prompt_rows(prompts, vocab: int) -> list[np.ndarray]:
    """``prompts`` as checked 1-D int64 rows: each non-empty, integers in [0, vocab); errors name the prompt."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise MinibloomError(f"prompts: expected an id array [N, T] or a list of id lists, got "
                             f"{type(prompts).__name__}")
    if len(prompts) == 0:
        raise MinibloomError("prompts: the prompt set is empty")
    rows = []
    for i, p in enumerate(prompts):
        try:
            r = np.asarray(p)
        except (ValueError, TypeError, OverflowError):
            r = None
        if r is None or r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            got = type(p).__name__ if r is None else f"shape {r.shape} and dtype {r.dtype}"
            raise MinibloomError(f"prompts[{i}]: expected a 1-D list of token ids, got {got}")
        if r.size == 0:
            raise MinibloomError(f"prompts[{i}]: an empty prompt (every prompt needs at least one token)")
        bad = (r < 0) | (r >= vocab)
        if bad.any():
            raise MinibloomError(f"prompts[{i}]: token id {int(r[bad][0])} is out of range [0, {vocab})")
        rows.append(r.astype(np.int64))
    return rows


def compare_models(a, b, prompts, progress: bool = False) -> CompareReport:
    """Compare ``Bloom`` models ``a`` (reference) and ``b`` over ``prompts`` (an id array [N, T] or a list of
    1-D id lists), one prompt at a time so memory holds two [T, V] logit arrays at most."""
    for name, m in (("a", a), ("b", b)):
        if not callable(m) or not isinstance(getattr(m, "vocab_size", None), int):
            raise MinibloomError(f"{name}: expected a loaded minibloom.Bloom, got {type(m).__name__}")
    if a.vocab_size != b.vocab_size:
        raise MinibloomError(f"compare: vocab sizes differ ({a.path}: {a.vocab_size}, {b.path}: {b.vocab_size})")
    rows = _prompt_rows(prompts, a.vocab_size)
    max_abs = max_ref = sum_abs = 0.0
    kls, agree, count = [], 0, 0
    for ids in rows:
        za = np.asarray(a(ids[None]), np.float64)[0]
        zb = np.asarray(b(ids[None]), np.float64)[0]
        d = np.abs(za - zb)
        max_abs, max_ref = max(max_abs, float(d.max())), max(max_ref, float(np.abs(za).max()))
        sum_abs += float(d.sum())
        kls.append(kl_divergence(za, zb))
        agree += int((za.argmax(-1) == zb.argmax(-1)).sum())
        count += za.shape[0]
        if progress:
            print(f"  prompt {len(kls)}/{len(rows)} done", flush=True)
    kl = np.concatenate(kls)
    return CompareReport(a=str(a.path), b=str(b.path), prompts=len(rows), positions=count, max_abs=max_abs,
                         max_rel=max_abs / max_ref if max_ref else max_abs, mean_abs=sum_abs / (count * a.vocab_size),
                         kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1=agree / count)
