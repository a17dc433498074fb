"""Tolerances and assertions for checking BLOOM logits against minibloom (the project's own tests use these too).

Tolerance policy: errors are measured relative to the scale of the reference, ``max|a - b| / max|ref|``, because
logit magnitudes vary by orders of magnitude between random test models and trained checkpoints. The numbers are
measured (see README "Use minibloom as an oracle in your CI"), each with a wide margin over what was observed:

- ``FP32``: float32 vs transformers float32. Observed 2e-7 .. 2e-6 on random checkpoints (tiny and 560m shape).
- ``FP64_VS_HF``: float64 vs transformers float64 with its float32 softmax and float32 ALiBi slopes patched to
  float64 (``tests/factory.py::hf_float64_exact``). Observed ~1e-15.
- ``FP64_SELF``: float64 paths of minibloom against each other (KV cache vs full pass, batch vs single row).
- ``FP16``, ``BF16``, ``QUANTIZED``: other implementations in lower precision against minibloom float64 (measured
  below); ``tolerance_for(dtype)`` picks the policy, ``assert_logits_close`` applies it.
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


# ---- tolerances for lower precisions and quantized weights ---------------------------------------------------
# Measured with scripts/measure_tolerances.py against minibloom float64 on random checkpoints (every parameter
# randomized) from 3 layers x 64 to the bloom-560m shape; the worst figure of each is quoted, and the limits keep a
# margin of ~4x over it (errors grow with depth, and trained weights have outlier features).
# FP16 / BF16: transformers run in that dtype (weights rounded too). Worst observed: 6.7e-3 / 5.2e-2 (560m shape).
FP16 = Tolerance(3e-2, "float16 weights and activations vs minibloom float64")
BF16 = Tolerance(2.5e-1, "bfloat16 weights and activations vs minibloom float64")
# QUANTIZED: a quantized kernel vs minibloom float64 running the *same* quantized checkpoint (minibloom dequantizes
# GGUF / bitsandbytes blocks exactly): what remains is the kernel's own rounding, e.g. llama.cpp quantizing the
# activations to Q8_0 blocks for its dot products. Worst observed: 8.4e-2 (Q8_0 weights, 560m shape), 6.7e-2 (Q4_0).
# Against the *unquantized* model the error is the quantization itself (model dependent, 0.07 for Q8_0 and 0.64 for
# Q4_0 on the random 560m shape): no tolerance makes sense there; compare top-1 tokens or perplexity instead.
QUANTIZED = Tolerance(3e-1, "quantized kernel vs minibloom float64 on the same quantized weights")

_BY_DTYPE = {"float64": FP64_VS_HF, "float32": FP32, "float16": FP16, "bfloat16": BF16}
_ALIASES = {"fp64": "float64", "double": "float64", "f64": "float64", "fp32": "float32", "float": "float32",
            "f32": "float32", "fp16": "float16", "half": "float16", "f16": "float16", "bf16": "bfloat16"}


def tolerance_for(dtype, quantized: bool = False) -> Tolerance:
    """The policy tolerance for numbers computed in ``dtype`` (a name like "float16", "bf16", "q4_0", "nf4", or a
    NumPy / torch dtype); ``QUANTIZED`` when ``quantized`` or the name is a quantization format; unknown ->
    ``FP32``."""
    name = str(dtype).lower().replace("torch.", "") if dtype is not None else ""
    name = _ALIASES.get(name, name)
    if quantized or name.startswith(("q", "nf4", "fp4", "int4", "int8", "iq")):
        return QUANTIZED
    return _BY_DTYPE.get(name, FP32)


def _numpy_of(actual) -> tuple[np.ndarray, str]:
    """Any array-like (NumPy, CuPy, a torch tensor in any dtype) -> (float64 NumPy array, dtype name)."""
    if not hasattr(actual, "dtype"):
        actual = np.asarray(actual)
    dtype = str(actual.dtype).replace("torch.", "")
    if hasattr(actual, "detach"):  # a torch tensor; NumPy cannot hold bfloat16, so widen first (no torch import)
        actual = actual.detach().cpu().double().numpy()
    elif hasattr(actual, "get") and hasattr(actual, "__cuda_array_interface__"):  # CuPy
        actual = actual.get()
    return np.asarray(actual, dtype=np.float64), dtype


_REFERENCE_CACHE: dict = {}


def reference_model(model):
    """``model`` as a float64 ``Bloom``: a Bloom already in float64 as is, a float32 Bloom widened, or a path /
    hub id loaded with ``minibloom.load(..., dtype="float64")`` (cached per path for the session)."""
    from .bloom import Bloom, load

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


def assert_logits_close(actual, model, input_ids, attention_mask=None, tol: Tolerance | float | None = None,
                        what: str = "logits") -> float:
    """Check another implementation's logits against minibloom's float64 logits for the same checkpoint and ids.

    ``actual``: [batch, seq, vocab] (or [seq, vocab] for one row), any array type and dtype (torch bfloat16 too).
    ``model``: a ``minibloom.Bloom``, a checkpoint directory / file, or a hub id. Only positions where
    ``attention_mask`` is 1 are compared. ``tol``: a ``Tolerance`` or a number (relative to ``max|reference|``);
    by default the policy for ``actual``'s dtype (``tolerance_for``). Quantized weights cannot be seen in the
    logits' dtype: pass ``tol=QUANTIZED`` (and ``model`` = the same quantized checkpoint). Returns the measured
    relative error.
    """
    a, dtype = _numpy_of(actual)
    ref = reference_logits(model, input_ids, attention_mask)
    if a.ndim == 2 and ref.shape[0] == 1:
        a = a[None]
    if a.shape != ref.shape:
        raise AssertionError(f"{what}: shape {a.shape} but the reference logits for these input_ids are {ref.shape}")
    tol = tolerance_for(dtype) if tol is None else tol
    if attention_mask is not None:
        real = np.asarray(attention_mask).reshape(ref.shape[:2]).astype(bool)
        a, ref = a[real], ref[real]
    try:
        return assert_rel_close(a, ref, tol, f"{what} ({dtype}) vs minibloom float64")
    except AssertionError as e:
        raise AssertionError(f"{e}\n  to find the first layer that differs, write a trace of your implementation "
                             "(format: minibloom.trace) and compare it with `minibloom trace --dtype float64` "
                             "using `minibloom diff`") from None


# ---- GGUF files vs the unquantized source, per ggml type ---------------------------------------------------------
# The logit error of a quantized file follows the per-weight rounding step of its type: F16 2^-11 of each value,
# BF16 2^-8, Q8_0 amax/254 per 32-block, Q5_x amax/62 (Q5_1: range/62), Q4_x amax/30 (Q4_1: range/30). Worst observed
# (tests/test_gguf.py shape, 8 random seeds, max|a-b|/max|ref| vs transformers float32 on the source):
# F32 3.6e-7, F16 2.4e-4, BF16 2.2e-3, Q8_0 6.7e-3, Q5_0 4.7e-2, Q5_1 4.4e-2, Q4_0 1.1e-1, Q4_1 9.1e-2;
# bloom-560m shape (scripts/quant_report.py, vs transformers on the source): F16 2.4e-4, BF16 1.9e-3, Q8_0 6.0e-3,
# Q5_0 5.0e-2, Q5_1 4.6e-2, Q4_0 1.06e-1, Q4_1 8.8e-2 (README, "Quantized BLOOM"). Limits keep a ~3x margin over
# the worst seen.
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
