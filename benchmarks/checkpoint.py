"""Random BLOOM checkpoints of the released shapes, written tensor by tensor (no transformers, no second copy in RAM).

A bloom-560m-shaped float32 file is 2.24 GB and a bloom-7b1-shaped float16 one ~14 GB: too big to build with
transformers on a 24 GB machine (it would hold the model in float32 first) and too big for
``minibloom.safetensors.save_file`` (which joins every tensor's bytes in memory). So the header is computed from the
shapes alone and each tensor is drawn and written in chunks. The files use transformers' key names
(``transformer.h.0...``), so both transformers and minibloom load them.

Values: matrices and biases N(0, 0.02), LayerNorm weights 1 + N(0, 0.1) and biases N(0, 0.02): the scale of a
trained BLOOM, so activations stay in range through all layers.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

SHAPES = {  # name: (hidden_size, n_layer, n_head), vocab 250880 for all released models
    "bloom-560m": (1024, 24, 16),
    "bloom-1b1": (1536, 24, 16),
    "bloom-7b1": (4096, 30, 32),
    "tiny": (256, 2, 4),  # for smoke-testing the scripts
}
VOCAB = 250880
_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}


def tensor_shapes(hidden: int, n_layer: int, vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    """Every tensor of a tied-head BLOOM checkpoint under transformers' saved names, in file order."""
    C = hidden
    out = {"transformer.word_embeddings.weight": (vocab, C),
           "transformer.word_embeddings_layernorm.weight": (C,),
           "transformer.word_embeddings_layernorm.bias": (C,)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        out.update({
            p + "input_layernorm.weight": (C,), p + "input_layernorm.bias": (C,),
            p + "self_attention.query_key_value.weight": (3 * C, C), p + "self_attention.query_key_value.bias": (3 * C,),
            p + "self_attention.dense.weight": (C, C), p + "self_attention.dense.bias": (C,),
            p + "post_attention_layernorm.weight": (C,), p + "post_attention_layernorm.bias": (C,),
            p + "mlp.dense_h_to_4h.weight": (4 * C, C), p + "mlp.dense_h_to_4h.bias": (4 * C,),
            p + "mlp.dense_4h_to_h.weight": (C, 4 * C), p + "mlp.dense_4h_to_h.bias": (C,),
        })
    out["transformer.ln_f.weight"] = (C,)
    out["transformer.ln_f.bias"] = (C,)
    return out


def config_dict(hidden: int, n_layer: int, n_head: int, vocab: int = VOCAB, dtype: str = "float32") -> dict:
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": vocab, "hidden_size": hidden,
        "n_layer": n_layer, "n_head": n_head, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "apply_residual_connection_post_layernorm": False, "pretraining_tp": 1, "slow_but_exact": False,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "unk_token_id": 0,
        "use_cache": True, "dtype": dtype,
    }


def _values(rng: np.random.Generator, name: str, n: int, dtype) -> np.ndarray:
    x = rng.standard_normal(n, dtype=np.float32)
    if "layernorm" in name or "ln_f" in name:
        x *= 0.1 if name.endswith("weight") else 0.02
        if name.endswith("weight"):
            x += 1.0
    else:
        x *= 0.02
    return x.astype(dtype, copy=False)


def write_checkpoint(directory: str, hidden: int, n_layer: int, n_head: int, dtype=np.float32, vocab: int = VOCAB,
                     seed: int = 0, chunk: int = 1 << 24, progress: bool = True) -> str:
    """Write ``config.json`` + ``model.safetensors`` of a random BLOOM into ``directory``; return the directory."""
    dtype = np.dtype(dtype)
    os.makedirs(directory, exist_ok=True)
    shapes = tensor_shapes(hidden, n_layer, vocab)
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(seed)
    path = os.path.join(directory, "model.safetensors")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=pos, unit="B", unit_scale=True, desc=f"writing {path}", leave=False)
    with open(path + ".part", "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, shape in shapes.items():
            total = int(np.prod(shape))
            for start in range(0, total, chunk):
                data = _values(rng, name, min(chunk, total - start), dtype)
                f.write(data.tobytes())
                if bar:
                    bar.update(data.nbytes)
    os.replace(path + ".part", path)
    if bar:
        bar.close()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_dict(hidden, n_layer, n_head, vocab, dtype.name), f, indent=2)
    return directory


def ensure_checkpoint(directory: str, shape: str = "bloom-560m", dtype=np.float32, seed: int = 0) -> str:
    """Build the checkpoint once; reuse it when ``directory`` already holds a complete one."""
    if os.path.isfile(os.path.join(directory, "config.json")) and os.path.isfile(
            os.path.join(directory, "model.safetensors")):
        return directory
    hidden, n_layer, n_head = SHAPES[shape]
    return write_checkpoint(directory, hidden, n_layer, n_head, dtype=dtype, seed=seed)
