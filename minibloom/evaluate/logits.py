"""Logits files: the candidate of ``minibloom.evaluate.kl`` computed by an external engine (llama.cpp, ONNX Runtime,
...) for the same windows, and what ``kl(..., save_logits_to=PATH)`` writes for the reference. A ``.npy`` array, or a
``.npz`` with ``logits`` (and optionally ``input_ids`` and ``windows`` to check against):

    logits     float16/32/64 [tokens, V]  row i: the logits that predict the i-th scored token, in window order
    input_ids  int [N]                    the tokenized text
    windows    int [W, 3]                 (begin, end, first) of each window: it runs on input_ids[begin:end] and
                                          scores input_ids[first:end] with its logits at rows first-begin-1 ...
                                          end-begin-2 (0-based within the window)

Files are untrusted: never unpickled, ``.npz`` members bounded before they are read (``minibloom.oracle.trace``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..errors import MinibloomError
from ..oracle.trace import read_npz
from .windowing import Window

LOGITS_SUFFIXES = (".npy", ".npz")


def is_logits_file(candidate) -> bool:
    """Whether ``kl``'s candidate names a logits file (a path ending in .npy or .npz) rather than a model."""
    return isinstance(candidate, (str, os.PathLike)) and os.fspath(candidate).lower().endswith(LOGITS_SUFFIXES)


def read_logits(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(logits [tokens, V], input_ids or None, windows [W, 3] or None) from a ``.npy`` / ``.npz`` logits file (never
    pickles; a ``.npy`` is memory-mapped)."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise MinibloomError(f"logits file: expected a path to a .npy or .npz file, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MinibloomError(f"{path}: no such logits file (or not a regular file)")
    if path.lower().endswith(".npy"):
        try:
            logits, ids, ws = np.load(path, mmap_mode="r", allow_pickle=False), None, None
        except (OSError, ValueError, EOFError) as e:
            raise MinibloomError(f"{path}: not a readable .npy/.npz logits file ({e})") from None
    else:  # one reader for untrusted .npz files: sizes bounded before allocating (minibloom.oracle.trace.read_npz)
        z = read_npz(path, "logits file", ("logits", "input_ids", "windows"))
        if "logits" not in z:
            raise MinibloomError(f"{path}: no 'logits' array in it")
        logits, ids, ws = z["logits"], z.get("input_ids"), z.get("windows")
        for name, a in (("input_ids", ids), ("windows", ws)):
            if a is not None and a.dtype.kind not in "iu":
                raise MinibloomError(f"{path}: {name} must be integers, got {a.dtype}")
    if logits.ndim != 2 or logits.dtype.kind != "f":
        raise MinibloomError(f"{path}: logits must be a float array [tokens, V], got shape {logits.shape} and dtype "
                             f"{logits.dtype}")
    return logits, ids, ws


def save_logits(path: str | os.PathLike, logits: np.ndarray, input_ids: np.ndarray, ws: Sequence[Window]) -> None:
    """Write a ``.npz`` logits file (the format ``kl`` reads as a candidate)."""
    check_save_path(path)
    path = os.fspath(path)
    table = np.array([(w.begin, w.end, w.first) for w in ws], np.int64).reshape(-1, 3)
    np.savez(path, logits=logits, input_ids=np.asarray(input_ids, np.int64), windows=table)


def check_logits_file(path: str, logits, file_ids, file_ws, ids: np.ndarray, ws: list[Window], vocab: int) -> None:
    """A logits file read by ``read_logits`` fits this text's ``ids``, windows ``ws`` and the reference's ``vocab``."""
    scored = sum(w.scored for w in ws)
    if file_ids is not None and not np.array_equal(np.asarray(file_ids), ids):
        raise MinibloomError(f"{path}: its input_ids are not the text's tokens ({len(file_ids)} ids there, {len(ids)} "
                             "here): tokenize the same text with the same tokenizer")
    table = np.array([(w.begin, w.end, w.first) for w in ws], np.int64).reshape(-1, 3)
    if file_ws is not None and not np.array_equal(np.asarray(file_ws), table):
        raise MinibloomError(f"{path}: its windows are not these ({len(file_ws)} there, {len(ws)} here): use the "
                             "context and stride it was made with")
    if logits.shape[0] != scored:
        raise MinibloomError(f"{path}: {logits.shape[0]} rows of logits, but these windows score {scored} tokens "
                             "(one row per scored token, in window order)")
    if logits.shape[1] != vocab:
        raise MinibloomError(f"{path}: logits over {logits.shape[1]} ids, but the reference's vocab has {vocab}")


def check_save_path(path) -> None:
    """Where ``save_logits_to`` writes: a ``.npz`` name in an existing directory, checked before any work."""
    if not isinstance(path, (str, os.PathLike)):
        raise MinibloomError(f"save_logits: expected a path ending in .npz, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str) or not path.lower().endswith(".npz"):
        raise MinibloomError(f"save_logits: {path}: the file name must end in .npz")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise MinibloomError(f"save_logits: {path}: is a directory")
    if not os.path.isdir(parent):
        raise MinibloomError(f"save_logits: {path}: the directory {parent} does not exist")
