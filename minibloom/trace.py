"""Traces: every intermediate of one BLOOM forward pass in a plain ``.npz`` file, and a layer-by-layer diff of two.

A trace follows transformers' ``output_hidden_states=True`` convention (``modeling_bloom.py``, ``BloomModel.forward``):
``hidden_states[0]`` is the output of the embedding LayerNorm, ``hidden_states[i]`` (1 <= i < n_layer) the output of
block ``i - 1``, and ``hidden_states[n_layer]`` the output of the last block *after* ``ln_f``.

The ``.npz`` format (version 1), written and read with NumPy alone (``np.savez`` / ``np.load(allow_pickle=False)``);
any other implementation can produce it and ``minibloom diff`` will compare it:

==========================  ====================  ===================================================================
key                         shape                 meaning
==========================  ====================  ===================================================================
``input_ids``               [B, T] integers       the token ids (required; both traces of a diff need the same)
``attention_mask``          [B, T] 0/1            optional, default all ones; padded positions (0) are not compared
``hidden_states.{i}``       [B, T, C] float       i = 0 .. n_layer as above; or one stacked ``hidden_states``
                                                  [n_layer + 1, B, T, C]
``logits``                  [B, T, V] float       the LM-head output
``attentions.{i}``          [B, H, T, T] float    optional: block i's attention probabilities (after softmax); or one
                                                  stacked ``attentions`` [n_layer, B, H, T, T]
``meta``                    0-d unicode string    optional JSON object: ``dtype`` (the precision the numbers were
                                                  *computed* in: float64, float32, float16, bfloat16, or e.g. q4_0),
                                                  ``quantized`` (bool), ``implementation``, ``model``, ``version``
``extra.*``                 anything numeric      ignored by minibloom
==========================  ====================  ===================================================================

At least one of ``logits`` / ``hidden_states`` must be present. Arrays may be stored in any float dtype; they are
compared in float64. No pickled objects are ever read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import MinibloomError

FORMAT_VERSION = 1
_LAYER_KEY = re.compile(r"^(hidden_states|attentions)\.(\d+)$")


# ---- making a trace ------------------------------------------------------------------------------------------
def trace(model, input_ids, attention_mask=None, attentions: bool = False, *, dtype: str = "float64") -> dict:
    """Run ``model`` once and return its trace as a dict (the keys of the format above, layers as lists).

    ``model``: a ``minibloom.Bloom`` (used in its own dtype) or anything ``minibloom.load`` accepts (loaded in
    ``dtype``). Returns ``{"input_ids", "attention_mask", "hidden_states": [n_layer + 1 arrays], "logits",
    "attentions": [n_layer arrays] or None, "meta": dict}``.
    """
    from . import __version__
    from .bloom import Bloom, load

    if not isinstance(model, Bloom):
        model = load(model, dtype=dtype)
    ids = model._ids(input_ids)
    mask = model._mask(attention_mask, ids.shape)
    out = model.forward(ids, mask, output_hidden_states=True, output_attentions=attentions)
    meta = {"format": "minibloom-trace", "version": FORMAT_VERSION, "implementation": f"minibloom {__version__}",
            "dtype": model.dtype, "quantized": _is_quantized(model), "model": str(model.path or "in memory"),
            "n_layer": model.config.n_layer, "n_head": model.config.n_head}
    return {"input_ids": ids, "attention_mask": mask, "hidden_states": list(out.hidden_states),
            "logits": out.logits, "attentions": list(out.attentions) if attentions else None, "meta": meta}


def _is_quantized(model) -> bool:
    path = str(model.path or "")
    return path.endswith(".gguf") or bool(getattr(model.config, "quantization_config", None))


def save_trace(tr: dict, path: str | os.PathLike) -> str:
    """Write a trace dict (as returned by ``trace`` or ``load_trace``) to ``path`` (``.npz``, uncompressed)."""
    arrays = {"input_ids": np.asarray(tr["input_ids"], np.int64),
              "meta": np.array(json.dumps(tr.get("meta") or {}, sort_keys=True))}
    if tr.get("attention_mask") is not None:
        arrays["attention_mask"] = np.asarray(tr["attention_mask"], np.int64)
    if tr.get("logits") is not None:
        arrays["logits"] = np.asarray(tr["logits"])
    for name in ("hidden_states", "attentions"):
        for i, a in enumerate(tr.get(name) or []):
            arrays[f"{name}.{i}"] = np.asarray(a)
    path = os.fspath(path)
    with open(path, "wb") as f:  # np.savez would append ".npz" to a name without it
        np.savez(f, **arrays)
    return path


def load_trace(path: str | os.PathLike) -> dict:
    """Read and validate a trace ``.npz`` (either layer layout); returns the dict form used by ``trace``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MinibloomError(f"{path}: no such trace file")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise MinibloomError(f"{path}: not a readable .npz trace ({e})") from None
    return _validate(raw, path)


def _validate(raw: dict, path: str) -> dict:
    layers: dict[str, dict[int, np.ndarray]] = {"hidden_states": {}, "attentions": {}}
    stacked: dict[str, np.ndarray] = {}
    tr: dict = {"meta": {}}
    for key, a in raw.items():
        m = _LAYER_KEY.match(key)
        if m:
            layers[m.group(1)][int(m.group(2))] = a
        elif key in ("hidden_states", "attentions"):
            stacked[key] = a
        elif key in ("input_ids", "attention_mask", "logits"):
            tr[key] = a
        elif key == "meta":
            tr["meta"] = _meta(a, path)
        elif not key.startswith("extra."):
            raise MinibloomError(f"{path}: unknown key {key!r} (expected input_ids, attention_mask, logits, "
                                 "hidden_states.{i}, attentions.{i}, meta, or extra.*)")
    if "input_ids" not in tr:
        raise MinibloomError(f"{path}: missing key 'input_ids'")
    ids = tr["input_ids"]
    if ids.dtype.kind not in "iu":
        raise MinibloomError(f"{path}: input_ids must be integers, got {ids.dtype}")
    ids = ids[None, :] if ids.ndim == 1 else ids
    if ids.ndim != 2:
        raise MinibloomError(f"{path}: input_ids must have shape [batch, seq], got {ids.shape}")
    tr["input_ids"] = ids.astype(np.int64)
    B, T = ids.shape
    mask = tr.get("attention_mask")
    if mask is None:
        mask = np.ones((B, T), np.int64)
    mask = mask[None, :] if mask.ndim == 1 else mask
    if mask.shape != (B, T) or not np.all((mask == 0) | (mask == 1)):
        raise MinibloomError(f"{path}: attention_mask must be 0/1 of shape {(B, T)}, got {mask.shape}")
    tr["attention_mask"] = mask.astype(np.int64)
    for name in ("hidden_states", "attentions"):
        if stacked.get(name) is not None and layers[name]:
            raise MinibloomError(f"{path}: holds both a stacked '{name}' and per-layer '{name}.i' keys; use one")
        if name in stacked:
            seq = list(stacked[name])
        elif layers[name]:
            n = max(layers[name]) + 1
            missing = [i for i in range(n) if i not in layers[name]]
            if missing:
                raise MinibloomError(f"{path}: {name}.{missing[0]} is missing (layers must run 0..{n - 1})")
            seq = [layers[name][i] for i in range(n)]
        else:
            seq = None
        tr[name] = seq
    if tr.get("logits") is None and tr["hidden_states"] is None:
        raise MinibloomError(f"{path}: holds neither 'logits' nor hidden states; nothing to compare")
    for i, h in enumerate(tr["hidden_states"] or []):
        _check_shape(h, (B, T, None), f"{path}: hidden_states.{i}")
    for i, a in enumerate(tr["attentions"] or []):
        _check_shape(a, (B, None, T, T), f"{path}: attentions.{i}")
    if tr.get("logits") is not None:
        _check_shape(tr["logits"], (B, T, None), f"{path}: logits")
    else:
        tr["logits"] = None
    return tr


def _meta(a: np.ndarray, path: str) -> dict:
    if a.dtype.kind not in "US" or a.ndim != 0:
        raise MinibloomError(f"{path}: 'meta' must be a 0-d string array holding JSON (np.array(json.dumps(d)))")
    try:
        meta = json.loads(str(a))
    except json.JSONDecodeError as e:
        raise MinibloomError(f"{path}: 'meta' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise MinibloomError(f"{path}: 'meta' must be a JSON object")
    return meta


def _check_shape(a: np.ndarray, want: tuple, what: str) -> None:
    if a.dtype.kind not in "fiu":
        raise MinibloomError(f"{what}: expected a float array, got dtype {a.dtype}")
    if a.ndim != len(want) or any(w is not None and s != w for s, w in zip(a.shape, want)):
        spec = ", ".join("*" if w is None else str(w) for w in want)
        raise MinibloomError(f"{what}: shape {a.shape} does not match the input ids (expected [{spec}])")


# ---- comparing two traces ------------------------------------------------------------------------------------
@dataclass
class LayerDiff:
    """One row of a diff: errors of A against the reference B over the real (unpadded) positions."""

    name: str  # "embeddings", "block 3", "block 23 + ln_f", "block 3 attention", "logits"
    key: str  # the .npz key
    max_abs: float
    mean_abs: float
    max_rel: float  # max_abs / max|B|
    passed: bool


@dataclass
class DiffReport:
    """Per-layer errors of trace A against reference trace B (``diff_traces``)."""

    rows: list[LayerDiff]
    rtol: float
    atol: float
    names: tuple[str, str] = ("A", "B")
    notes: list[str] = field(default_factory=list)
    top1_agreement: float | None = None  # fraction of real positions where argmax(logits) agree

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def first_divergence(self) -> LayerDiff | None:
        """The first row, in computation order, whose error exceeds the tolerance."""
        return next((r for r in self.rows if not r.passed), None)

    def table(self) -> str:
        """The report as a fixed-width text table followed by the verdict."""
        lines = [f"A: {self.names[0]}", f"B: {self.names[1]} (reference)",
                 f"tolerance: max|A - B| <= {self.atol:.1e} + {self.rtol:.1e} * max|B|, per layer", ""]
        lines.append(f"{'layer':<22} {'max abs err':>12} {'mean abs err':>12} {'max rel err':>12}  result")
        for r in self.rows:
            lines.append(f"{r.name:<22} {r.max_abs:>12.3e} {r.mean_abs:>12.3e} {r.max_rel:>12.3e}  "
                         f"{'ok' if r.passed else 'FAIL'}")
        lines += [""] + [f"note: {n}" for n in self.notes]
        if self.top1_agreement is not None:
            lines.append(f"top-1 token agreement: {100 * self.top1_agreement:.2f}% of positions")
        first = self.first_divergence
        lines.append("all layers agree" if first is None else f"first divergence: {first.name} ({first.key})")
        return "\n".join(lines)


def layer_name(i: int, n_hidden: int) -> str:
    """Human name of ``hidden_states[i]`` among ``n_hidden`` (= n_layer + 1): which computation produced it."""
    if i == 0:
        return "embeddings"
    if i == n_hidden - 1:
        return f"block {i - 1} + ln_f"
    return f"block {i - 1}"


def _as_trace(t, what: str) -> dict:
    if isinstance(t, (str, os.PathLike)):
        return load_trace(t)
    if isinstance(t, dict):
        t = {**t, "meta": t.get("meta") or {}}
        raw = {k: v for k, v in t.items() if k not in ("hidden_states", "attentions", "meta") and v is not None}
        for name in ("hidden_states", "attentions"):
            for i, a in enumerate(t.get(name) or []):
                raw[f"{name}.{i}"] = np.asarray(a)
        out = _validate({k: np.asarray(v) for k, v in raw.items()}, what)
        out["meta"] = dict(t["meta"])
        return out
    raise MinibloomError(f"{what}: expected a trace dict or a path to a .npz trace, got {type(t).__name__}")


def default_rtol(*metas: dict) -> float:
    """The tolerance for comparing traces computed in these precisions: the policy of the least precise one
    (``minibloom.testing.tolerance_for``)."""
    from .testing import tolerance_for

    return max(tolerance_for(m.get("dtype"), bool(m.get("quantized"))).rel for m in metas)


def _computed_dtype(t: dict) -> dict:
    """The trace's meta, with ``dtype`` taken from its arrays when the writer did not record it."""
    if t["meta"].get("dtype"):
        return t["meta"]
    arrays = (t["hidden_states"] or []) + ([t["logits"]] if t["logits"] is not None else [])
    return {**t["meta"], "dtype": str(np.result_type(*arrays))}


def _errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0, 0.0, 0.0
    d = np.abs(a - b)
    max_abs = float(np.max(d))
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        max_abs = float("nan")
    scale = float(np.max(np.abs(b)))
    return max_abs, float(np.mean(d)), (max_abs / scale if scale > 0 else max_abs)


def diff_traces(a, b, rtol: float | None = None, atol: float = 0.0) -> DiffReport:
    """Compare trace ``a`` against the reference trace ``b`` (dicts or .npz paths), layer by layer.

    A layer passes when ``max|a - b| <= atol + rtol * max|b|`` over the real (attention_mask == 1) positions.
    ``rtol=None`` takes the tolerance policy of the less precise trace's ``meta["dtype"]`` (minibloom.testing).
    Raises ``MinibloomError`` when the traces cannot be compared (different inputs, shapes, layer counts).
    """
    names = (os.fspath(a) if isinstance(a, (str, os.PathLike)) else "A",
             os.fspath(b) if isinstance(b, (str, os.PathLike)) else "B")
    ta, tb = _as_trace(a, names[0]), _as_trace(b, names[1])
    if ta["input_ids"].shape != tb["input_ids"].shape or not np.array_equal(ta["input_ids"], tb["input_ids"]):
        raise MinibloomError(f"{names[0]} and {names[1]} were made from different input_ids "
                             f"(shapes {ta['input_ids'].shape} and {tb['input_ids'].shape}); trace the same ids")
    if not np.array_equal(ta["attention_mask"], tb["attention_mask"]):
        raise MinibloomError(f"{names[0]} and {names[1]} have different attention_mask; trace the same inputs")
    if rtol is None:
        rtol = default_rtol(*(_computed_dtype(t) for t in (ta, tb)))
    if rtol < 0 or atol < 0:
        raise MinibloomError(f"rtol/atol must be >= 0, got rtol={rtol}, atol={atol}")
    real = tb["attention_mask"].astype(bool)  # [B, T]
    notes: list[str] = []
    if not real.all():
        notes.append(f"{int((~real).sum())} padded positions (attention_mask == 0) are not compared")

    def row(name, key, xa, xb):
        if xa.shape != xb.shape:
            raise MinibloomError(f"{key}: shape {xa.shape} in {names[0]} but {xb.shape} in {names[1]}")
        max_abs, mean_abs, rel = _errors(xa, xb)
        ok = bool(max_abs <= atol + rtol * float(np.max(np.abs(np.asarray(xb, np.float64)), initial=0.0)))
        return LayerDiff(name, key, max_abs, mean_abs, rel, ok)

    rows: list[LayerDiff] = []
    ha, hb = ta["hidden_states"], tb["hidden_states"]
    aa, ab = ta["attentions"], tb["attentions"]
    if ha is not None and hb is not None and len(ha) != len(hb):
        raise MinibloomError(f"hidden states: {names[0]} holds {len(ha)}, {names[1]} holds {len(hb)} "
                             "(n_layer + 1 each in transformers' convention)")
    if (ha is None) != (hb is None):
        notes.append(f"hidden states only in {names[0] if hb is None else names[1]}: comparing logits only")
        ha = hb = None
    if aa is not None and ab is not None and len(aa) != len(ab):
        raise MinibloomError(f"attentions: {names[0]} holds {len(aa)}, {names[1]} holds {len(ab)}")
    if (aa is None) != (ab is None):
        notes.append(f"attention probabilities only in {names[0] if ab is None else names[1]}: not compared")
        aa = ab = None
    if ha is not None:
        n = len(ha)
        for i in range(n):
            if aa is not None and 0 < i <= len(aa):  # block i-1's attention comes before its output
                qa = np.moveaxis(aa[i - 1], 1, 2)[real]  # [B, H, T, S] -> real query rows [N, H, S]
                qb = np.moveaxis(ab[i - 1], 1, 2)[real]
                rows.append(row(f"block {i - 1} attention", f"attentions.{i - 1}", qa, qb))
            rows.append(row(layer_name(i, n), f"hidden_states.{i}", ha[i][real], hb[i][real]))
    elif aa is not None:
        for i in range(len(aa)):
            rows.append(row(f"block {i} attention", f"attentions.{i}",
                            np.moveaxis(aa[i], 1, 2)[real], np.moveaxis(ab[i], 1, 2)[real]))
    top1 = None
    la, lb = ta["logits"], tb["logits"]
    if la is not None and lb is not None:
        rows.append(row("logits", "logits", la[real], lb[real]))
        top1 = float(np.mean(np.argmax(la[real], -1) == np.argmax(lb[real], -1))) if real.any() else None
    elif (la is None) != (lb is None):
        notes.append(f"logits only in {names[0] if lb is None else names[1]}: not compared")
    if not rows:
        raise MinibloomError(f"{names[0]} and {names[1]} have nothing in common to compare")
    for t, nm in ((ta, names[0]), (tb, names[1])):
        if t["meta"].get("dtype"):
            notes.append(f"{nm}: computed in {t['meta']['dtype']}" + (" (quantized)" if t["meta"].get("quantized")
                                                                      else ""))
    return DiffReport(rows, float(rtol), float(atol), names, notes, top1)
