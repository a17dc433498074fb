"""Random BLOOM checkpoints of the released shapes for the benchmarks, built once and reused.

The writer is ``minibloom.formats.weights.write_random_checkpoint`` (tensor by tensor, never a second copy in RAM: a
bloom-7b1-shaped float16 file is ~14 GB); this module only names the shapes.
"""

from __future__ import annotations

import os

import numpy as np

from minibloom.config import BloomConfig
from minibloom.formats.weights import write_random_checkpoint

SHAPES = {  # name: (hidden_size, n_layer, n_head), vocab 250880 for all released models
    "bloom-560m": (1024, 24, 16),
    "bloom-1b1": (1536, 24, 16),
    "bloom-7b1": (4096, 30, 32),
    "tiny": (256, 2, 4),  # for smoke-testing the scripts
}
VOCAB = 250880


def write_checkpoint(directory: str, hidden: int, n_layer: int, n_head: int, dtype=np.float32, vocab: int = VOCAB,
                     seed: int = 0, chunk: int = 1 << 24, progress: bool = True) -> str:
    """``config.json`` + ``model.safetensors`` of a random BLOOM of this shape in ``directory``."""
    cfg = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=n_layer, n_head=n_head)
    return write_random_checkpoint(directory, cfg, vocab, dtype, seed=seed, chunk=chunk, progress=progress)


def ensure_checkpoint(directory: str, shape: str = "bloom-560m", dtype=np.float32, seed: int = 0) -> str:
    """Build the checkpoint once; reuse it when ``directory`` already holds a complete one."""
    if os.path.isfile(os.path.join(directory, "config.json")) and os.path.isfile(
            os.path.join(directory, "model.safetensors")):
        return directory
    hidden, n_layer, n_head = SHAPES[shape]
    return write_checkpoint(directory, hidden, n_layer, n_head, dtype=dtype, seed=seed)
