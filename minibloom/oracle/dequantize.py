"""Same-weights references for quantized ports: the weights an engine multiplies by (its integers, scales and zero
points, dequantized in float64 by one of the readers ``read_torch``, ``read_ct2``, ``read_onnx``, ``read_openvino``)
written as a BLOOM checkpoint in Hugging Face's format, with the unquantized model's (``like``) tensors for whatever
the engine left in floating point. minibloom float64 on that checkpoint is the reference a weight-only port must
match to its float precision (``minibloom verify CAND.npz --model DIR --kind float32``): quantization error is no
longer mixed with arithmetic error.

The checkpoint is written by the project's one writer (``minibloom.formats.weights.write_checkpoint``), beside a note
``minibloom_dequantized.json`` saying where every tensor came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np

from ..errors import MinibloomError
from .engine_weights import DEQUANTIZED_NOTE, EngineWeights

NOTE_FILE = DEQUANTIZED_NOTE
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")
ACCEPTED = ("a transformers BLOOM quantized in torch (an in-memory module; optimum-quanto, torchao, HQQ, "
            "bitsandbytes), a CTranslate2 model directory (with model.bin), an OpenVINO IR (.xml beside its .bin, "
            "or a directory holding exactly one), an ONNX model (.onnx, or a directory holding exactly one), a "
            "transformers checkpoint directory whose config.json has a quantization_config, or a .pt/.pth file "
            "holding a whole pickled module")
CLEAR = 0.5  # an unnamed tensor maps to a MODEL tensor closer than this (relative Frobenius distance) ...
MARGIN = 0.5  # ... and closer than MARGIN times the next best
NAMED_LIMIT = 1.0  # a tensor the reader named must be closer than this to MODEL's (unrelated weights are ~1.4)
_LOOKUP_OR_HEAD = ("word_embeddings.weight", "lm_head.weight")


# ---- arguments ---------------------------------------------------------------------------------------------
def _files(directory: str, suffix: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.lower().endswith(suffix) and
                  os.path.isfile(os.path.join(directory, n)))


def _openvino_xml(xml: str, where: str) -> str:
    if not os.path.isfile(os.path.splitext(xml)[0] + ".bin"):
        raise MinibloomError(f"{where}: OpenVINO IR {xml} has no weights file {os.path.splitext(xml)[0]}.bin beside it")
    return xml


def _config_has_quantization(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    from ..jsonfile import read_json_object

    return isinstance(read_json_object(path).get("quantization_config"), dict)


def source_form(source) -> tuple[str, object]:
    """What ``source`` is, checked without reading its weights: ("torch", module), ("ct2", dir),
    ("openvino", .xml path), ("onnx", .onnx path), ("transformers", dir) or ("pickle", .pt path)."""
    if not isinstance(source, (str, os.PathLike)):
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and isinstance(source, torch.nn.Module):
            return "torch", source
        raise MinibloomError(f"source: a {type(source).__name__} is not a quantized model; expected {ACCEPTED}")
    path = os.fspath(source)
    where = f"source {path}"
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model.bin")):
            return "ct2", path
        if _config_has_quantization(path):
            return "transformers", path
        xml, onnx = _files(path, ".xml"), _files(path, ".onnx")
        if len(xml) + len(onnx) > 1:
            raise MinibloomError(f"{where}: holds several models ({', '.join(xml + onnx)}); name the file")
        if xml:
            return "openvino", _openvino_xml(os.path.join(path, xml[0]), where)
        if onnx:
            return "onnx", os.path.join(path, onnx[0])
        raise MinibloomError(f"{where}: a directory with no quantized model minibloom can read; expected {ACCEPTED}")
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext == ".xml":
            return "openvino", _openvino_xml(path, where)
        if ext == ".onnx":
            return "onnx", path
        if ext in (".pt", ".pth"):
            return "pickle", path
        raise MinibloomError(f"{where}: a {ext or 'suffix-less'} file is not a quantized model minibloom can read; "
                             f"expected {ACCEPTED}")
    if os.path.exists(path):  # a FIFO, a device, a socket: never opened (a FIFO would block)
        raise MinibloomError(f"{where}: not a regular file or a directory")
    raise MinibloomError(f"{where}: no such file or directory")


def _local_path(like) -> str | None:
    """The local file or directory ``like`` names (None for a hub id or an in-memory model)."""
    from ..bloom import Bloom

    if isinstance(like, Bloom):
        return like.path if like.path and os.path.exists(like.path) else None
    path = os.fspath(like)
    return path if os.path.exists(path) else None


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_out_dir(out_dir, force: bool, keep: tuple[str, ...] = ()) -> str:
    """``out_dir`` as a path that may be (re)written: not a file, empty or absent unless ``force``, and never a
    directory that is or holds one of the inputs in ``keep`` (replacing it would delete them)."""
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise MinibloomError(f"out_dir: expected a directory path, got {out_dir!r}")
    out = os.fspath(out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise MinibloomError(f"out_dir {out}: is a file, not a directory")
    for path in keep:
        if path and _inside(path, out):
            raise MinibloomError(f"out_dir {out}: would overwrite an input ({path}); choose another directory")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # the nearest existing ancestor receives the new directories
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise MinibloomError(f"out_dir {out}: {parent} is not a writable directory")
    if os.path.isdir(out):
        there = sorted(os.listdir(out))
        if there and not force:
            shown = ", ".join(there[:5]) + (f", ... ({len(there)} entries)" if len(there) > 5 else "")
            raise MinibloomError(f"out_dir {out}: exists and is not empty ({shown}); pass force=True (--force) to "
                                 "replace it")
    return out


# ---- reading -----------------------------------------------------------------------------------------------
def _reader(form: str):
    """The reader module of ``form``, imported only now (engines are optional)."""
    try:
        if form == "ct2":
            from . import read_ct2 as mod
        elif form == "openvino":
            from . import read_openvino as mod
        elif form == "onnx":
            from . import read_onnx as mod
        else:
            from . import read_torch as mod
    except ImportError as e:
        raise MinibloomError(f"source: the {form} reader could not be imported ({e}); install its engine "
                             "(pip install 'minibloom[test]')") from None
    return mod


def _load_torch(form: str, path: str):
    """A whole module from a transformers quantized checkpoint or a pickled .pt file."""
    try:
        import torch
    except ImportError:
        raise MinibloomError(f"source {path}: reading it needs torch; pip install 'minibloom[test]'") from None
    try:
        if form == "pickle":
            module = torch.load(path, map_location="cpu", weights_only=False)
        else:
            import transformers

            module = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    except MinibloomError:
        raise
    except Exception as e:  # noqa: BLE001 - the engine's own errors, named with the file
        raise MinibloomError(f"source {path}: could not be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(module, torch.nn.Module):
        raise MinibloomError(f"source {path}: holds a {type(module).__name__}, not a whole torch module")
    return module


def read_source(form: str, value) -> EngineWeights:
    """The engine weights of a source already checked by ``source_form``."""
    if form in ("transformers", "pickle"):
        value = _load_torch(form, value)
    weights = _reader(form).read(value)
    if not isinstance(weights, EngineWeights):
        raise MinibloomError(f"source: the {form} reader returned a {type(weights).__name__}, not EngineWeights")
    return weights


def _like_model(like, progress: bool):
    """MODEL in float64: a ``Bloom`` as it is (widened), anything else through ``minibloom.load``."""
    from ..bloom import Bloom, load

    if isinstance(like, Bloom):
        return like
    return load(like, dtype="float64", progress=progress)


# ---- mapping -----------------------------------------------------------------------------------------------
def _distance(a: np.ndarray, ref: np.ndarray) -> float:
    """Relative Frobenius distance ||a - ref|| / ||ref|| (inf when ref is zero and a is not)."""
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(a - ref))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def assign(weights: EngineWeights, model: dict[str, np.ndarray], tied: bool) -> tuple[dict, dict]:
    """Map the engine's matrices to BLOOM tensor names: (``{bloom_name: float64 array [out, in]}``,
    ``{engine_name: bloom_name}``).

    ``model``: MODEL's flat tensors (bare names, float64); ``tied``: whether MODEL's head is its embedding. A name
    that already is a BLOOM name must have MODEL's shape (and resemble MODEL's values). Any other tensor goes to the
    same-shaped MODEL tensor (either orientation) it is clearly closest to: relative Frobenius distance below
    ``CLEAR`` and below ``MARGIN`` times the next candidate's, and not taken by another engine tensor."""
    refs = dict(model)
    if tied:
        refs["lm_head.weight"] = model["word_embeddings.weight"]
    out: dict[str, np.ndarray] = {}
    went: dict[str, str] = {}
    if not isinstance(weights.matrices, dict) or not weights.matrices:
        raise MinibloomError(f"engine weights of {weights.engine}: no matrices to map")
    names = list(weights.matrices)
    if not all(isinstance(n, str) for n in names):
        raise MinibloomError(f"engine weights of {weights.engine}: tensor names must be strings")
    for name in sorted(names, key=lambda n: (n not in refs, n)):  # the reader's BLOOM names first
        try:
            a = np.asarray(weights.matrices[name], np.float64)
        except (TypeError, ValueError):
            raise MinibloomError(f"engine tensor {name}: not a numeric array "
                                 f"({type(weights.matrices[name]).__name__})") from None
        if not np.all(np.isfinite(a)):
            raise MinibloomError(f"engine tensor {name}: NaN or inf in its dequantized values")
        if name in refs:
            ref = refs[name]
            if a.shape != ref.shape:
                raise MinibloomError(f"engine tensor {name}: shape {list(a.shape)}, but MODEL's {name} has shape "
                                     f"{list(ref.shape)}; is --like the model that was quantized?")
            d = _distance(a, ref)
            if not d < NAMED_LIMIT:
                raise MinibloomError(f"engine tensor {name}: relative distance {d:.3g} to MODEL's {name}; these "
                                     "weights are not a quantization of MODEL's (is --like the model that was "
                                     "quantized?)")
            target, value = name, a
        else:
            target, value = _match(name, a, refs, went)
        out[target] = value
        went[name] = target
    return out, went


def _match(name: str, a: np.ndarray, refs: dict, went: dict) -> tuple[str, np.ndarray]:
    forms = [a, a.T] if a.ndim == 2 else [a]  # engines store [out, in] or [in, out]
    cands = sorted(((_distance(f, ref), target, f) for target, ref in refs.items() for f in forms
                    if f.shape == ref.shape), key=lambda c: (c[0], c[1]))
    if not cands:
        raise MinibloomError(f"engine tensor {name} (shape {list(a.shape)}) cannot be mapped: MODEL has no tensor of "
                             "that shape in either orientation; is --like the model that was quantized?")
    d, target, value = cands[0]
    second = min((c[0] for c in cands if c[1] != target), default=math.inf)
    if target in _LOOKUP_OR_HEAD:
        raise MinibloomError(f"engine tensor {name} (shape {list(a.shape)}) cannot be mapped: a [vocab, hidden] "
                             "matrix is ambiguous between word_embeddings.weight and lm_head.weight unless the "
                             "reader names it")
    if not (d < CLEAR and d < MARGIN * second):
        raise MinibloomError(f"engine tensor {name} (shape {list(a.shape)}) cannot be mapped: its closest MODEL "
                             f"tensor {target} is at relative distance {d:.3g}, the next at {second:.3g} (a match "
                             f"needs < {CLEAR} and < {MARGIN} x the next)")
    taken = [k for k, v in went.items() if v == target]
    if taken:
        raise MinibloomError(f"engine tensor {name} cannot be mapped: its closest MODEL tensor {target} already "
                             f"holds engine tensor {taken[0]}")
    return target, value


# ---- writing -----------------------------------------------------------------------------------------------
def _rounded(a: np.ndarray, fmt: str) -> np.ndarray:
    """``a`` rounded to an engine's float storage format, back in float64."""
    from ..formats.safetensors import round_to_bf16

    if fmt == "float16":
        return a.astype(np.float16).astype(np.float64)
    if fmt == "bfloat16":
        return round_to_bf16(a.astype(np.float32)).astype(np.float64)
    if fmt == "float32":
        return a.astype(np.float32).astype(np.float64)
    raise MinibloomError(f"engine weights: unknown float storage format {fmt!r}")


def _float_stored(weights: EngineWeights, model: dict) -> tuple[EngineWeights, dict, list[str]]:
    """Split off the tensors the engine keeps in a float format (``EngineWeights.stored``): the reference holds
    MODEL's values rounded to that format; the names whose engine values differ from those are returned too."""
    if not weights.stored:
        return weights, {}, []
    floats, differs = {}, []
    for name, fmt in sorted(weights.stored.items()):
        if name not in model or name not in weights.matrices:
            raise MinibloomError(f"engine tensor {name}: kept in {fmt} by the engine but not a tensor of MODEL")
        a = np.asarray(weights.matrices[name], np.float64)
        floats[name] = _rounded(model[name], fmt)
        if a.shape != floats[name].shape or not np.array_equal(a, floats[name]):
            differs.append(name)
    rest = {n: v for n, v in weights.matrices.items() if n not in weights.stored}
    return dataclasses.replace(weights, matrices=rest), floats, differs


def _exact_float32(arrays) -> bool:
    return all(np.array_equal(a.astype(np.float32).astype(np.float64), a) for a in arrays)


def _tokenizer_dir(path: str | None) -> str | None:
    if not path:
        return None
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _write(out: str, force: bool, cfg, flat: dict, stored: str, note: dict, tokenizer_dir: str | None) -> None:
    """Write into a fresh sibling directory, then put it in place of ``out`` (replaced as a whole)."""
    from ..formats.weights import nest, write_checkpoint

    from ..paths import new_dir, swap_in

    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = new_dir(parent, f".{os.path.basename(os.path.abspath(out))}.new-")
    except OSError as e:
        raise MinibloomError(f"out_dir {out}: cannot be created ({e.strerror or e})") from None
    try:
        write_checkpoint(tmp, cfg, nest(flat), stored)
        if tokenizer_dir:
            for n in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_dir, n)):
                    shutil.copyfile(os.path.join(tokenizer_dir, n), os.path.join(tmp, n))
        with open(os.path.join(tmp, NOTE_FILE), "w") as f:
            json.dump(note, f, indent=2)
        if os.path.isdir(out) and not force and os.listdir(out):
            raise MinibloomError(f"out_dir {out}: was filled while the reference was computed")
        swap_in(tmp, os.path.abspath(out), what="out_dir")
    except OSError as e:
        raise MinibloomError(f"out_dir {out}: could not be written ({e.strerror or e})") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def dequantized_checkpoint(source, out_dir, like, *, force: bool = False, progress: bool = False,
                           activations: str | None = None) -> str:
    """Write the same-weights reference of a quantized model to ``out_dir`` and return ``out_dir``.

    ``source``: a transformers BLOOM quantized in torch (in-memory module: optimum-quanto, torchao, HQQ,
    bitsandbytes), a CTranslate2 model directory, an OpenVINO IR (.xml, or a directory holding one), an ONNX model
    (.onnx, or a directory holding one), a transformers directory whose config.json has ``quantization_config``
    (loaded with ``AutoModelForCausalLM.from_pretrained``), or a ``.pt``/``.pth`` file of a whole module — read with
    ``torch.load(weights_only=False)``, which UNPICKLES (runs code from the file): only for files you made.
    ``like``: the unquantized model (checkpoint path, hub id, or a ``minibloom.Bloom``), loaded in float64.

    ``out_dir`` receives a Hugging Face BLOOM checkpoint (config and tokenizer from MODEL; a quantized head on a
    tied MODEL is written untied) holding the engine's dequantized weights and MODEL's tensors for the rest, stored
    float32 when every value is exactly a float32, else float64; plus ``minibloom_dequantized.json``. An existing,
    non-empty ``out_dir`` is refused unless ``force``, which replaces it as a whole. Every argument is checked before
    any work.

    ``activations``: how the engine quantizes activations at run time, when its files do not say (OpenVINO's CPU
    plugin decides at compile time: ``"int8-per-group:32"`` for its default dynamic quantization; ``"none"`` for a
    weight-only run); default: what the reader found. Recorded in the note, where ``minibloom verify --kind
    int8-activations`` reads it.
    """
    for flag, value in (("force", force), ("progress", progress)):
        if not isinstance(value, bool):
            raise MinibloomError(f"{flag}: expected True or False, got {value!r}")
    form, value = source_form(source)
    from ..bloom import Bloom
    from .activations import parse_scheme

    override = None if activations is None else parse_scheme(activations)

    if like is None or not isinstance(like, (str, os.PathLike, Bloom)):
        raise MinibloomError(f"like: expected the unquantized model (a checkpoint path, hub id or minibloom.Bloom), "
                             f"got {type(like).__name__}")
    like_path = _local_path(like)
    out = check_out_dir(out_dir, force, (like_path, None if form == "torch" else os.fspath(value)))

    try:
        model = _like_model(like, progress)
    except MinibloomError as e:
        raise MinibloomError(f"like: {e}") from None
    if model.path and os.path.exists(model.path):  # a name under weights/ or a hub id, now resolved
        like_path = model.path
        check_out_dir(out, force, (like_path,))
    try:
        weights = read_source(form, value)
    except MinibloomError as e:
        raise MinibloomError(str(e) if str(e).startswith("source") else f"source: {e}") from None
    from ..formats.weights import flatten

    flat = {k: np.asarray(v, np.float64) for k, v in flatten(model.params).items()}
    cfg = model.config
    tied = bool(cfg.tie_word_embeddings) or "lm_head.weight" not in flat
    weights, floats, differs = _float_stored(weights, flat)
    mapped, went = assign(weights, flat, tied) if weights.matrices or not floats else ({}, {})
    mapped.update(floats)
    went.update({n: n for n in floats})
    if tied and "lm_head.weight" in mapped:  # a quantized head on a tied model: write it untied
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        tied = False
    flat.update(mapped)
    if not tied and "lm_head.weight" not in flat:
        flat["lm_head.weight"] = flat["word_embeddings.weight"]
    if tied:
        flat.pop("lm_head.weight", None)
    stored = "float32" if _exact_float32(flat.values()) else "float64"
    like_name = like_path or ("in-memory minibloom.Bloom" if isinstance(like, Bloom) else os.fspath(like))
    if override is not None:
        weights = dataclasses.replace(weights, activations=override[0], group=override[1])
    note = {"engine": weights.engine, "activations": weights.activations, "group": weights.group,
            "compute": weights.compute,
            "source": f"in-memory {type(value).__module__}.{type(value).__name__}" if form == "torch" else
            os.path.abspath(os.fspath(value)),
            "like": os.path.abspath(like_name) if like_path else like_name, "stored": stored,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings), "tensors": went,
            "from_model": sorted(k for k in flat if k not in mapped), "notes": list(weights.notes),
            "differs_from_model": differs}
    _write(out, force, cfg, flat, stored, note, _tokenizer_dir(like_path))
    return out
