"""The fresh processes of ``minibloom.bench``: cold start to a first token, and a session's peak resident set.

Each measurement runs in a new Python, started as ``python <this file> cold|session ENGINE CHECKPOINT``
(``command``). The file is run by its path, not with ``-m minibloom.bench.children``: ``-m`` would import the
``minibloom`` package into the transformers process too, and its cold start would then include minibloom's own
imports. So this module imports nothing at its top but the standard library, each child imports only what its
engine needs (as a user's script would), and the script's directory, first on ``sys.path``, holds no module a child
imports. ``PYTHONPATH`` names the minibloom this file belongs to, so the child measures the same code as the parent.
Each child prints one line, ``TOKEN id`` or ``RSS a b``, which the parent reads.
"""

from __future__ import annotations

import os
import sys

PROMPT_IDS = (100, 116)  # the cold start's 16-token prompt: ids 100 .. 115


def command(kind: str, engine: str, path: str) -> tuple[list[str], dict]:
    """The command line and environment of the child ``kind`` ("cold" or "session") for ``engine``."""
    if kind not in CHILDREN or engine not in ("minibloom", "transformers"):
        raise ValueError(f"bench child: unknown {kind!r} / {engine!r}")
    return [sys.executable, os.path.abspath(__file__), kind, engine, path], environment()


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the directory above minibloom/


def environment() -> dict:
    """This process's environment with the minibloom this file belongs to first on ``PYTHONPATH``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def cold(engine: str, path: str) -> None:
    """Imports, load, one greedy token after a 16-token prompt; prints ``TOKEN id`` the moment it is known."""
    if engine == "minibloom":
        import minibloom
        import numpy as np

        m = minibloom.load(path, progress=False)
        ids = np.arange(*PROMPT_IDS)[None, :]
        print("TOKEN", int(m.generate(ids, max_new_tokens=1)[0, -1]), flush=True)
        return
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.arange(*PROMPT_IDS)[None, :]
    with torch.no_grad():
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=3)
    print("TOKEN", int(out[0, -1]), flush=True)


def session(engine: str, path: str) -> None:
    """A session's peak RSS: load, a 512-token prompt to its first token, batch-1 decoding (``RSS a``), then one
    512-token forward pass keeping all logits (``b``); prints ``RSS a b`` in bytes."""
    from minibloom.bench import LONG, NEW, PROMPT, MinibloomEngine, TransformersEngine, _ids, peak_rss

    eng = (MinibloomEngine if engine == "minibloom" else TransformersEngine)(path)
    eng.first_token(_ids(1, LONG, eng.vocab))
    eng.generate(_ids(1, PROMPT, eng.vocab), NEW)
    a = peak_rss()
    eng.forward_all(_ids(1, LONG, eng.vocab))
    b = peak_rss()
    print("RSS", a, b, flush=True)


CHILDREN = {"cold": cold, "session": session}


if __name__ == "__main__":
    kind, engine, path = sys.argv[1:4]
    CHILDREN[kind](engine, path)
