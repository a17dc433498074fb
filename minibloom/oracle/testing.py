"""Verdict policies and assertions for checking BLOOM logits against minibloom (the project's own tests use these too).

Errors are measured over the positions the attention mask says are real, relative to the scale of the reference
(``max|a - b| / max|ref|``), because logit magnitudes vary by orders of magnitude between random test models and
trained checkpoints. One number is not enough for low precision: a policy (``Policy``) bounds up to five figures,

- ``rel``: max|actual - reference| / max|reference| over the logits;
- ``kl_mean`` / ``kl_max``: KL(reference || actual) of the next-token distributions, mean and max over positions;
- ``top1``: the least share of positions whose argmax token must agree;
- ``hidden_rel``: the same relative error for every hidden state of a trace (``minibloom diff``).

The limits per implementation kind (float32, float16, int8-dynamic, q8_0, nf4, ...) are *measured*: ``minibloom
calibrate`` (``minibloom/oracle/calibrate.py``) runs correct ports of every kind and a matrix of planted port bugs on
random and trained checkpoints and writes ``minibloom/oracle/policies.json``, which is read here; each limit sits
between the worst correct port and the bugs (docs/oracle.md, "Choosing a policy"). ``FP64_VS_HF`` and ``FP64_SELF``
are exact-arithmetic bounds, not calibrated: float64 against transformers in float64 with its float32 softmax and slopes
patched (~1e-15 observed), and float64 paths of minibloom against each other.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np

from .compare import kl_divergence
from ..errors import MinibloomError


DEFAULT_SIZE = (24, 1024)  # (n_layer, hidden_size) of bloom-560m: the size POLICIES' printed limits are shown at
MAX_N_LAYER = 4096  # bounds of a model size a verdict accepts (every BLOOM: at most 70 blocks, width 14336)
MAX_HIDDEN_SIZE = 65536


def check_size(size, what: str = "size") -> tuple[int, int]:
    """``size`` = (n_layer, hidden_size) as two bounded integers (1..MAX_N_LAYER, 1..MAX_HIDDEN_SIZE); anything else
    (a float, a bool, a number too large to scale a limit) raises ``MinibloomError`` naming ``what``."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise MinibloomError(f"{what}: expected (n_layer, hidden_size), got {size!r:.80}")
    return (check_dimension(size[0], "n_layer", MAX_N_LAYER, what),
            check_dimension(size[1], "hidden_size", MAX_HIDDEN_SIZE, what))


def check_dimension(value, key: str, most: int, what: str = "") -> int:
    """One model dimension: an integer (NumPy integers too, never a bool or a float) in 1..``most``."""
    where = f"{what}: {key}" if what else key
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise MinibloomError(f"{where}: must be an integer in 1..{most}, got {type(value).__name__} {value!r:.40}")
    if not 1 <= value <= most:
        text = str(value) if abs(value) < 10 ** 30 else f"a {len(str(abs(value)))}-digit integer"
        raise MinibloomError(f"{where}: must be in 1..{most}, got {text}")
    return int(value)


def scale(n_layer: int, hidden_size: int) -> float:
    """How rounding noise in the logits grows with the model: sqrt(n_layer * hidden_size) (docs/oracle.md,
    "Choosing a policy": noise / scale is near constant from 2 x 64 to the bloom-560m shape for every kind)."""
    n_layer, hidden_size = check_size((n_layer, hidden_size))
    return math.sqrt(n_layer * hidden_size)


def limits(pol: dict, n_layer: int, hidden_size: int) -> dict:
    """The limits of a policies.json entry (coefficients per unit of ``scale``, KL per scale squared, absolute
    floors) for a model of ``n_layer`` blocks of width ``hidden_size``."""
    s = scale(n_layer, hidden_size)
    f = pol["floors"]
    return {"rel": max(pol["rel"] * s, f["rel"]), "hidden_rel": max(pol["hidden_rel"] * s, f["rel"]),
            "kl_mean": max(pol["kl_mean"] * s * s, f["kl"]), "kl_max": max(pol["kl_max"] * s * s, f["kl"]),
            "top1": 1.0 - min(1.0, max(pol["disagreement"] * s, f["disagreement"]))}


@dataclass(frozen=True)
class Tolerance:
    """A verdict policy. ``rel`` always applies; the other parts apply when set (None = not checked).

    A calibrated policy also holds its per-scale coefficients (``coefficients``) and is sized for one model by
    ``at`` (``size`` = (n_layer, hidden_size)). Until then ``size`` is None and its limits are those of
    ``DEFAULT_SIZE`` (for display); ``check_logits`` refuses to judge with such an unsized policy.
    """

    rel: float  # on max|a - b| / max|ref|
    what: str
    kind: str = ""
    kl_mean: float | None = None  # nats
    kl_max: float | None = None
    top1: float | None = None  # minimum share of agreeing argmax tokens
    hidden_rel: float | None = None  # per hidden state in a trace (default: rel)
    reference: str = ""  # "same file" or "unquantized"
    coefficients: str | None = field(default=None, repr=False)  # the policies.json entry, as JSON
    size: tuple | None = None

    def at(self, n_layer: int, hidden_size: int) -> "Tolerance":
        """This policy's limits for a model of ``n_layer`` blocks of width ``hidden_size``."""
        n_layer, hidden_size = check_size((n_layer, hidden_size))
        if self.coefficients is None:
            return self
        lim = limits(json.loads(self.coefficients), n_layer, hidden_size)
        return replace(self, rel=lim["rel"], kl_mean=lim["kl_mean"], kl_max=lim["kl_max"], top1=lim["top1"],
                       hidden_rel=lim["hidden_rel"], size=(n_layer, hidden_size))

    @property
    def scales(self) -> bool:
        """Whether this policy's limits depend on the model's size (a calibrated kind)."""
        return self.coefficients is not None

    @property
    def probes(self) -> bool:
        """Whether a verdict that has the model sizes this policy by probing it (``probe_policy``): the statistical
        kinds, whose noise depends on the weights as much as on the size."""
        return self.coefficients is not None and "probe" in json.loads(self.coefficients)


Policy = Tolerance

FP64_VS_HF = Tolerance(1e-10, "float64 vs transformers float64 (softmax and slopes patched to float64)", "float64",
                       reference="same file")
FP64_SELF = Tolerance(1e-12, "float64 vs float64 within minibloom", "float64")

# Gradients: float64 vs float64 (torch autograd through transformers, patched as FP64_VS_HF) agree to ~5e-13;
# float32 gradients (minibloom's or torch's) are ~1e-6 from float64 on the test models; GRAD_FP32 keeps a margin
# for depth and width, and a real bug (a missing term, a wrong constant) is off by 1e-3 or more.
GRAD_FP64 = Tolerance(1e-10, "float64 gradients vs minibloom's float64 gradients", "float64")
GRAD_FP32 = Tolerance(1e-4, "float32 gradients vs minibloom's float64 gradients", "float32")

POLICY_FILE = os.path.join(os.path.dirname(__file__), "policies.json")
_WHAT = {
    "float32": "float32 implementation (BLAS order) vs minibloom float64",
    "float32-gelu-table": "float32 with ggml's fp16 GeLU table and fp16 KV cache (llama.cpp f32) vs minibloom float64",
    "float16": "float16 weights and activations vs minibloom float64 on the unquantized checkpoint",
    "bfloat16": "bfloat16 weights and activations vs minibloom float64 on the unquantized checkpoint",
    "int8-weight-only": "int8 weights, float activations vs minibloom float64 on the unquantized checkpoint",
    "int8-dynamic": "int8 weights and dynamically quantized activations (CTranslate2 int8, ONNX Runtime dynamic "
                    "int8) vs minibloom float64 on the unquantized checkpoint",
    "int4-weight-only": "group-wise int4 weights (sym or asym, groups of 32-128), float activations vs minibloom "
                        "float64 on the unquantized checkpoint",
    "int8-activations": "activations quantized as the engine does, on the engine's own (dequantized) weights vs "
                        "minibloom float64 on those weights with the same activation quantization emulated",
    "q8_0": "ggml Q8_0 kernels vs minibloom float64 on the same GGUF file",
    "q4_0": "ggml Q4_0 (and Q4_1 / Q5_x) kernels vs minibloom float64 on the same GGUF file",
    "q4_k": "ggml k-quant kernels (Q4_K ...) vs minibloom float64 on the same GGUF file",
    "nf4": "bitsandbytes 4-bit kernels vs minibloom float64 on the same bnb checkpoint",
}


def _load_policies(path: str = POLICY_FILE) -> dict[str, Tolerance]:
    with open(path) as f:
        doc = json.load(f)
    out = {}
    for kind, p in doc["policies"].items():
        coef = {k: p[k] for k in ("rel", "hidden_rel", "kl_mean", "kl_max", "disagreement", "floors", "probe")
                if k in p}
        sized = Tolerance(0.0, _WHAT.get(kind, kind), kind, reference=p["reference"],
                          coefficients=json.dumps(coef, sort_keys=True)).at(*DEFAULT_SIZE)
        out[kind] = replace(sized, size=None)  # shown at DEFAULT_SIZE; unsized for a verdict
    return out


POLICIES: dict[str, Tolerance] = {"float64": FP64_VS_HF, **_load_policies()}
FP32 = POLICIES["float32"]
FP16 = POLICIES["float16"]
BF16 = POLICIES["bfloat16"]
QUANTIZED = POLICIES["q4_k"] if POLICIES["q4_k"].rel >= POLICIES["q4_0"].rel else POLICIES["q4_0"]

_ALIASES = {
    "fp64": "float64", "double": "float64", "f64": "float64",
    "fp32": "float32", "float": "float32", "f32": "float32", "single": "float32",
    "fp16": "float16", "half": "float16", "f16": "float16", "int8_float16": "int8-dynamic",
    "bf16": "bfloat16", "int8_bfloat16": "int8-dynamic",
    "int8": "int8-dynamic", "int8_float32": "int8-dynamic", "qint8": "int8-dynamic", "quint8": "int8-dynamic",
    "int8-dynamic": "int8-dynamic", "int8_dynamic": "int8-dynamic", "dynamic-int8": "int8-dynamic",
    "int8-weight-only": "int8-weight-only", "int8_weight_only": "int8-weight-only", "w8a16": "int8-weight-only",
    "ggml-f32": "float32-gelu-table", "llama.cpp-f32": "float32-gelu-table",
    "int4": "int4-weight-only", "w4a16": "int4-weight-only", "int4_sym": "int4-weight-only",
    "int4_asym": "int4-weight-only", "int4-sym": "int4-weight-only", "int4-asym": "int4-weight-only",
    "int4_weight_only": "int4-weight-only", "qint4": "int4-weight-only",
    "int8_activations": "int8-activations", "w8a8-same-weights": "int8-activations",
    "fp4": "nf4", "bnb4": "nf4", "bnb-4bit": "nf4", "bnb_4bit": "nf4",
}


def _kind_name(name: str, implementation: str | None = None) -> str | None:
    """Canonical kind for a dtype / quantization name, or None when unknown."""
    n = name.strip().lower().replace("torch.", "")
    n = _ALIASES.get(n, n)
    if n in POLICIES:
        if n == "float32" and implementation and any(w in implementation.lower() for w in ("llama", "ggml", "gguf")):
            return "float32-gelu-table"
        return n
    if n.startswith("q8"):
        return "q8_0"
    if n.startswith(("q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq")):
        return "q4_k"
    if n.startswith(("q4", "q5")):
        return "q4_0"
    if n.startswith("nf4"):
        return "nf4"
    return None


def policy_for(kind, implementation: str | None = None, size: tuple[int, int] | None = None) -> Tolerance:
    """The verdict policy for ``kind``: a kind name (``KINDS`` of ``minibloom.oracle.calibrate``: "float32", "float16",
    "int8-dynamic", "q8_0", "nf4", ...), an alias ("fp16", "bf16", "int8", "Q4_K_M", CTranslate2's "int8_float16"),
    or a NumPy / torch dtype. ``implementation`` (a trace's ``meta["implementation"]``) names the engine: a float32
    llama.cpp / ggml port gets the ``float32-gelu-table`` policy. ``size`` = (n_layer, hidden_size) of the model
    sizes the limits; without it the policy is unsized (``check_logits`` then needs ``size=``). Raises
    ``MinibloomError`` for an unknown name."""
    if isinstance(kind, Tolerance):
        return kind if size is None else kind.at(*size)
    name = "" if kind is None else (kind if isinstance(kind, str) else str(getattr(kind, "name", None) or kind))
    canon = _kind_name(name, implementation)
    if canon is None:
        raise MinibloomError(f"kind: {name!r} names no verdict policy; use one of {', '.join(POLICIES)} "
                             "(or an alias such as fp16, bf16, int8, q4_k_m)")
    return POLICIES[canon] if size is None else POLICIES[canon].at(*size)


def tolerance_for(dtype, quantized: bool = False) -> Tolerance:
    """The policy for numbers computed in ``dtype`` (a name like "float16", "bf16", "q4_0", "nf4", or a NumPy /
    torch dtype); ``quantized`` with a float dtype means kernels on quantized weights (``QUANTIZED``); a name that
    names no policy -> ``FP32``."""
    try:
        pol = policy_for(dtype)
    except MinibloomError:
        pol = FP32
    if quantized and pol.kind in ("float32", "float16", "bfloat16", "float64", ""):
        return QUANTIZED
    return pol


def _as_policy(tol) -> Tolerance:
    if isinstance(tol, Tolerance):
        return tol
    if isinstance(tol, str):
        return policy_for(tol)
    return Tolerance(float(tol), f"max relative error {float(tol):.1e}", "custom")


def rel_error(actual, reference) -> float:
    """max|actual - reference| / max|reference| (computed in float64)."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {r.shape}")
    scale = np.max(np.abs(r)) if r.size else 0.0
    return float(np.max(np.abs(a - r)) / scale) if scale > 0 else float(np.max(np.abs(a - r), initial=0.0))


def assert_rel_close(actual, reference, tol: Tolerance | float, what: str = "") -> float:
    """Fail unless ``rel_error(actual, reference) <= tol`` (a policy's ``rel`` part); return the error."""
    limit = _as_policy(tol).rel
    err = rel_error(actual, reference)
    if not np.isfinite(err) or err > limit:
        a = np.asarray(actual, dtype=np.float64)
        r = np.asarray(reference, dtype=np.float64)
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(np.abs(a - r)), r.shape)) if r.size else ()
        raise AssertionError(f"{what or 'arrays'}: relative max error {err:.3e} > {limit:.1e} "
                             f"(max|ref| {float(np.max(np.abs(r))):.4g}; worst at {idx}: {float(a[idx]):.6g} vs "
                             f"{float(r[idx]):.6g})")
    return err


# ---- logits verdicts -------------------------------------------------------------------------------------------
def top1_fails(top1: float, positions: int | None, min_top1: float) -> bool:
    """Whether top-1 agreement ``top1`` over ``positions`` positions breaks the bound ``min_top1``. One disagreement
    is always allowed: a near-tie flips under any rounding, and on a handful of positions one flip would otherwise
    decide the verdict."""
    if positions is None:
        return not top1 >= min_top1
    disagree = round((1.0 - top1) * positions)
    return disagree > max(math.floor((1.0 - min_top1) * positions + 1e-9), 1)


def logit_metrics(actual, reference, attention_mask=None) -> dict:
    """Figures of ``actual`` against ``reference`` (both [B, T, V]) over the positions where ``attention_mask`` is 1:
    ``rel``, ``kl_mean`` and ``kl_max`` (KL(reference || actual), nats, float64), ``top1`` (share of equal argmax),
    ``positions``, and ``worst`` = (row, position, vocab index) of the largest |actual - reference|."""
    a, _ = _numpy_of(actual, "logits")
    r, _ = _numpy_of(reference, "reference")
    if a.shape != r.shape or a.ndim != 3 or a.shape[2] == 0:
        raise MinibloomError(f"logits: shape {a.shape} against the reference's {r.shape} (want equal [B, T, V])")
    real = np.ones(a.shape[:2], bool) if attention_mask is None else _mask_of(attention_mask)
    if real.shape != a.shape[:2]:
        raise MinibloomError(f"attention_mask: shape {real.shape} does not match the logits' [B, T] {a.shape[:2]}")
    rows, cols = np.nonzero(real)
    if rows.size == 0:
        raise MinibloomError("attention_mask: no real position to compare")
    ar, rr = a[rows, cols], r[rows, cols]  # [N, V]
    if not np.all(np.isfinite(ar)):
        n, v = np.argwhere(~np.isfinite(ar))[0]
        nan = float("nan")
        return {"rel": nan, "kl_mean": nan, "kl_max": nan, "top1": 0.0, "positions": int(rows.size),
                "worst": (int(rows[n]), int(cols[n]), int(v))}
    d = np.abs(ar - rr)
    n, v = np.unravel_index(int(np.argmax(d)), d.shape)
    scale = float(np.max(np.abs(rr)))
    kl = kl_divergence(rr, ar)  # [N]
    return {"rel": float(d[n, v]) / scale if scale > 0 else float(d[n, v]), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "top1": float(np.mean(ar.argmax(-1) == rr.argmax(-1))),
            "positions": int(rows.size), "worst": (int(rows[n]), int(cols[n]), int(v))}


@dataclass
class Verdict:
    """A policy applied to one candidate's logits: the figures, which parts failed, and where it is worst."""

    policy: Tolerance
    rel: float
    kl_mean: float
    kl_max: float
    top1: float
    positions: int
    worst: tuple  # (row, position, vocab index)
    worst_values: tuple  # (actual, reference) at ``worst``
    input_id: int | None = None  # the input token at (row, position)
    failed: list[str] = field(default_factory=list)
    what: str = "logits"

    @property
    def passed(self) -> bool:
        return not self.failed

    def parts(self) -> list[tuple[str, str, bool]]:
        """(part, "measured, limit", passed) for every part the policy checks."""
        p = self.policy
        out = [("rel", f"max|A-B| / max|B| {self.rel:.3e}, limit {p.rel:.2g}", "rel" not in self.failed)]
        if p.kl_mean is not None:
            out.append(("kl_mean", f"KL mean {self.kl_mean:.3e} nats, limit {p.kl_mean:.2g}",
                        "kl_mean" not in self.failed))
        if p.kl_max is not None:
            out.append(("kl_max", f"KL max {self.kl_max:.3e} nats, limit {p.kl_max:.2g}", "kl_max" not in self.failed))
        if p.top1 is not None:
            out.append(("top1", f"top-1 agreement {100 * self.top1:.2f}%, at least {100 * p.top1:.1f}%",
                        "top1" not in self.failed))
        return out

    def message(self) -> str:
        row, pos, tok = self.worst
        a, r = self.worst_values
        inp = "" if self.input_id is None else f" (input token {self.input_id})"
        size = "" if self.policy.size is None else f", sized for {self.policy.size[0]} x {self.policy.size[1]}"
        head = (f"{self.what}: {'PASS' if self.passed else 'FAIL'} under policy {self.policy.kind or 'custom'!r} "
                f"({self.policy.what}{size}) over {self.positions} real positions")
        lines = [head] + [f"  {'ok  ' if ok else 'FAIL'} {text}" for _, text, ok in self.parts()]
        lines.append(f"  worst logit: row {row}, position {pos}{inp}, token {tok}: {a:.6g} vs {r:.6g} (reference)")
        kl = "" if self.policy.kl_mean is not None else (f"KL mean {self.kl_mean:.3e}, KL max {self.kl_max:.3e} "
                                                         "nats; ")
        lines.append(f"  {kl}top-1 token agreement: {100 * self.top1:.2f}% of positions")
        return "\n".join(lines)


def check_logits(actual, reference, attention_mask=None, policy=None, input_ids=None,
                 what: str = "logits", *, size: tuple[int, int] | None = None) -> Verdict:
    """Judge a candidate's logits against reference logits (arrays [B, T, V] or [T, V]; any array type, torch
    bfloat16 too) at the positions ``attention_mask`` marks real (any layout: left, right or inner padding).

    ``policy``: a ``Policy``, a kind name ("float16", "int8", "q8_0", ...), a number (a relative bound alone), or
    None for the policy of ``actual``'s dtype. ``size`` = (n_layer, hidden_size) of the model sizes the limits
    (rounding noise grows with the model): required for every calibrated kind unless ``policy`` was sized already
    (``Policy.at``); a bare number and float64 need none. Raises ``MinibloomError`` when a size is needed and
    missing. This is the entry point for logits that minibloom did not compute: an engine's output saved to disk,
    or another framework's tensors.
    """
    a, dtype = _numpy_of(actual, what)
    r, _ = _numpy_of(reference, "reference")
    if a.ndim == 2:
        a = a[None]
    if r.ndim == 2:
        r = r[None]
    mask = None if attention_mask is None else np.asarray(attention_mask)
    if mask is not None and mask.ndim == 1:
        mask = mask[None]
    pol = policy_for(dtype) if policy is None else _as_policy(policy)
    if size is not None:
        pol = pol.at(*check_size(size, "size"))
    elif pol.scales and pol.size is None:
        raise MinibloomError(f"size: the {pol.kind!r} policy's limits grow with the model; pass size=(n_layer, "
                             "hidden_size) of the model that produced the reference logits (or a policy sized "
                             "with Policy.at)")
    m = logit_metrics(a, r, mask)
    failed = []
    if not m["rel"] <= pol.rel:
        failed.append("rel")
    for part in ("kl_mean", "kl_max"):
        limit = getattr(pol, part)
        if limit is not None and not m[part] <= limit:
            failed.append(part)
    if pol.top1 is not None and top1_fails(m["top1"], m["positions"], pol.top1):
        failed.append("top1")
    row, pos, tok = m["worst"]
    ids = None if input_ids is None else _input_ids_of(input_ids, a.shape[:2])
    return Verdict(pol, m["rel"], m["kl_mean"], m["kl_max"], m["top1"], m["positions"], m["worst"],
                   (float(a[row, pos, tok]), float(r[row, pos, tok])),
                   None if ids is None else int(ids[row, pos]), failed, what)


def _mask_of(attention_mask) -> np.ndarray:
    """``attention_mask`` as booleans, its values 0 or 1, else a MinibloomError naming it."""
    m, _ = _numpy_of(attention_mask, "attention_mask")
    if not np.all((m == 0) | (m == 1)):
        raise MinibloomError("attention_mask: values must be 0 (padding) or 1 (token)")
    return m.astype(bool)


def _input_ids_of(input_ids, shape: tuple[int, int]) -> np.ndarray:
    """``input_ids`` as integers of the logits' [B, T] (or [T] for one row), else a MinibloomError naming both
    shapes."""
    try:
        ids = np.asarray(input_ids)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise MinibloomError(f"input_ids: not an array of token ids (got {type(input_ids).__name__})") from None
    if ids.size and ids.dtype.kind not in "iu":
        raise MinibloomError(f"input_ids: token ids must be integers, got dtype {ids.dtype}")
    if ids.ndim == 1 and shape[0] == 1:
        ids = ids[None]
    if ids.shape != tuple(shape):
        raise MinibloomError(f"input_ids: shape {ids.shape} does not match the logits' [B, T] {tuple(shape)}")
    return ids


def _numpy_of(actual, what: str = "logits") -> tuple[np.ndarray, str]:
    """Any array-like of real numbers (NumPy, CuPy, a torch tensor in any real dtype) -> (float64 NumPy array, dtype
    name); anything else (strings, complex numbers, objects, ragged lists) a MinibloomError naming ``what``."""
    try:
        if not hasattr(actual, "dtype") or not hasattr(actual, "shape"):
            actual = np.asarray(actual)
        dtype = str(actual.dtype).replace("torch.", "")
        if hasattr(actual, "detach"):  # a torch tensor; NumPy cannot hold bfloat16, so widen first (no torch import)
            if getattr(actual, "is_complex", lambda: False)():
                raise MinibloomError(f"{what}: complex values ({dtype}); logits are real numbers")
            actual = actual.detach().cpu().double().numpy()
        elif hasattr(actual, "get") and hasattr(actual, "__cuda_array_interface__"):  # CuPy
            actual = actual.get()
        a = np.asarray(actual)
    except MinibloomError:
        raise
    except Exception as e:  # noqa: BLE001 - NumPy's ValueError / TypeError / OverflowError, a foreign array's own
        raise MinibloomError(f"{what}: not an array of numbers ({type(e).__name__}: {str(e)[:120]})") from None
    if a.dtype.kind not in "fiub":
        kind = "complex values" if a.dtype.kind == "c" else f"dtype {a.dtype}"
        raise MinibloomError(f"{what}: {kind}; expected real numbers (the imaginary part would be dropped)"
                             if a.dtype.kind == "c" else f"{what}: {kind}; expected an array of real numbers")
    return a.astype(np.float64, copy=False), dtype


_REFERENCE_CACHE: dict = {}


def reference_model(model):
    """``model`` as a float64 ``Bloom``: a Bloom already in float64 as is, a float32 Bloom widened, or a path /
    hub id loaded with ``minibloom.load(..., dtype="float64")`` (cached per path for the session)."""
    from ..bloom import Bloom, load

    if isinstance(model, Bloom):
        if model.dtype == "float64":
            return model
        if model.path and model.backend.name == "numpy":
            return reference_model(model.path)
        widen = lambda t: ({k: widen(v) for k, v in t.items()} if isinstance(t, dict)  # noqa: E731
                           else [widen(v) for v in t] if isinstance(t, list)
                           else np.asarray(model.backend.to_numpy(t), np.float64))
        return Bloom(model.config, widen(model.params), "float64", tokenizer=model.tokenizer, path=model.path)
    key = str(model)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE.clear()  # keep at most one reference model in memory
        _REFERENCE_CACHE[key] = load(model, dtype="float64")
    return _REFERENCE_CACHE[key]


def reference_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    """minibloom's float64 logits [B, T, V] for ``input_ids`` (``model``: a Bloom, a checkpoint path or hub id)."""
    return reference_model(model)(input_ids, attention_mask)


def assert_logits_close(actual, model, input_ids, attention_mask=None, tol: Tolerance | float | str | None = None,
                        what: str = "logits", *, kind: str | None = None) -> float:
    """Check another implementation's logits against minibloom's float64 logits for the same checkpoint and ids.

    ``actual``: [batch, seq, vocab] (or [seq, vocab] for one row), any array type and dtype (torch bfloat16 too).
    ``model``: a ``minibloom.Bloom``, a checkpoint directory / file, or a hub id: the *unquantized* checkpoint for
    ports whose engine cast or quantized the weights itself (float16, bfloat16, CTranslate2 / ONNX Runtime int8), the
    *same* GGUF / bitsandbytes file for ports of a quantized file. Only positions where ``attention_mask`` is 1 are
    compared. ``kind`` (or ``tol``: a policy, a kind name or a bare relative bound) selects the policy; by default
    the one for ``actual``'s dtype (float32 logits against a ``.gguf`` file: ``float32-gelu-table``, llama.cpp's f32
    path) — quantized weights cannot be seen in the logits' dtype, so name their kind ("q8_0", "int8", "nf4", ...).
    The limits are sized for ``model``'s depth and width. Raises ``AssertionError`` with every part of the verdict;
    returns the relative error.
    """
    a, dtype = _numpy_of(actual)
    ref = reference_logits(model, input_ids, attention_mask)
    if a.ndim == 2 and ref.shape[0] == 1:
        a = a[None]
    if a.shape != ref.shape:
        raise AssertionError(f"{what}: shape {a.shape} but the reference logits for these input_ids are {ref.shape}")
    if kind is not None:
        pol = policy_for(kind)
    elif tol is not None:
        pol = _as_policy(tol)
    else:  # float32 logits judged against a GGUF file come from a ggml port: llama.cpp's f32 path
        gguf = str(getattr(model, "path", None) or model).lower().endswith(".gguf")
        pol = policy_for(dtype, "ggml" if gguf else None)
    cfg = reference_model(model).config
    mask = None if attention_mask is None else np.asarray(attention_mask).reshape(ref.shape[:2])
    pol = pol.at(cfg.n_layer, cfg.hidden_size)
    if pol.probes:  # a statistical kind: sized by how much its emulated ports move this very model
        pol = probe_policy(pol, model, input_ids, mask)
    if pol.kind == "int8-activations":  # the engine's activation rounding, emulated in the reference
        verdicts = [check_logits(a, m(input_ids, attention_mask), mask, pol, input_ids,
                                 f"{what} ({dtype}) vs minibloom float64 with {name} activations")
                    for name, m in activation_models(model)]
        verdict = next((v for v in verdicts if v.passed), min(verdicts, key=lambda v: np.nan_to_num(v.rel, nan=1e300)))
    else:
        verdict = check_logits(a, ref, mask, pol, input_ids, f"{what} ({dtype}) vs minibloom float64")
    if not verdict.passed:
        raise AssertionError(verdict.message() + "\n  to find the first layer that differs, write a trace of your "
                             "implementation (format: minibloom.trace) and compare it with `minibloom trace --dtype "
                             "float64` using `minibloom diff`")
    return verdict.rel


# ---- statistical kinds sized by the model under test ------------------------------------------------------------
PROBE_FLOORS = {"rel": 2e-5, "kl": 1e-7}  # float32's: no statistical kind is judged more finely than float32


def probe_figures(kind: str, model, input_ids, attention_mask=None) -> dict:
    """How far the emulated correct ports of ``kind`` (``minibloom.oracle.emulate.ports_for``: the engines' weight
    schemes and roundings) move *this* model's float64 logits and hidden states on *this* input: the worst ``rel``,
    ``kl_mean``, ``kl_max`` and ``hidden_rel`` over them (``model``: a Bloom, path or hub id)."""
    from .emulate import ports_for, prepare, run_port

    ref = reference_model(model)
    ids = np.asarray(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    mask = np.ones(ids.shape, np.int64) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    out = ref.forward(ids, mask, output_hidden_states=True)
    real = mask.astype(bool)
    worst: dict = {}
    for port in ports_for(kind):
        logits, hidden = run_port(port, None, prepare(port, ref.params), ref.config, ids, mask)
        m = logit_metrics(logits, out.logits, mask)
        m["hidden_rel"] = max(rel_error(a[real], r[real]) for a, r in zip(hidden, out.hidden_states))
        for f in ("rel", "kl_mean", "kl_max", "hidden_rel"):
            worst[f] = max(worst.get(f, 0.0), float(np.nan_to_num(m[f], nan=np.inf)))
    return worst


def probe_policy(pol: Tolerance, model, input_ids, attention_mask=None) -> Tolerance:
    """A statistical policy sized by the model under test: each limit is the policy's probe coefficient times how
    far the kind's emulated ports move this model's logits on this input (``probe_figures``), never above the
    size-scaled limit ``pol`` already has (the envelope over all evidence) nor below float32's floors. Noise depends
    on the weights (their scale, the residual layout) as much as on the size, so one envelope for every model would
    let bugs pass on the quiet ones."""
    if not pol.probes:
        return pol
    coef = json.loads(pol.coefficients)["probe"]
    fig = probe_figures(pol.kind, model, input_ids, attention_mask)
    lim = {"rel": max(coef["rel"] * fig["rel"], PROBE_FLOORS["rel"]),
           "hidden_rel": max(coef["rel"] * fig["hidden_rel"], PROBE_FLOORS["rel"]),
           "kl_mean": max(coef["kl"] * fig["kl_mean"], PROBE_FLOORS["kl"]),
           "kl_max": max(coef["kl"] * fig["kl_max"], PROBE_FLOORS["kl"])}
    return replace(pol, rel=min(pol.rel, lim["rel"]), hidden_rel=min(pol.hidden_rel or pol.rel, lim["hidden_rel"]),
                   kl_mean=min(pol.kl_mean, lim["kl_mean"]), kl_max=min(pol.kl_max, lim["kl_max"]),
                   what=f"{pol.what}; limits sized by the kind's emulated ports on this model (rel {fig['rel']:.2e}, "
                        f"KL mean {fig['kl_mean']:.2e}) times {coef['rel']:g} / {coef['kl']:g}")


# ---- ports that quantize their activations too (kind "int8-activations") ----------------------------------------
def activation_scheme(model, activations: str | None = None) -> tuple[str, int | None]:
    """(scheme, group) of the run-time activation quantization to emulate for ``model``, a same-weights reference
    written by ``minibloom dequantize`` (a directory or a ``Bloom`` loaded from one): ``activations`` when given
    ("int8-per-row", "uint8-per-tensor", "int8-per-group:32", ...), else what its ``minibloom_dequantized.json``
    records."""
    from .activations import parse_scheme
    from .engine_weights import DEQUANTIZED_NOTE

    if activations is not None:
        scheme, group = parse_scheme(activations)
    else:
        path = getattr(model, "path", None) if not isinstance(model, (str, os.PathLike)) else os.fspath(model)
        note_path = os.path.join(path, DEQUANTIZED_NOTE) if path and os.path.isdir(path) else None
        if note_path is None or not os.path.isfile(note_path):
            raise MinibloomError(f"kind int8-activations: {path or 'the model'} is not a same-weights reference (no "
                                 f"{DEQUANTIZED_NOTE}); write one with `minibloom dequantize SOURCE --like MODEL --out "
                                 "DIR` and judge against DIR")
        from ..jsonfile import read_json_object

        note = read_json_object(note_path)
        recorded, group = note.get("activations"), note.get("group")
        scheme, group = parse_scheme(recorded if recorded is None or group is None else f"{recorded}:{group}",
                                     what=f"{note_path}: activations")
    if scheme is None or scheme == "static":
        raise MinibloomError(f"kind int8-activations: the reference records no run-time activation quantization "
                             f"({scheme or 'weight-only'}); judge a weight-only port with its float kind (float32, "
                             "float16, bfloat16), or name the engine's scheme (minibloom dequantize --activations)")
    return scheme, group


def activation_models(model, activations: str | None = None) -> list[tuple[str, object]]:
    """(emulation, float64 ``Bloom``) for every way a correct engine with ``model``'s activation scheme may compute:
    its weights, and the primitives of ``minibloom.oracle.activations`` rounding each product's input as the engine
    does (int8 per row: with and without the int16 pair saturation of CPUs without VNNI)."""
    from ..bloom import Bloom
    from .activations import EMULATIONS, activation_primitives

    scheme, group = activation_scheme(model, activations)
    ref = reference_model(model)
    return [(name, Bloom(ref.config, ref.params, "float64", tokenizer=ref.tokenizer, path=ref.path,
                         primitives=activation_primitives(name, group)))
            for name in EMULATIONS.get(scheme, (scheme,))]


# ---- gradient verdicts ------------------------------------------------------------------------------------------
def numerical_gradient(f, x: np.ndarray, dy, eps: float = 1e-6) -> np.ndarray:
    """d<f(x), dy>/dx by central differences, one entry of ``x`` (float64, changed and restored in place) at a time:
    slow, simple, and independent of any derivation — the witness a hand-written backward is checked against."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = np.sum(f(x) * dy)
        x[i] = old - eps
        down = np.sum(f(x) * dy)
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def reference_grads(model, input_ids, attention_mask=None, labels=None) -> tuple[float, dict]:
    """minibloom's float64 ``(loss, grads)`` (``Bloom.value_and_grad``) for ``model`` (a Bloom, path or hub id)."""
    return reference_model(model).value_and_grad(input_ids, attention_mask, labels)


def assert_grads_close(actual: dict, model, input_ids, attention_mask=None, labels=None,
                       tol: Tolerance | float | None = None, what: str = "gradients", *, loss=None) -> float:
    """Check another implementation's gradients against minibloom's float64 gradients (the gradient oracle).

    ``actual``: {transformers parameter name: gradient} (torch tensors, any float dtype; ``dict(model.named_
    parameters())`` grads, or minibloom's own), for the causal-LM loss of ``input_ids`` with ``labels`` (-100
    ignored; None: the ids with padding ignored). Every parameter of the model must be there. ``tol``: default
    ``GRAD_FP64`` for float64 gradients, ``GRAD_FP32`` otherwise; each tensor passes when max|a - b| <= tol *
    max|b|. ``loss``, when given, is checked too. Raises ``AssertionError`` naming each failing tensor (worst
    first); returns the largest relative error.
    """
    ref_loss, ref = reference_grads(model, input_ids, attention_mask, labels)
    got = {name: _numpy_of(g) for name, g in actual.items()}
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    if missing or extra:
        raise AssertionError(f"{what}: parameter names differ from the model's: "
                             + (f"missing {missing[:3]}" if missing else "")
                             + (f" unknown {extra[:3]}" if extra else ""))
    dtypes = {dt for _, dt in got.values()}
    pol = _as_policy(tol) if tol is not None else (GRAD_FP64 if dtypes == {"float64"} else GRAD_FP32)
    errors = {name: rel_error(a, ref[name]) for name, (a, _) in got.items()}
    bad = sorted((n for n, e in errors.items() if not (e <= pol.rel)),
                 key=lambda n: -np.nan_to_num(errors[n], nan=1e300))
    lines = [f"  {n}: relative max error {errors[n]:.3e} > {pol.rel:.1e}" for n in bad[:10]]
    if loss is not None:
        got_loss = float(_numpy_of(loss)[0])
        lerr = abs(got_loss - ref_loss) / max(abs(ref_loss), 1e-300)
        if not lerr <= pol.rel:
            lines.insert(0, f"  loss: {got_loss!r} vs {ref_loss!r} (relative {lerr:.3e})")
    if lines:
        raise AssertionError(f"{what} ({'/'.join(sorted(dtypes))}) vs minibloom float64, policy {pol.what}: "
                             f"{len(lines)} failing\n" + "\n".join(lines) + "\n  to find the first layer that "
                             "differs, save your gradients as a trace (grad.NAME keys, minibloom.trace) and `minibloom "
                             "diff` it against `minibloom trace --grads --dtype float64`")
    return max(errors.values())


# ---- GGUF files vs the unquantized source, per ggml type ---------------------------------------------------------
# The logit error of a quantized file follows the per-weight rounding step of its type: F16 2^-11 of each value,
# BF16 2^-8, Q8_0 amax/254 per 32-block, Q5_x amax/62 (Q5_1: range/62), Q4_x amax/30 (Q4_1: range/30). The limits
# below sit a few times above the worst error seen per type (max|a-b|/max|ref| vs transformers float32 on the source,
# over random seeds of tests/test_gguf.py's shape and the bloom-560m shape: scripts/quant_report.py prints them, and
# docs/formats.md's "compare" table shows the current figures).
GGUF_VS_SOURCE = {
    "f32": FP32,
    "f16": Tolerance(1e-3, "GGUF F16 weights vs the float32 source"),
    "bf16": Tolerance(1e-2, "GGUF BF16 weights vs the float32 source"),
    "q8_0": Tolerance(3e-2, "GGUF Q8_0 weights vs the float32 source"),
    "q5_0": Tolerance(1.5e-1, "GGUF Q5_0 weights vs the float32 source"),
    "q5_1": Tolerance(1.5e-1, "GGUF Q5_1 weights vs the float32 source"),
    "q4_0": Tolerance(3e-1, "GGUF Q4_0 weights vs the float32 source"),
    "q4_1": Tolerance(3e-1, "GGUF Q4_1 weights vs the float32 source"),
}
BNB_VS_DEQUANT = Tolerance(2e-4, "bitsandbytes 4-bit checkpoint vs transformers float32 on bnb's own dequantized "
                                 "weights")
