"""Tolerances and assertions for checking BLOOM logits against minibloom (the project's own tests use these too).

Tolerance policy: errors are measured relative to the scale of the reference, ``max|a - b| / max|ref|``, because
logit magnitudes vary by orders of magnitude between random test models and trained checkpoints. The numbers are
measured (see README "Tolerances"), each with a wide margin over what was observed:

- ``FP32``: float32 vs transformers float32. Observed 2e-7 .. 2e-6 on random checkpoints (tiny and 560m shape).
- ``FP64_VS_HF``: float64 vs transformers float64 with its float32 softmax and float32 ALiBi slopes patched to
  float64 (``tests/factory.py::hf_float64_exact``). Observed ~1e-15.
- ``FP64_SELF``: float64 paths of minibloom against each other (KV cache vs full pass, batch vs single row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rel: float  # on max|a - b| / max|ref|
    what: str


FP32 = Tolerance(1e-4, "float32 vs transformers float32")
FP64_VS_HF = Tolerance(1e-10, "float64 vs transformers float64 (softmax and slopes patched to float64)")
FP64_SELF = Tolerance(1e-12, "float64 vs float64 within minibloom")


def rel_error(actual, reference) -> float:
    """max|actual - reference| / max|reference| (computed in float64)."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {r.shape}")
    scale = np.max(np.abs(r)) if r.size else 0.0
    return float(np.max(np.abs(a - r)) / scale) if scale > 0 else float(np.max(np.abs(a - r), initial=0.0))


def assert_rel_close(actual, reference, tol: Tolerance | float, what: str = "") -> float:
    """Fail unless ``rel_error(actual, reference) <= tol``; return the error (so tests can report it)."""
    limit = tol.rel if isinstance(tol, Tolerance) else float(tol)
    err = rel_error(actual, reference)
    if not np.isfinite(err) or err > limit:
        a = np.asarray(actual, dtype=np.float64)
        r = np.asarray(reference, dtype=np.float64)
        idx = np.unravel_index(np.argmax(np.abs(a - r)), r.shape) if r.size else ()
        raise AssertionError(f"{what or 'arrays'}: relative max error {err:.3e} > {limit:.1e} "
                             f"(max|ref| {np.max(np.abs(r)):.4g}; worst at {idx}: {a[idx]!r} vs {r[idx]!r})")
    return err
