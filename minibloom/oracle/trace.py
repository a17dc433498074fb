"""Traces: every intermediate of one BLOOM forward pass in a plain ``.npz`` file, and a layer-by-layer diff of two.

A trace follows transformers' ``output_hidden_states=True`` convention (``modeling_bloom.py``, ``BloomModel.forward``):
``hidden_states[0]`` is the output of the embedding LayerNorm, ``hidden_states[i]`` (1 <= i < n_layer) the output of
block ``i - 1``, and ``hidden_states[n_layer]`` the output of the last block *after* ``ln_f``.

The ``.npz`` format (version 1), written and read with NumPy alone (``np.savez`` / ``np.load(allow_pickle=False)``);
any other implementation can produce it and ``minibloom diff`` will compare it:

==========================  ====================  ===================================================================
key                         shape                 meaning
==========================  ====================  ===================================================================
``input_ids``               [B, T] integers       the token ids (required; both traces of a diff need the same
                                                  mask and the same ids at its real positions)
``attention_mask``          [B, T] 0/1            optional, default all ones; padded positions (0) are not compared
``hidden_states.{i}``       [B, T, C] float       i = 0 .. n_layer as above; or one stacked ``hidden_states``
                                                  [n_layer + 1, B, T, C]
``logits``                  [B, T, V] float       the LM-head output
``attentions.{i}``          [B, H, T, T] float    optional: block i's attention probabilities (after softmax); or one
                                                  stacked ``attentions`` [n_layer, B, H, T, T]
``meta``                    0-d unicode string    optional JSON object: ``kind`` or ``dtype`` (what the numbers
                                                  were *computed* in: float64, float32, float16, bfloat16, int8,
                                                  q8_0, q4_0, nf4 ...; it selects the verdict policy, see
                                                  ``minibloom.testing``), ``implementation``, ``model``,
                                                  ``n_layer``, ``hidden_size``, ``quantized``, ``version``
``labels``                  [B, T] integers       optional: the labels a gradient trace was scored on (-100 ignored)
``loss``                    0-d float             optional: transformers' causal-LM loss for ``labels``
``grad.{name}``             the parameter's       optional: dloss/dparameter, ``name`` as in transformers'
                            shape                 ``named_parameters()`` (``grad.transformer.h.0.mlp.dense_h_to_4h.
                                                  weight``, ...)
``extra.*``                 anything numeric      ignored by minibloom
==========================  ====================  ===================================================================

At least one of ``logits`` / ``hidden_states`` / ``grad.*`` must be present. A gradient trace is diffed in the
order the backward pass computes: the loss, the head and ``ln_f``, the last block ... the first, the embeddings.
Arrays may be stored in any float dtype; they are compared in float64. No pickled objects are ever read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import MinibloomError
from ..formats.weights import LAYER_TENSORS
from ..jsonfile import parse_json

FORMAT_VERSION = 1
_LAYER_KEY = re.compile(r"^(hidden_states|attentions)\.(\d+)$")


# ---- making a trace ------------------------------------------------------------------------------------------
def trace(model, input_ids, attention_mask=None, attentions: bool = False, *, dtype: str = "float64",
          grads: bool = False, labels=None) -> dict:
    """Run ``model`` once and return its trace as a dict (the keys of the format above, layers as lists).

    ``model``: a ``minibloom.Bloom`` (used in its own dtype) or anything ``minibloom.load`` accepts (loaded in
    ``dtype``). Returns ``{"input_ids", "attention_mask", "hidden_states": [n_layer + 1 arrays], "logits",
    "attentions": [n_layer arrays] or None, "meta": dict}``; with ``grads``, also ``"labels"``, ``"loss"`` and
    ``"grads"`` ({name: array}, ``Bloom.value_and_grad``; ``labels`` None: the ids, padding ignored).
    """
    from .. import __version__
    from ..bloom import Bloom, load

    if not isinstance(model, Bloom):
        model = load(model, dtype=dtype)
    ids = model._ids(input_ids)
    mask = model._mask(attention_mask, ids.shape)
    out = model.forward(ids, mask, output_hidden_states=True, output_attentions=attentions)
    meta = {"format": "minibloom-trace", "version": FORMAT_VERSION, "implementation": f"minibloom {__version__}",
            "dtype": model.dtype, "quantized": _is_quantized(model), "model": str(model.path or "in memory"),
            "n_layer": model.config.n_layer, "n_head": model.config.n_head, "hidden_size": model.config.hidden_size}
    tr = {"input_ids": ids, "attention_mask": mask, "hidden_states": list(out.hidden_states),
          "logits": out.logits, "attentions": list(out.attentions) if attentions else None, "meta": meta}
    if grads:
        tr["labels"] = model._labels(labels, ids, mask)
        tr["loss"], tr["grads"] = model.value_and_grad(ids, mask, tr["labels"])
    return tr


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
    if tr.get("labels") is not None:
        arrays["labels"] = np.asarray(tr["labels"], np.int64)
    if tr.get("loss") is not None:
        arrays["loss"] = np.asarray(tr["loss"], np.float64)
    for name, g in (tr.get("grads") or {}).items():
        arrays[f"grad.{name}"] = np.asarray(g)
    path = os.fspath(path)
    with open(path, "wb") as f:  # np.savez would append ".npz" to a name without it
        np.savez(f, **arrays)
    return path


def load_trace(path: str | os.PathLike) -> dict:
    """Read and validate a trace ``.npz`` (either layer layout); returns the dict form used by ``trace``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MinibloomError(f"{path}: no such trace file")
    return _validate(_read_members(path), path)


MAX_LAYERS = 4096  # layer indices in member names (every BLOOM has at most 70)
MAX_COMPRESSION = 200  # uncompressed / compressed size a big member may claim (float data compresses far less)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def _read_members(path: str, kind: str = "trace", names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a .npz (a trace, or ``kind`` another .npz such as a logits file, of which only the members
    ``names`` are read), each member's name, npy header, declared size and compression checked before anything is
    allocated for it (np.load trusts all of them)."""
    import zipfile

    if not os.path.isfile(path):
        raise MinibloomError(f"{path}: no such .npz {kind} (or not a regular file)")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise MinibloomError(f"{path}: cannot read ({e})") from None
    if not is_zip:
        raise MinibloomError(f"{path}: not a .npz {kind} (not a zip archive; a plain .npy file renamed?)")
    budget = _memory_bytes() // 2
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                what = f"{path}: member {info.filename!r}"
                if not info.filename.endswith(".npy"):
                    raise MinibloomError(f"{what}: not a .npy array (an .npz {kind} holds only NAME.npy members)")
                key = info.filename[:-4]
                if names is not None and key not in names:
                    continue  # not read at all
                m = _LAYER_KEY.match(key) if names is None else None
                if m and int(m.group(2)) >= MAX_LAYERS:
                    raise MinibloomError(f"{what}: layer index {m.group(2)} (at most {MAX_LAYERS - 1})")
                if info.file_size > 1 << 26 and info.file_size > MAX_COMPRESSION * max(info.compress_size, 1):
                    raise MinibloomError(f"{what}: claims {info.file_size} bytes from {info.compress_size} "
                                         "compressed (a decompression bomb?)")
                with z.open(info) as f:
                    out[key] = _read_npy(f, info.file_size, budget, what)
                budget -= out[key].nbytes
    except MinibloomError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError,
            RuntimeError) as e:  # RuntimeError: an encrypted member; NotImplementedError: an unknown compression
        raise MinibloomError(f"{path}: not a readable .npz {kind} ({type(e).__name__}: {e})") from None
    return out


def read_npz(path: str | os.PathLike, kind: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The members ``names`` (those present) of an untrusted ``.npz`` file, read as a trace's are: no pickles, each
    member's declared size bounded by what the member holds and by memory before anything is allocated, every failure
    a MinibloomError naming ``path`` (``kind`` says what the file is, e.g. "logits file")."""
    return _read_members(os.fspath(path), kind, tuple(names))


def _read_npy(f, file_size: int, budget: int, what: str) -> np.ndarray:
    """One .npy member: its header read and checked (no objects, a size the member holds and memory allows)."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        shape, fortran, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(f)
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TokenError ...
        raise MinibloomError(f"{what}: not a valid .npy header ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise MinibloomError(f"{what}: holds Python objects (pickles are never loaded)")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize if shape else dtype.itemsize
    if nbytes > file_size:
        raise MinibloomError(f"{what}: header declares shape {list(shape)} ({nbytes} bytes) but the member holds "
                             f"{file_size} bytes")
    if nbytes > budget:
        raise MinibloomError(f"{what}: {nbytes} bytes would not fit in memory")
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise MinibloomError(f"{what}: ends after {len(data)} of {nbytes} bytes")
    a = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    return np.array(a)  # writable, owns its memory


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
        elif key in ("input_ids", "attention_mask", "logits", "labels", "loss"):
            tr[key] = a
        elif key.startswith("grad."):
            tr.setdefault("grads", {})[key[5:]] = a
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
            want = 4 if name == "hidden_states" else 5
            if stacked[name].ndim != want:
                raise MinibloomError(f"{path}: stacked '{name}' must have {want} dimensions [layer, ...], got shape "
                                     f"{list(stacked[name].shape)}")
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
    if tr["hidden_states"] is not None and tr["attentions"] is not None and \
            len(tr["attentions"]) != len(tr["hidden_states"]) - 1:
        raise MinibloomError(f"{path}: {len(tr['attentions'])} attention arrays for {len(tr['hidden_states'])} hidden "
                             "states (one per block: hidden states - 1)")
    if tr.get("logits") is None and tr["hidden_states"] is None and not tr.get("grads"):
        raise MinibloomError(f"{path}: holds neither 'logits' nor hidden states nor gradients; nothing to compare")
    _validate_grads(tr, path, (B, T))
    for i, h in enumerate(tr["hidden_states"] or []):
        _check_shape(h, (B, T, None), f"{path}: hidden_states.{i}")
    for i, a in enumerate(tr["attentions"] or []):
        _check_shape(a, (B, None, T, T), f"{path}: attentions.{i}")
    if tr.get("logits") is not None:
        _check_shape(tr["logits"], (B, T, None), f"{path}: logits")
    else:
        tr["logits"] = None
    _check_label_range(tr, path)
    return tr


def _vocab_of(tr: dict) -> int | None:
    """The vocab size a trace shows: its logits' last axis, else its embedding gradient's rows."""
    if tr.get("logits") is not None:
        return int(tr["logits"].shape[-1])
    for name, g in (tr.get("grads") or {}).items():
        if name.endswith("word_embeddings.weight") and g.ndim == 2:
            return int(g.shape[0])
    return None


def _check_label_range(tr: dict, path: str) -> None:
    """Labels are token ids of the trace's vocabulary or -100 (ignored): an id past it scores nothing real."""
    lab = tr.get("labels")
    if lab is None:
        return
    vocab = _vocab_of(tr)
    hi = vocab if vocab is not None else 1 << 31
    bad = (lab != IGNORE_LABEL) & ((lab < 0) | (lab >= hi))
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        of = " of the trace's vocabulary" if vocab is not None else ""
        raise MinibloomError(f"{path}: labels[{b}, {t}] = {int(lab[b, t])} is not a token id (0 .. {hi - 1}{of}) "
                             "or -100")


IGNORE_LABEL = -100  # transformers' ignore_index


def _validate_grads(tr: dict, path: str, shape: tuple[int, int]) -> None:
    """The optional gradient part of a trace: labels like the ids, a finite-or-not 0-d float loss, float grads."""
    if tr.get("labels") is not None:
        lab = tr["labels"]
        lab = lab[None, :] if lab.ndim == 1 else lab
        if lab.dtype.kind not in "iu" or lab.shape != shape:
            raise MinibloomError(f"{path}: labels must be integers of shape {shape}, got {lab.dtype} {lab.shape}")
        tr["labels"] = lab.astype(np.int64)
    if tr.get("loss") is not None:
        if tr["loss"].dtype.kind != "f" or tr["loss"].size != 1:
            raise MinibloomError(f"{path}: loss must be one float, got {tr['loss'].dtype} {tr['loss'].shape}")
        tr["loss"] = float(tr["loss"].reshape(()))
    for name, g in (tr.get("grads") or {}).items():
        if g.dtype.kind != "f" or not 1 <= g.ndim <= 2:
            raise MinibloomError(f"{path}: grad.{name} must be a float vector or matrix, got {g.dtype} {g.shape}")
        if grad_group(name) is None:
            raise MinibloomError(f"{path}: grad.{name} is not a BLOOM parameter name (transformer.h.0.mlp."
                                 "dense_h_to_4h.weight, lm_head.weight ...)")


_GRAD_NAME = re.compile(r"^(?:transformer\.)?(?:(word_embeddings|word_embeddings_layernorm|ln_f)\.(?:weight|bias)|"
                        r"h\.(\d{1,4})\.([a-z0-9_.]+)|(lm_head)\.weight)$")


_LAYER_NAMES = frozenset(name for name, _ in LAYER_TENSORS)  # a block's parameters, "mlp.dense_h_to_4h.weight" ...


def grad_group(name: str) -> tuple[int, str] | None:
    """The row a parameter's gradient belongs to in a diff, as (order, row name); None for an unknown name.
    Order is the backward pass's: head and ln_f first, then blocks from the last, the embeddings last."""
    m = _GRAD_NAME.match(name)
    if m is None or (m.group(3) is not None and m.group(3) not in _LAYER_NAMES):
        return None
    top, layer, _, head = m.groups()
    if head or top == "ln_f":
        return (-1, "grad head + ln_f")
    if top:
        return (1 << 30, "grad embeddings")
    i = int(layer)
    if i >= MAX_LAYERS:
        return None
    return (MAX_LAYERS - i, f"grad block {i}")


def _meta(a: np.ndarray, path: str) -> dict:
    if a.dtype.kind not in "US" or a.ndim != 0:
        raise MinibloomError(f"{path}: 'meta' must be a 0-d string array holding JSON (np.array(json.dumps(d)))")
    meta = parse_json(str(a), f"{path}: 'meta'", max_bytes=1 << 20)
    if not isinstance(meta, dict):
        raise MinibloomError(f"{path}: 'meta' must be a JSON object")
    return meta


def _check_shape(a: np.ndarray, want: tuple, what: str) -> None:
    if a.dtype.kind not in "fiu":
        raise MinibloomError(f"{what}: expected a float array, got dtype {a.dtype}")
    if a.ndim != len(want) or any(w is not None and s != w for s, w in zip(a.shape, want)):
        spec = ", ".join("*" if w is None else str(w) for w in want)
        raise MinibloomError(f"{what}: shape {a.shape} does not match input_ids [B, T] (expected [{spec}])")


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
    policy: object = None  # the minibloom.testing.Policy applied
    verdict: object = None  # the logits' minibloom.testing.Verdict (None without logits in both traces)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def first_divergence(self) -> LayerDiff | None:
        """The first row, in computation order, whose error exceeds the tolerance."""
        return next((r for r in self.rows if not r.passed), None)

    def table(self) -> str:
        """The report as a fixed-width text table followed by the verdict."""
        pol = self.policy
        lines = [f"A: {self.names[0]}", f"B: {self.names[1]} (reference)"]
        if pol is not None and pol.kind != "custom":
            lines.append(f"policy: {pol.kind} ({pol.what}); hidden states: max|A - B| <= {self.rtol:.2g} * max|B|")
        else:
            lines.append(f"tolerance: max|A - B| <= {self.atol:.1e} + {self.rtol:.1e} * max|B|, per layer")
        lines.append("")
        lines.append(f"{'layer':<22} {'max abs err':>12} {'mean abs err':>12} {'max rel err':>12}  result")
        for r in self.rows:
            lines.append(f"{r.name:<22} {r.max_abs:>12.3e} {r.mean_abs:>12.3e} {r.max_rel:>12.3e}  "
                         f"{'ok' if r.passed else 'FAIL'}")
        lines += [""] + [f"note: {n}" for n in self.notes]
        if self.verdict is not None:
            lines += self.verdict.message().splitlines()
        elif self.top1_agreement is not None:
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


def _array_of(v, what: str) -> np.ndarray:
    """A trace dict's value as a NumPy array (a torch tensor or any array-like), or a MinibloomError naming it."""
    if hasattr(v, "detach"):  # torch: NumPy cannot hold bfloat16, so widen first (no torch import)
        v = v.detach().cpu()
        v = v.double() if v.is_floating_point() else v
        v = v.numpy()
    try:
        a = np.asarray(v)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise MinibloomError(f"{what}: not an array ({type(e).__name__}: {str(e)[:120]})") from None
    if a.dtype.kind not in "fiubUS":
        raise MinibloomError(f"{what}: an array of {a.dtype} (expected integers or real floats)")
    return a


def _as_trace(t, what: str) -> dict:
    if isinstance(t, (str, os.PathLike)):
        return load_trace(t)
    if isinstance(t, dict):
        t = {**t, "meta": t.get("meta") or {}}
        raw = {k: v for k, v in t.items() if k not in ("hidden_states", "attentions", "meta", "grads")
               and v is not None}
        for name in ("hidden_states", "attentions"):
            for i, a in enumerate(t.get(name) or []):
                raw[f"{name}.{i}"] = np.asarray(a)
        if not all(isinstance(k, str) for k in t) or not isinstance(t.get("grads") or {}, dict):
            raise MinibloomError(f"{what}: a trace dict has string keys (input_ids, logits, ...) and grads a dict")
        for name, g in (t.get("grads") or {}).items():
            raw[f"grad.{name}"] = g
        out = _validate({k: _array_of(v, f"{what}: {k}") for k, v in raw.items()}, what)
        out["meta"] = dict(t["meta"])
        return out
    raise MinibloomError(f"{what}: expected a trace dict or a path to a .npz trace, got {type(t).__name__}")


def diff_policy(candidate: dict, reference: dict):
    """The verdict policy (``minibloom.testing``) for candidate trace meta ``candidate`` against ``reference``.

    The candidate's ``meta["kind"]`` or ``meta["dtype"]`` names its precision and selects the policy; an engine named
    in ``meta["implementation"]`` refines it (llama.cpp / ggml float32 -> ``float32-gelu-table``), and so does a
    reference traced from a GGUF file (a float32 port of a GGUF file is a ggml port). A reference computed in lower
    precision than the candidate (not float64) makes the looser of the two policies apply. A ``kind`` or ``dtype``
    that names no policy raises ``MinibloomError`` naming the key (set a known kind, or pass --kind / --rtol).
    The policy is unsized: ``Policy.at`` sizes it for the model (``diff_traces`` does).
    """
    from .testing import POLICIES, policy_for

    def pol(meta: dict, who: str):
        impl = str(meta.get("implementation") or "")
        key = "kind" if meta.get("kind") is not None else "dtype"
        name = meta.get(key)
        if name is None:
            return None
        if not isinstance(name, str):
            raise MinibloomError(f"{who} meta {key!r}: must be a string naming a kind, got {type(name).__name__}")
        try:
            return policy_for(name, impl)
        except MinibloomError as e:
            raise MinibloomError(f"{who} meta {key!r}: {e} (or pass --kind / --rtol)") from None

    p = pol(candidate, "candidate") or POLICIES["float32"]
    ref_model = str(reference.get("model") or "")
    if p.kind == "float32" and ref_model.endswith(".gguf") and not candidate.get("kind"):
        p = POLICIES["float32-gelu-table"]
    r = pol(reference, "reference")
    if r is not None and r.kind != "float64" and r.rel > p.rel:
        p = r
    return p


def meta_size(meta: dict, what: str) -> tuple[int, int] | None:
    """(n_layer, hidden_size) a trace's meta claims, validated (bounded integers: ``minibloom.testing.check_size``);
    None when it claims neither. One without the other is an error."""
    from .testing import MAX_HIDDEN_SIZE, MAX_N_LAYER, check_dimension

    have = [k for k in ("n_layer", "hidden_size") if meta.get(k) is not None]
    if not have:
        return None
    if len(have) == 1:
        missing = "hidden_size" if have == ["n_layer"] else "n_layer"
        raise MinibloomError(f"{what}: meta has {have[0]!r} but not {missing!r} (give both, or neither)")
    return (check_dimension(meta["n_layer"], "n_layer", MAX_N_LAYER, f"{what}: meta"),
            check_dimension(meta["hidden_size"], "hidden_size", MAX_HIDDEN_SIZE, f"{what}: meta"))


def model_size(candidate: dict, reference: dict, names: tuple[str, str] = ("A", "B"),
               known: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(n_layer, hidden_size) that sizes a verdict of ``candidate`` against ``reference``: ``known`` (the reference
    model's config), else the reference's hidden states, else the reference's meta. The candidate never sizes its
    own verdict: its meta (and its hidden states) must agree with that size, or ``MinibloomError`` says which
    disagrees. None when nothing but the candidate says."""
    from .testing import check_size

    size, source = None, ""
    if known is not None:
        size, source = check_size(known, "size"), "the reference model"
    h = reference.get("hidden_states")
    if h:
        arrays = (len(h) - 1, int(h[0].shape[-1]))
        if size is not None and arrays != size:
            raise MinibloomError(f"{names[1]}: hidden states of a {arrays[0]} x {arrays[1]} model, but {source} is "
                                 f"{size[0]} x {size[1]}")
        size, source = size or arrays, source or f"{names[1]}'s hidden states"
    ref_meta = meta_size(reference.get("meta") or {}, names[1])
    if ref_meta is not None and size is not None and ref_meta != size:
        raise MinibloomError(f"{names[1]}: meta n_layer / hidden_size {ref_meta[0]} x {ref_meta[1]} disagree with "
                             f"{source} ({size[0]} x {size[1]})")
    size, source = size or ref_meta, source or f"{names[1]}'s meta"
    cand_meta = meta_size(candidate.get("meta") or {}, names[0])
    if cand_meta is not None and size is not None and cand_meta != size:
        raise MinibloomError(f"{names[0]}: meta n_layer / hidden_size {cand_meta[0]} x {cand_meta[1]} disagree with "
                             f"{source} ({size[0]} x {size[1]})")
    hc = candidate.get("hidden_states")
    if hc and size is not None and int(hc[0].shape[-1]) != size[1]:
        raise MinibloomError(f"{names[0]}: hidden states of width {int(hc[0].shape[-1])}, but {source} says "
                             f"hidden_size {size[1]}")
    return size


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


def explain_input_mismatch(ta: dict, tb: dict, names: tuple[str, str]) -> str | None:
    """Why traces ``ta`` and ``tb`` (validated dicts) cannot be compared position by position, in words a user can act
    on; None when they can: the same attention_mask and the same ids at every real position (pad ids may differ: a
    pad never reaches a real position's output). Cases, most specific first: the same real tokens laid out
    differently (left vs right padding, other lengths), the same ids with another mask (which rows), different shapes
    (batch / seq), different ids (the first row and position that differ, and both ids)."""
    from ..tokenizer import padding_side

    na, nb = names
    ia, ib = ta["input_ids"], tb["input_ids"]
    ma, mb = ta["attention_mask"], tb["attention_mask"]
    (Ba, Ta), (Bb, Tb) = (tuple(int(n) for n in x.shape) for x in (ia, ib))  # plain ints in every message
    same_shape = (Ba, Ta) == (Bb, Tb)

    if same_shape and np.array_equal(ma, mb):
        differ = np.argwhere((ia != ib) & (mb != 0))  # [N, 2] real positions whose ids differ
        if len(differ) == 0:
            return None
        r, c = (int(i) for i in differ[0])
        return (f"{na} and {nb} were made from different input_ids: row {r}, position {c} holds token "
                f"{int(ia[r, c])} in {na} but {int(ib[r, c])} in {nb} ({len(differ)} real position(s) differ); "
                "trace both from the same ids")

    def real_tokens(ids, mask):
        return [[int(t) for t in ids[i][mask[i] != 0]] for i in range(ids.shape[0])]

    ra, rb = real_tokens(ia, ma), real_tokens(ib, mb)
    sa, sb = padding_side(ma), padding_side(mb)
    words = {"none": "not padded", "left": "left-padded", "right": "right-padded",
             "mixed": "padded in a mixed layout (rows padded on different sides or with holes)"}

    def layout(B, T, side):
        return f"{B} row(s) x {T} positions, {words[side]}"

    if ra == rb:  # the same tokens in every row, laid out differently
        shortest_layout = Ta == max((len(x) for x in ra), default=0)  # what `minibloom trace --padding` would make
        if sa in ("left", "right") and shortest_layout:
            how = f"make the reference with `minibloom trace --padding {sa}` (same --ids / --text)"
        elif sa == "none":
            how = "make the reference without padding (`minibloom trace` pads no row when all are equally long)"
        else:
            how = (f"make the reference with {na}'s attention_mask: save it (np.save('mask.npy', mask)) and run "
                   "`minibloom trace --mask mask.npy` with every --ids row in full, pad ids included")
        if sa != sb and same_shape:
            what = f"{na} is {words[sa]}, {nb} is {words[sb]}"
        else:
            what = f"{na} is {layout(Ba, Ta, sa)}, {nb} is {layout(Bb, Tb, sb)}"
        return (f"{what}: both hold the same real tokens, but diff compares position by position, so their "
                f"layouts must match; {how}, or trace {na} with {nb}'s layout")

    if same_shape and np.array_equal(ia, ib):  # the same ids, another mask
        rows = [i for i in range(Ba) if not np.array_equal(ma[i], mb[i])]
        r = rows[0]
        shown = ", ".join(str(i) for i in rows[:8]) + (", ..." if len(rows) > 8 else "")
        msg = (f"{na} and {nb} were made from the same input_ids but a different attention_mask: row(s) {shown} "
               f"differ (row {r}: {len(ra[r])} real token(s) in {na}, {len(rb[r])} in {nb})")
        for name, m in ((na, ma), (nb, mb)):
            if m.all():
                msg += f" ({name} has no padding at all: was its attention_mask left out? It defaults to all ones)"
        return msg + "; trace both with the same mask (`minibloom trace --mask FILE`)"

    if not same_shape:
        dims = []
        if Ba != Bb:
            dims.append(f"batch {Ba} vs {Bb}")
        if Ta != Tb:
            dims.append(f"seq {Ta} vs {Tb}")
        msg = (f"{na} and {nb} were made from different input_ids of different shapes ({', '.join(dims)}): "
               f"{na} is {layout(Ba, Ta, sa)}, {nb} is {layout(Bb, Tb, sb)}")
    else:
        msg = f"{na} and {nb} were made from different input_ids and different attention_mask"
        if sa != sb:
            msg += f" ({na} is {words[sa]}, {nb} is {words[sb]})"
    for r in range(min(Ba, Bb)):  # the first row whose real tokens differ
        xa, xb = ra[r], rb[r]
        if xa == xb:
            continue
        k = next((k for k, (u, v) in enumerate(zip(xa, xb)) if u != v), None)
        if k is None:
            msg += (f"; row {r} has {len(xa)} real token(s) in {na}, {len(xb)} in {nb} (the first "
                    f"{min(len(xa), len(xb))} agree)")
        else:
            ca, cb = (int(np.flatnonzero(m[r])[k]) for m in (ma, mb))
            where = f"position {ca}" if ca == cb else f"position {ca} in {na}, {cb} in {nb}"
            msg += f"; row {r} differs first at its real token {k} ({where}): {xa[k]} in {na}, {xb[k]} in {nb}"
        break
    return msg + "; trace both from the same ids"


def diff_traces(a, b, rtol: float | None = None, atol: float = 0.0, *,
                size: tuple[int, int] | None = None, policy=None) -> DiffReport:
    """Compare trace ``a`` against the reference trace ``b`` (dicts or .npz paths), layer by layer.

    Only the real (attention_mask == 1) positions are compared. By default the candidate's policy applies
    (``diff_policy``: its ``meta`` kind or dtype): each hidden state passes when ``max|a - b| <= hidden_rel *
    max|b|``, the logits when every part of the policy holds (relative error, KL mean / max, top-1 agreement).
    With ``rtol`` / ``atol`` given, every layer and the logits pass when ``max|a - b| <= atol + rtol * max|b|``.
    The policy is sized for the model (``model_size``): ``size`` = (n_layer, hidden_size) when the caller knows the
    model, else the reference's hidden states or meta; never the candidate's meta, which must agree with it.
    Raises ``MinibloomError`` when the traces cannot be compared (different inputs, shapes, layer counts, sizes) or
    the policy cannot be sized (a logits-only reference without meta n_layer / hidden_size, and no ``rtol``).
    """
    names = (os.fspath(a) if isinstance(a, (str, os.PathLike)) else "A",
             os.fspath(b) if isinstance(b, (str, os.PathLike)) else "B")
    ta, tb = _as_trace(a, names[0]), _as_trace(b, names[1])
    mismatch = explain_input_mismatch(ta, tb, names)
    if mismatch is not None:
        raise MinibloomError(mismatch)
    from .testing import Tolerance, check_logits

    notes: list[str] = []
    for value, name in ((rtol, "rtol"), (atol, "atol")):
        if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise MinibloomError(f"{name}: must be a finite number >= 0, got {value!r}")
    meta_a, meta_b = _computed_dtype(ta), _computed_dtype(tb)
    size = model_size(ta, tb, names, size)
    if rtol is None and policy is not None:  # a policy the caller sized already (verify_trace)
        rtol = policy.hidden_rel or policy.rel
    elif rtol is None:
        policy = diff_policy(meta_a, meta_b)
        if policy.scales and size is None:
            raise MinibloomError(f"{names[1]}: the model's size is unknown (a logits-only reference without meta "
                                 f"n_layer / hidden_size), and the {policy.kind!r} policy's limits grow with it: "
                                 "trace the reference with its hidden states or meta, or pass --rtol")
        policy = policy if size is None else policy.at(*size)
        if atol == 0:
            rtol = policy.hidden_rel or policy.rel
        else:
            rtol = policy.hidden_rel or policy.rel
            policy = Tolerance(rtol, f"max|A - B| <= {atol:.1e} + {rtol:.1e} * max|B|", "custom")
    else:
        rtol = float(rtol)
        policy = Tolerance(rtol, f"max|A - B| <= {atol:.1e} + {rtol:.1e} * max|B|", "custom")
    real = tb["attention_mask"].astype(bool)  # [B, T]
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
    top1 = verdict = None
    la, lb = ta["logits"], tb["logits"]
    if la is not None and lb is not None:
        if la.shape != lb.shape:
            raise MinibloomError(f"logits: shape {la.shape} in {names[0]} but {lb.shape} in {names[1]}")
        logit_row = row("logits", "logits", la[real], lb[real])
        if real.any():
            verdict = check_logits(la, lb, real, policy, ta["input_ids"], "logits")
            top1 = verdict.top1
            if policy.kind != "custom":  # the policy's parts decide (rel, KL, top-1); a custom bound: the row alone
                logit_row.passed = verdict.passed
        rows.append(logit_row)
    elif (la is None) != (lb is None):
        notes.append(f"logits only in {names[0] if lb is None else names[1]}: not compared")
    rows += _grad_rows(ta, tb, names, notes, row)
    if not rows:
        raise MinibloomError(f"{names[0]} and {names[1]} have nothing in common to compare")
    for t, nm in ((ta, names[0]), (tb, names[1])):
        if t["meta"].get("dtype"):
            notes.append(f"{nm}: computed in {t['meta']['dtype']}" + (" (quantized)" if t["meta"].get("quantized")
                                                                      else ""))
    return DiffReport(rows, float(rtol), float(atol), names, notes, top1, policy, verdict)


def _grad_rows(ta: dict, tb: dict, names: tuple[str, str], notes: list[str], row) -> list[LayerDiff]:
    """Rows for the gradient part of two traces: the loss, then each layer's gradients (all of its parameters as
    one row, the worst relative error of them), in the order the backward pass computes them."""
    ga, gb = ta.get("grads"), tb.get("grads")
    if not ga or not gb:
        if ga or gb:
            notes.append(f"gradients only in {names[0] if ga else names[1]}: not compared")
        return []
    if set(ga) != set(gb):
        only = sorted(set(ga) ^ set(gb))[0]
        raise MinibloomError(f"gradients: {only} is in {names[0] if only in ga else names[1]} only (both traces need "
                             "the same parameters)")
    la, lb = ta.get("labels"), tb.get("labels")
    if la is not None and lb is not None and not np.array_equal(la, lb):
        raise MinibloomError(f"labels differ between {names[0]} and {names[1]}: gradients of different losses")
    rows = []
    if ta.get("loss") is not None and tb.get("loss") is not None:
        rows.append(row("loss", "loss", np.asarray([ta["loss"]]), np.asarray([tb["loss"]])))
    groups: dict[tuple[int, str], list[str]] = {}
    for name in sorted(ga):
        groups.setdefault(grad_group(name), []).append(name)
    for (_, label), members in sorted(groups.items()):
        worst = max((row(label, f"grad.{n}", ga[n], gb[n]) for n in members), key=lambda r: (not r.passed, r.max_rel))
        rows.append(worst)
    return rows


def verify_trace(candidate, model, kind: str | None = None):
    """Judge another engine's trace (a ``.npz`` path or a trace dict; logits alone are enough) against minibloom's
    float64 run of ``model`` on the same input ids and mask: the ``DiffReport`` of ``diff_traces``,
    under the policy of ``kind`` (default: the candidate's ``meta`` kind / dtype)."""
    from .testing import policy_for, reference_model

    what = str(candidate) if isinstance(candidate, (str, os.PathLike)) else "candidate"
    cand = _as_trace(candidate, what)
    if cand["logits"] is None and cand["hidden_states"] is None:
        raise MinibloomError(f"{what}: no logits to judge (verify compares logits and hidden states with minibloom's "
                             "float64 run; a trace of gradients only can be compared with another trace: "
                             "minibloom diff)")
    if kind is not None:
        policy_for(kind)  # a bad name fails here, naming the kinds
        cand["meta"] = {**cand["meta"], "kind": kind}
    ref_model = reference_model(model)
    size = (ref_model.config.n_layer, ref_model.config.hidden_size)
    ref_name = str(getattr(model, "path", None) or model)
    policy = diff_policy(_computed_dtype(cand), {"dtype": "float64", "model": ref_name}).at(*size)
    if policy.kind == "int8-activations":
        from .testing import activation_models

        models = activation_models(model)  # the engine's activation rounding emulated, each way a CPU may compute
    else:
        models = [(None, ref_model)]
    if policy.probes:  # a statistical kind: sized by how much its emulated ports move this very model
        from .testing import probe_policy

        policy = probe_policy(policy, ref_model, cand["input_ids"], cand["attention_mask"])
    reports = []
    for name, m in models:
        ref = trace(m, cand["input_ids"], cand["attention_mask"])
        ref["meta"]["model"] = ref_name
        if cand["hidden_states"] is None:
            ref["hidden_states"] = None
        rep = diff_traces(cand, ref, size=size, policy=policy)
        if name is not None:
            rep.notes.append(f"reference: minibloom float64 on {ref['meta']['model']} with {name} activations "
                             f"(tried: {', '.join(n for n, _ in models)})")
        if rep.passed:
            return rep
        reports.append(rep)
    return min(reports, key=lambda r: np.nan_to_num(r.verdict.rel if r.verdict is not None else np.inf, nan=1e300))
