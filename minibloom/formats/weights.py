"""From checkpoint files to the nested parameter dict the forward pass reads.

Follows transformers' BLOOM key names (``modeling_bloom.py`` module tree) and its loading rules: keys with or without
the ``transformer.`` prefix (the original bigscience files have none, ``BloomForCausalLM.save_pretrained`` writes it),
``lm_head.weight`` optional and ignored while the head is tied, vocab size taken from the embedding's shape,
single ``model.safetensors`` or sharded ``model.safetensors.index.json``. No pickle is ever read.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import BloomConfig
from ..errors import MinibloomError
from ..jsonfile import read_json_object
from .safetensors import FLOAT_CODES, SafetensorsFile
from .widen import check_finite  # noqa: F401  (re-exported: the loaders' finite check)

LAYER_TENSORS = (  # per block, with HF names: (name, shape as a function of C)
    ("input_layernorm.weight", lambda C: (C,)),
    ("input_layernorm.bias", lambda C: (C,)),
    ("self_attention.query_key_value.weight", lambda C: (3 * C, C)),
    ("self_attention.query_key_value.bias", lambda C: (3 * C,)),
    ("self_attention.dense.weight", lambda C: (C, C)),
    ("self_attention.dense.bias", lambda C: (C,)),
    ("post_attention_layernorm.weight", lambda C: (C,)),
    ("post_attention_layernorm.bias", lambda C: (C,)),
    ("mlp.dense_h_to_4h.weight", lambda C: (4 * C, C)),
    ("mlp.dense_h_to_4h.bias", lambda C: (4 * C,)),
    ("mlp.dense_4h_to_h.weight", lambda C: (C, 4 * C)),
    ("mlp.dense_4h_to_h.bias", lambda C: (C,)),
)


@dataclass
class Loaded:
    """What every checkpoint reader returns: plain data, from which ``minibloom.bloom.load`` builds the model."""

    config: BloomConfig
    params: dict  # nested, transformers' names, on the backend, in the compute dtype (or lazily widened)
    tokenizer: Any  # minibloom.tokenizer.Tokenizer or None
    path: str


def expected_shapes(cfg: BloomConfig, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a BLOOM checkpoint must hold (bare HF names) and its shape."""
    C = cfg.hidden_size
    shapes = {
        "word_embeddings.weight": (vocab, C),
        "word_embeddings_layernorm.weight": (C,),
        "word_embeddings_layernorm.bias": (C,),
        "ln_f.weight": (C,),
        "ln_f.bias": (C,),
    }
    for i in range(cfg.n_layer):
        for name, shape in LAYER_TENSORS:
            shapes[f"h.{i}.{name}"] = shape(C)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, C)
    return shapes


def random_params(cfg: BloomConfig, vocab: int, rng: np.random.Generator, std: float = 0.02) -> dict:
    """A random BLOOM (nested params, float64) for experiments: every tensor N(0, std^2), LayerNorm weights 1 + that.

    ``minibloom.Bloom(cfg, random_params(cfg, V, rng), dtype="float64")`` is a model without any checkpoint file.
    """
    flat = {}
    for name, shape in expected_shapes(cfg, vocab).items():
        base = 1.0 if name.endswith("layernorm.weight") or name == "ln_f.weight" else 0.0
        flat[name] = base + std * rng.standard_normal(shape)
    return nest(flat)


def write_random_checkpoint(directory: str | os.PathLike, cfg: BloomConfig, vocab: int, dtype=np.float32,
                            seed: int = 0, chunk: int = 1 << 24, progress: bool = True) -> str:
    """``config.json`` + ``model.safetensors`` of a random BLOOM, drawn and written tensor by tensor in chunks (a
    bloom-7b1-shaped float16 file is ~14 GB: never held whole). Keys are transformers' saved names
    (``transformer.h.0...``), so transformers and minibloom both load it. Values are on a trained model's scale, so
    activations stay in range through every layer: matrices and biases N(0, 0.02), LayerNorm weights 1 + N(0, 0.1),
    LayerNorm biases N(0, 0.02). ``dtype``: a NumPy float dtype or "bfloat16". Returns the directory."""
    from .safetensors import f32_to_bf16, write_file

    bf16 = isinstance(dtype, str) and dtype == "bfloat16"
    dtype = np.dtype(np.uint16 if bf16 else dtype)
    code = "BF16" if bf16 else {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                                np.dtype(np.float64): "F64"}[dtype]
    rng = np.random.default_rng(seed)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    shapes = expected_shapes(cfg, vocab)

    def values(name: str, n: int) -> np.ndarray:
        x = rng.standard_normal(n, dtype=np.float32)
        norm = "layernorm" in name or name.startswith("ln_f")
        x *= 0.1 if norm and name.endswith("weight") else 0.02
        if norm and name.endswith("weight"):
            x += 1.0
        return f32_to_bf16(x) if bf16 else x.astype(dtype, copy=False)

    total = sum(int(np.prod(s)) for s in shapes.values()) * dtype.itemsize
    bar = _progress(total, f"writing {directory}", None if progress else False)

    def chunks(name: str, n: int):
        def gen():
            for start in range(0, n, chunk):
                data = values(name, min(chunk, n - start))
                bar.update(data.nbytes)
                yield data
        return gen

    entries = [(f"transformer.{name}", shape, code, chunks(name, int(np.prod(shape)))) for name, shape in
               shapes.items()]
    with bar:
        write_file(os.path.join(directory, "model.safetensors"), entries, {"format": "pt"})
    write_config(directory, cfg, vocab, "bfloat16" if bf16 else dtype.name)
    return directory


def write_config(directory: str, cfg: BloomConfig, vocab: int, dtype: str) -> None:
    """``config.json`` as transformers' ``save_pretrained`` writes it for ``BloomForCausalLM``."""
    hf = {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": vocab,
          "hidden_size": cfg.hidden_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
          "layer_norm_epsilon": cfg.layer_norm_epsilon, "initializer_range": 0.02,
          "apply_residual_connection_post_layernorm": cfg.apply_residual_connection_post_layernorm,
          "pretraining_tp": cfg.pretraining_tp, "slow_but_exact": cfg.slow_but_exact,
          "tie_word_embeddings": cfg.tie_word_embeddings,
          **{k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")},
          "use_cache": True, "dtype": dtype}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


STORED = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "bfloat16": None}


def write_checkpoint(directory: str | os.PathLike, cfg: BloomConfig, params: dict, dtype: str = "float32",
                     metadata: dict | None = None) -> str:
    """``config.json`` + ``model.safetensors`` of an in-memory BLOOM (the nested NumPy parameter tree), under
    transformers' saved names, stored in ``dtype`` (float16, bfloat16, float32, float64): a checkpoint both
    transformers' ``from_pretrained`` and ``minibloom.load`` read. A tied head is stored once, as transformers does.
    A checkpoint already in ``directory`` is replaced: its shard index and the shards it names are removed (an index
    left beside the new ``model.safetensors`` would win when loading). Returns the directory."""
    from .safetensors import save_file

    if not isinstance(dtype, str) or dtype not in STORED:
        raise MinibloomError(f"dtype: {dtype!r} cannot be stored (use one of {', '.join(STORED)})")
    directory = os.fspath(directory)
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise MinibloomError(f"{directory}: exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    remove_stale_shards(directory)
    flat = {k: np.asarray(v) for k, v in hf_names(params).items()}
    store = STORED[dtype]
    tensors = {k: v.astype(np.float32 if store is None else store) for k, v in flat.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), {"format": "pt", **(metadata or {})},
              bf16=tuple(tensors) if store is None else ())
    write_config(directory, cfg, int(flat["transformer.word_embeddings.weight"].shape[0]), dtype)
    return directory


def remove_stale_shards(directory: str) -> None:
    """Remove the sharded weights of an earlier checkpoint in ``directory``: ``model.safetensors.index.json``, the
    shards it names and any ``model-NNNNN-of-NNNNN.safetensors`` (a new single ``model.safetensors`` replaces them)."""
    import re

    index = os.path.join(directory, "model.safetensors.index.json")
    shards = set()
    if os.path.isfile(index):
        try:
            weight_map = read_json_object(index).get("weight_map")
        except MinibloomError:
            weight_map = None
        if isinstance(weight_map, dict):
            shards |= {v for v in weight_map.values() if isinstance(v, str) and os.path.basename(v) == v
                       and v.endswith(".safetensors") and v != "model.safetensors"}
    shards |= {n for n in os.listdir(directory) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)}
    for name in sorted(shards) + (["model.safetensors.index.json"] if os.path.lexists(index) else []):
        path = os.path.join(directory, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.remove(path)


def bare_name(key: str) -> str:
    """``transformer.h.0.mlp...`` -> ``h.0.mlp...`` (the bigscience files already use bare names)."""
    return key[len("transformer."):] if key.startswith("transformer.") else key


def nest(flat: dict) -> dict:
    """``{"h.0.mlp.dense_h_to_4h.weight": a, ...}`` -> ``{"h": [{"mlp": {"dense_h_to_4h": {"weight": a}}}], ...}``."""
    out: dict = {}
    layers: dict[int, dict] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        if parts[0] == "h":
            node = layers.setdefault(int(parts[1]), {})
            parts = parts[2:]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    out["h"] = [layers[i] for i in sorted(layers)]
    return out


def flatten(params: dict, prefix: str = "") -> dict:
    """Inverse of ``nest``: the parameter tree -> ``{"h.0.mlp.dense_h_to_4h.weight": a, ...}``."""
    out = {}
    for k, v in params.items():
        if k == "h":
            for i, layer in enumerate(v):
                out.update(flatten(layer, f"{prefix}h.{i}."))
        elif isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def hf_names(tree: dict) -> dict:
    """A parameter (or gradient) tree -> a flat dict under transformers' ``BloomForCausalLM.named_parameters()`` (and
    saved-file) names: ``transformer.h.0.self_attention.query_key_value.weight``, ..., ``lm_head.weight``."""
    return {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in flatten(tree).items()}


def tree_map(fn, tree):
    """``fn`` applied to every leaf of a parameter tree (dicts and lists kept as they are)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [tree_map(fn, v) for v in tree]
    return fn(tree)


def safetensors_files(directory: str) -> list[str]:
    """The weight files of a checkpoint directory: the shards of an index, or ``model.safetensors``."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MinibloomError(f"{index}: not a usable safetensors index (weight_map must map tensor names to "
                                 "file names)")
        if not weight_map:
            raise MinibloomError(f"{index}: weight_map is empty (it must name the shard of every tensor)")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            if os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                raise MinibloomError(f"{index}: shard {shard!r} is not a .safetensors file in this directory")
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise MinibloomError(f"{index}: shard {shard!r} is missing")
            files.append(path)
        return files
    if os.path.isfile(single):
        return [single]
    if any(os.path.isfile(os.path.join(directory, n)) for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise MinibloomError(f"{directory}: only pickled PyTorch weights (pytorch_model.bin) here; minibloom never "
                             "unpickles. Convert them once with transformers: "
                             "BloomForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)")
    raise MinibloomError(f"{directory}: no model.safetensors or model.safetensors.index.json")


class Checkpoint:
    """All tensors of a safetensors checkpoint under bare HF names, opened (memory-mapped) but not yet read."""

    def __init__(self, files: list[str]):
        self.files = [SafetensorsFile(f) for f in files]
        self.where: dict[str, tuple[SafetensorsFile, str]] = {}
        for sf in self.files:
            for key in sf.names:
                name = bare_name(key)
                if name in self.where:
                    raise MinibloomError(f"{sf.path}: tensor {key!r} also appears in {self.where[name][0].path}")
                self.where[name] = (sf, key)

    def info(self, name: str):
        sf, key = self.where[name]
        return sf.info(key)

    def get(self, name: str, dtype=None, checked: bool = False) -> np.ndarray:
        """Tensor ``name`` as ``dtype`` in fresh memory; ``checked``: verified finite (``check_finite``)."""
        sf, key = self.where[name]
        return sf.get(key, dtype, where=self.describe(name) if checked else None)

    def raw(self, name: str) -> np.ndarray:
        sf, key = self.where[name]
        return sf.raw(key)

    def release(self, name: str, lo: int = 0, hi: int | None = None) -> None:
        sf, key = self.where[name]
        sf.release(key, lo, hi)

    def advise(self, name: str, need: bool) -> None:
        sf, key = self.where[name]
        sf.advise(key, need)

    def describe(self, name: str) -> str:
        sf, key = self.where[name]
        return f"{sf.path}: tensor {key!r}"

    def close(self) -> None:
        for sf in self.files:
            sf.close()


def check_layer_count(cfg: BloomConfig, n_tensors: int, where: str) -> None:
    """Refuse a config whose ``n_layer`` the file cannot hold (each layer has ``len(LAYER_TENSORS)`` tensors) before
    a name is built for every layer: a forged ``n_layer`` of 10^9 would otherwise take minutes and gigabytes."""
    if cfg.n_layer * len(LAYER_TENSORS) > n_tensors:
        raise MinibloomError(f"{where}: the config says n_layer={cfg.n_layer}, but the file holds {n_tensors} tensors "
                             f"(a {cfg.n_layer}-layer BLOOM has {len(LAYER_TENSORS)} per layer)")


def check_names(present, want: dict, where: str, n_layer: int, allowed=frozenset()) -> None:
    """The one name check of every format: each tensor of ``want`` (the schema, ``expected_shapes``) is present, and
    nothing else is, apart from ``allowed`` names (an untied head, quantization state ...)."""
    missing = [n for n in want if n not in present]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MinibloomError(f"{where}: missing tensors {missing[:5]}{more} for a {n_layer}-layer config")
    extra = [n for n in present if n not in want and n not in allowed]
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise MinibloomError(f"{where}: unexpected tensors {extra[:5]}{more} (n_layer={n_layer} in config)")


def embedding_rows(ckpt: Checkpoint, cfg: BloomConfig, where: str) -> int:
    """The vocabulary size a checkpoint holds: rows of its [vocab, hidden_size] word embedding (at least one)."""
    if "word_embeddings.weight" not in ckpt.where:
        raise MinibloomError(f"{where}: missing tensor 'word_embeddings.weight' (is this a BLOOM checkpoint?)")
    emb = ckpt.info("word_embeddings.weight")
    if len(emb.shape) != 2 or emb.shape[1] != cfg.hidden_size or emb.shape[0] == 0:
        raise MinibloomError(f"{ckpt.describe('word_embeddings.weight')}: shape {list(emb.shape)} does not match "
                             f"[vocab, hidden_size={cfg.hidden_size}]")
    return int(emb.shape[0])


def check_tensors(ckpt: Checkpoint, cfg: BloomConfig, where: str) -> int:
    """Check names, dtypes and shapes against the config; return the vocab size (rows of the embedding)."""
    vocab = embedding_rows(ckpt, cfg, where)
    if vocab != cfg.vocab_size:
        warnings.warn(f"{where}: config vocab_size {cfg.vocab_size} but the embedding has {vocab} rows; using {vocab}",
                      stacklevel=3)
    check_layer_count(cfg, len(ckpt.where), where)
    want = expected_shapes(cfg, vocab)
    check_names(ckpt.where, want, where, cfg.n_layer, allowed={"lm_head.weight"})
    for name, shape in want.items():
        info = ckpt.info(name)
        if info.dtype not in FLOAT_CODES:
            raise MinibloomError(f"{ckpt.describe(name)}: dtype {info.dtype} is not a float type")
        if tuple(info.shape) != shape:
            raise MinibloomError(f"{ckpt.describe(name)}: shape {list(info.shape)}, expected {list(shape)} "
                                 "from the config")
    return vocab


READ_THREADS = 4  # at most this many tensors are read at once (see read_params)


def read_params(ckpt: Checkpoint, cfg: BloomConfig, dtype, progress=None) -> dict:
    """Read every tensor as ``dtype`` into fresh memory, nested under HF names.

    Tensors are read on up to ``READ_THREADS`` threads (no more than the CPUs): most of the time of a read from the
    page cache goes to the kernel mapping fresh pages and copying into them, which runs in parallel (``os.preadv``
    releases the GIL), so the reads of several tensors overlap.
    """
    vocab = check_tensors(ckpt, cfg, ckpt.files[0].path)
    names = list(expected_shapes(cfg, vocab))
    total = sum(ckpt.info(n).nbytes for n in names)
    bar = _progress(total, "loading weights", progress)

    def read(name: str) -> np.ndarray:
        return ckpt.get(name, dtype, checked=True)

    workers = min(READ_THREADS, os.cpu_count() or 1) if hasattr(os, "preadv") else 1  # seek + read is not shareable
    flat = {}
    with ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        for name, arr in zip(names, pool.map(read, names) if pool else map(read, names)):
            flat[name] = arr
            bar.update(ckpt.info(name).nbytes)
    bar.close()
    return nest(flat)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total_bytes: int, desc: str, progress):
    """A tqdm byte bar for big jobs when stderr is a terminal (``progress=True`` forces it, ``False`` hides it)."""
    if progress is False or (progress is None and total_bytes < 256 * 2**20):
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if progress is None else False, leave=False)
