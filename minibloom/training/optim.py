"""AdamW, its learning-rate schedule and gradient clipping, on flat dicts of arrays (any array-API namespace).

References:
- Loshchilov, Hutter, "Decoupled Weight Decay Regularization" (AdamW, arXiv:1711.05101); Kingma, Ba, "Adam"
  (arXiv:1412.6980).
- pytorch ``torch/optim/adamw.py`` (``_single_tensor_adamw``): the update below is torch's, in its order of
  operations, so that parameters after N steps equal ``torch.optim.AdamW``'s (tests/test_training.py).
- pytorch ``torch/nn/utils/clip_grad.py`` (``clip_grad_norm_``); the warm-up + cosine schedule of nanoGPT.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ..errors import MinibloomError, shown


def _ns(x):
    return x.__array_namespace__()


@dataclass
class AdamW:
    """``torch.optim.AdamW`` over ``params`` ({name: array}, updated in place).

    ``decay``: the names that get weight decay (default: matrices, as nanoGPT and most BLOOM recipes: biases and
    LayerNorm weights are not decayed). ``state``: the step count and the two moments per name, what a checkpoint
    must keep to resume exactly.
    """

    params: dict
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    decay: frozenset | None = None
    step_count: int = 0
    m: dict = field(default_factory=dict)  # exp_avg
    v: dict = field(default_factory=dict)  # exp_avg_sq

    def __post_init__(self):
        check_hyper(self.lr, self.betas, self.eps, self.weight_decay)
        if not isinstance(self.params, dict):
            raise MinibloomError(f"AdamW: params must be a dict of arrays, got {type(self.params).__name__}")
        if self.decay is None:
            self.decay = frozenset(n for n, p in self.params.items() if p.ndim >= 2)
        for name, p in self.params.items():
            xp = _ns(p)
            self.m.setdefault(name, xp.zeros_like(p))
            self.v.setdefault(name, xp.zeros_like(p))

    def step(self, grads: dict, lr: float | None = None) -> None:
        """One update with ``grads`` ({name: array}, the same names); ``lr`` overrides the base rate (a schedule)."""
        lr = self.lr if lr is None else number("lr", lr)
        b1, b2 = self.betas
        self.step_count += 1
        t = self.step_count
        bias1, bias2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
        for name, p in self.params.items():
            xp = _ns(p)
            g, m, v = grads[name], self.m[name], self.v[name]
            if name in self.decay:
                p *= 1 - lr * self.weight_decay  # decoupled: the weights shrink, the moments never see it
            m += (g - m) * (1 - b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v *= b2
            v += g * g * (1 - b2)  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = xp.sqrt(v) / bias2_sqrt + self.eps
            p -= m / denom * (lr / bias1)

    def state_dict(self) -> dict:
        """{"step": int, "m.NAME": array, "v.NAME": array}: what ``load_state_dict`` needs to resume."""
        return {"step": self.step_count, **{f"m.{n}": a for n, a in self.m.items()},
                **{f"v.{n}": a for n, a in self.v.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``'s output, checked as strictly as a checkpoint: the step count an integer in
        [0, ``MAX_STEP``], every moment present, of its parameter's shape and float dtype, finite, and the second
        moments never negative. Anything else is a MinibloomError naming it (nothing is changed then)."""
        if not isinstance(state, dict):
            raise MinibloomError(f"optimizer state: expected a dict, got {type(state).__name__}")
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
            raise MinibloomError(f"optimizer state: its step count (optimizer_step) must be an integer in "
                                 f"[0, {MAX_STEP}], got {shown(step)}")
        extra = [k for k in state if k != "step" and (k[:2] not in ("m.", "v.") or k[2:] not in self.params)]
        if extra:
            raise MinibloomError(f"optimizer state: {extra[0]!r} is not a moment of this model's parameters")
        for n, p in self.params.items():
            for kind in ("m", "v"):
                got = state.get(f"{kind}.{n}")
                if got is None or not hasattr(got, "shape") or tuple(got.shape) != tuple(p.shape):
                    raise MinibloomError(f"optimizer state {kind}.{n} is "
                                         f"{'missing' if got is None else f'shaped {_shape(got)}'}; the parameter "
                                         f"is {tuple(p.shape)}")
                dtype = getattr(got, "dtype", None)
                if str(dtype) != str(p.dtype):
                    raise MinibloomError(f"optimizer state {kind}.{n}: dtype {dtype}, the parameter's is {p.dtype}")
                xp = _ns(p)
                a = xp.asarray(got)
                if not bool(xp.all(xp.isfinite(a))):
                    raise MinibloomError(f"optimizer state {kind}.{n}: holds NaN or inf (moments must be finite)")
                if kind == "v" and bool(xp.any(a < 0)):
                    raise MinibloomError(f"optimizer state v.{n}: a negative second moment (it is a mean of squares)")
        self.step_count = step
        for n, p in self.params.items():
            xp = _ns(p)
            self.m[n] = xp.asarray(state[f"m.{n}"], dtype=p.dtype, copy=True)
            self.v[n] = xp.asarray(state[f"v.{n}"], dtype=p.dtype, copy=True)


MAX_STEP = 10**9  # optimizer steps a run may count (NumPy training runs far fewer)


def _shape(a) -> tuple:
    try:
        return tuple(a.shape)
    except TypeError:
        return ("?",)


def number(name: str, v, lo: float = 0.0, hi: float = math.inf, hi_open: bool = False) -> float:
    """``v`` as a float if it is a finite real number (not a bool) in [lo, hi] (or [lo, hi) with ``hi_open``);
    a MinibloomError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise MinibloomError(f"{name}: must be a number, got {shown(v)}")
    try:
        f = float(v)
    except (OverflowError, ValueError, TypeError):
        raise MinibloomError(f"{name}: must be a finite number, got {shown(v)}") from None
    if not math.isfinite(f) or f < lo or f > hi or (hi_open and f >= hi):
        bound = f"[{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise MinibloomError(f"{name}: must be a finite number in {bound}, got {shown(v)}")
    return f


def check_hyper(lr, betas, eps, weight_decay) -> None:
    """AdamW's hyper-parameters: lr, eps and weight decay finite numbers >= 0, betas a pair of numbers in [0, 1)."""
    number("lr", lr)
    number("eps", eps)
    number("weight_decay", weight_decay)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise MinibloomError(f"betas: must be a pair of numbers in [0, 1), got {shown(betas)}")
    for b in betas:
        number("betas", b, 0.0, 1.0, hi_open=True)


def lr_at(step: int, lr: float, warmup: int, steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio`` at ``steps``
    (``step`` counts from 0)."""
    for name, v in (("step", step), ("warmup", warmup), ("steps", steps)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 0 <= v <= MAX_STEP:
            raise MinibloomError(f"{name}: must be an integer in [0, {MAX_STEP}], got {shown(v)}")
    lr, min_lr_ratio = number("lr", lr), number("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def global_norm(grads: dict) -> float:
    """sqrt of the sum of every gradient entry squared (torch's ``total_norm`` with norm_type 2)."""
    total = 0.0
    for g in grads.values():
        xp = _ns(g)
        total += float(xp.sum(g * g))
    return math.sqrt(total)


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale ``grads`` in place so their global norm is at most ``max_norm`` (``clip_grad_norm_``: the factor is
    max_norm / (norm + 1e-6), capped at 1). Returns the norm before clipping."""
    max_norm = number("max_norm", max_norm)
    norm = global_norm(grads)
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return norm
