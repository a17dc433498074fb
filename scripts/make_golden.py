"""Regenerate the golden files in tests/golden/ (development script: needs torch and transformers).

    python scripts/make_golden.py            # the tiny random checkpoint and, if weights/default exists, the default
    python scripts/make_golden.py --only tiny

What it writes, each trace in the minibloom.trace .npz format:
- ``tests/golden/tiny/``: a tiny BLOOM checkpoint (config.json + float32 model.safetensors) built with transformers,
  every parameter randomized (``minibloom.oracle.hf.random_model``), 6 heads so the extra-slope ALiBi rule is covered;
- ``tests/golden/tiny.trace.npz``: its input ids (two rows, the second left-padded), float64 hidden states, attention
  probabilities and logits;
- ``tests/golden/default.trace.npz``: the same for the shipped default model (weights/default), from a line of the
  training corpus.

The expected values come from **transformers** in float64 with its float32 softmax and ALiBi slopes patched to float64
(``minibloom.oracle.hf_float64_exact``), never from minibloom, so tests/test_golden.py is not self-referential.
Each trace's meta records the sha256 of the weights it was made from, so a retrained default model is detected.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
TINY = dict(vocab=128, hidden=24, n_layer=2, n_head=6)
DEFAULT_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."


def weights_sha256(directory: str) -> str:
    """sha256 over the checkpoint's .safetensors files, in name order."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def golden_trace(directory: str, ids, mask, out: str, attentions: bool) -> None:
    from minibloom.oracle import hf_trace
    from minibloom.trace import save_trace

    tr = hf_trace(directory, ids, mask, dtype="float64", attentions=attentions)
    tr["meta"].update(model=os.path.relpath(directory, ROOT), weights_sha256=weights_sha256(directory),
                      generator="scripts/make_golden.py")
    save_trace(tr, out)
    print(f"wrote {os.path.relpath(out, ROOT)} ({os.path.getsize(out) / 1024:.0f} KiB)")


def make_tiny() -> None:
    from minibloom.oracle.hf import random_model

    directory = os.path.join(GOLDEN, "tiny")
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))
    random_model(seed=2026, **TINY).save_pretrained(directory)
    for extra in ("generation_config.json",):  # not needed to load; keep the golden set minimal
        p = os.path.join(directory, extra)
        if os.path.exists(p):
            os.remove(p)
    rng = np.random.default_rng(2026)
    ids = rng.integers(0, TINY["vocab"], (2, 8), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 3  # BLOOM's <pad>
    golden_trace(directory, ids, mask, os.path.join(GOLDEN, "tiny.trace.npz"), attentions=True)


def make_default() -> bool:
    from minibloom.formats.loading import default_model_path
    from minibloom.tokenizer import load_tokenizer

    directory = default_model_path()
    if not os.path.isfile(os.path.join(directory, "config.json")):
        print(f"skipped the default model: {directory} has no checkpoint yet (train it with "
              "`minibloom train` (the command is in weights/default/README.md), then rerun this script)")
        return False
    tok = load_tokenizer(directory)
    if tok is None:
        ids = np.arange(1, 17, dtype=np.int64)[None]
    else:
        enc = tok.encode(DEFAULT_TEXT)
        ids = np.asarray(getattr(enc, "ids", enc), np.int64)[None, :16]
    golden_trace(directory, ids, np.ones_like(ids), os.path.join(GOLDEN, "default.trace.npz"), attentions=False)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("tiny", "default"), help="regenerate one golden set only")
    args = ap.parse_args(argv)
    os.makedirs(GOLDEN, exist_ok=True)
    if args.only in (None, "tiny"):
        make_tiny()
    if args.only in (None, "default"):
        make_default()
    return 0


if __name__ == "__main__":
    sys.exit(main())
