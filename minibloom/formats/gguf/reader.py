"""Reading llama.cpp BLOOM GGUF files into minibloom's plain data (config, parameters under HF names, tokenizer).

Follows llama.cpp's ``src/llama-model.cpp`` (ALiBi max_bias 8, ``output.weight`` optional and tied to ``token_embd``
when absent); the container format is ggml's ``docs/gguf.md``. Files are parsed with the ``gguf`` package
(``GGUFReader``) and every tensor is dequantized by its own ggml type (one file mixes F32 norms, Q6_K output, Q4_K
blocks ...), never by ``general.file_type``.
"""

from __future__ import annotations

import os
import struct
import warnings

import numpy as np

from ...backend import Backend
from ...config import DTYPES, BloomConfig
from ...errors import MinibloomError
from ..weights import Loaded, _progress, check_layer_count, check_names, expected_shapes, nest, tree_map
from .names import ARCH, gguf_to_hf_name, hf_to_gguf_name, qkv_from_gguf
from .quants import LazyLayer, QuantizedWeight, dequantize
from .vocab import tokenizer_from_gguf, wrap_tokenizer


def open_reader(path: str):
    """``gguf.GGUFReader`` on ``path``; a file it cannot parse becomes a MinibloomError naming the bad part."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MinibloomError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise MinibloomError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, OverflowError, struct.error, TypeError) as e:
        problem = _diagnose(path)
        raise MinibloomError(f"{path}: {problem or f'corrupt GGUF file ({e})'}") from None


def _diagnose(path: str) -> str | None:
    """Walk the GGUF header by hand (docs/gguf.md) to say which tensor is bad when GGUFReader gives up."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        buf = f.read(min(size, 512 * 2**20))
    pos = 0

    def take(fmt):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(buf):
            raise EOFError
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += n
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("Q")
        if pos + n > len(buf):
            raise EOFError
        s = buf[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t in scalar:
            return take(scalar[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            if et in scalar and et != 8:
                nonlocal pos
                pos += n * struct.calcsize(scalar[et])
                if pos > len(buf):
                    raise EOFError
                return None
            return [value(et) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {t}")

    try:
        take("I")
        version = take("I")
        if version not in (2, 3):
            return f"GGUF version {version} is not supported (2 or 3)"
        n_tensors, n_kv = take("Q"), take("Q")
        alignment = 32
        for _ in range(n_kv):
            key = string()
            v = value(take("I"))
            if key == "general.alignment" and isinstance(v, int):
                alignment = v
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("I")
            dims = [take("Q") for _ in range(n_dims)]
            infos.append((name, dims, take("I"), take("Q")))
    except EOFError:
        return "truncated GGUF header"
    except (ValueError, UnicodeDecodeError) as e:
        return f"corrupt GGUF header ({e})"
    data_start = (pos + alignment - 1) // alignment * alignment
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            return f"tensor {name!r}: unknown ggml type id {type_id}"
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % block:
            return f"tensor {name!r}: row length {dims[0]} is not a multiple of the {qtype.name} block size {block}"
        end = data_start + offset + n // block * type_size
        if end > size:
            return f"tensor {name!r}: data ends at byte {end} but the file has {size} bytes (truncated file?)"
    return None


def metadata(reader) -> dict:
    """All metadata as Python values (strings, numbers, lists)."""
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            out[name] = None
    return out


def _need(meta: dict, key: str, path: str, kind=int):
    v = meta.get(key)
    if v is None:
        raise MinibloomError(f"{path}: metadata {key!r} is missing")
    if kind is int and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0):
        raise MinibloomError(f"{path}: metadata {key!r} must be a positive integer, got {v!r}")
    return kind(v)


def config_from_gguf(meta: dict, vocab: int, has_output: bool, path: str) -> BloomConfig:
    """The ``bloom.*`` hyper-parameters -> BloomConfig (``context_length`` is ignored: ALiBi has no limit)."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise MinibloomError(f"{path}: general.architecture is {arch!r}, minibloom reads only 'bloom' GGUF files")
    C = _need(meta, "bloom.embedding_length", path)
    H = _need(meta, "bloom.attention.head_count", path)
    ff = meta.get("bloom.feed_forward_length", 4 * C)
    if ff != 4 * C:
        raise MinibloomError(f"{path}: bloom.feed_forward_length {ff} is not 4 x embedding_length ({4 * C})")
    kv = meta.get("bloom.attention.head_count_kv", H)
    if kv != H:
        raise MinibloomError(f"{path}: bloom.attention.head_count_kv {kv} != head_count {H} (BLOOM has no GQA)")
    eps = meta.get("bloom.attention.layer_norm_epsilon", 1e-5)
    # stored as float32: 1e-5 reads back as 9.99999974e-06; its shortest float32 spelling is the number HF used
    eps = float(str(np.float32(eps)))
    ids = {}
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        v = meta.get(f"tokenizer.ggml.{theirs}")
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            ids[ours] = int(v)
    cfg = BloomConfig(vocab_size=vocab, hidden_size=C, n_layer=_need(meta, "bloom.block_count", path), n_head=H,
                      layer_norm_epsilon=eps, tie_word_embeddings=not has_output, name_or_path=path,
                      **ids)
    cfg.validate(path)
    return cfg


def _expected(cfg: BloomConfig, vocab: int, has_output: bool) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor a BLOOM file must hold and its NumPy shape: the one schema (``expected_shapes``) under
    llama.cpp's names (``output.weight`` only for an untied head)."""
    if cfg.tie_word_embeddings == has_output:
        cfg = BloomConfig(**{**cfg.to_dict(), "tie_word_embeddings": not has_output})
    return {hf_to_gguf_name(name): shape for name, shape in expected_shapes(cfg, vocab).items()}


_DEQUANT_OK: dict = {}


def _can_dequantize(qtype) -> bool:
    """Whether gguf.quants knows ``qtype`` (tried once on one zero block)."""
    if qtype not in _DEQUANT_OK:
        from gguf import GGML_QUANT_SIZES, quants
        from gguf import GGMLQuantizationType as T

        size = GGML_QUANT_SIZES[qtype][1]
        if qtype in (T.F32, T.F16, T.F64):
            _DEQUANT_OK[qtype] = True
        else:
            try:
                quants.dequantize(np.zeros((1, size), np.uint8), qtype)
                _DEQUANT_OK[qtype] = True
            except (NotImplementedError, ValueError, AssertionError):
                _DEQUANT_OK[qtype] = False
    return _DEQUANT_OK[qtype]


def _check_tensors(reader, cfg: BloomConfig, vocab: int, has_output: bool, path: str) -> dict:
    """Names, shapes, types and byte ranges of every tensor; returns {gguf name: ReaderTensor}."""
    tensors = {t.name: t for t in reader.tensors}
    check_layer_count(cfg, len(tensors), path)
    want = _expected(cfg, vocab, has_output)
    check_names(tensors, want, path, cfg.n_layer)
    size = os.path.getsize(path)
    for name, shape in want.items():
        t = tensors[name]
        got = tuple(int(d) for d in reversed(t.shape.tolist()))
        if got != shape:
            raise MinibloomError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
        if not _can_dequantize(t.tensor_type):
            raise MinibloomError(f"{path}: tensor {name!r} has ggml type {t.tensor_type.name}, "
                                 "which minibloom cannot dequantize")
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise MinibloomError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
    return tensors


def _dense(t, cfg: BloomConfig, dtype, path: str) -> np.ndarray:
    """One tensor as a float array under HF layout (QKV regrouping undone)."""
    w = dequantize(t.data, t.tensor_type, f"{path}: tensor {t.name!r}")
    if ".attn_qkv." in t.name:
        w = qkv_from_gguf(w, cfg.n_head)
    if not np.all(np.isfinite(w)):
        raise MinibloomError(f"{path}: tensor {t.name!r} holds NaN or inf after dequantization")
    return w.astype(dtype, copy=False)


def read_gguf(path: str, dtype=np.float32, keep_quantized: bool = False, progress=None):
    """Parse a BLOOM GGUF file: (config, nested params under HF names, metadata dict).

    With ``keep_quantized``, the 2-D layer weights that are not F32 (Q8_0, Q4_K ..., and F16/BF16 too) stay as
    stored (``QuantizedWeight`` views of the mapped file) and ``params["h"][i]`` become ``LazyLayer`` objects.
    """
    from gguf import GGMLQuantizationType as T

    path = os.fspath(path)
    reader = open_reader(path)
    if getattr(reader, "byte_order", "I") == "S":
        raise MinibloomError(f"{path}: big-endian GGUF files are not supported")
    meta = metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if meta.get("general.architecture") != ARCH:
        raise MinibloomError(f"{path}: general.architecture is {meta.get('general.architecture')!r}, "
                             "minibloom reads only 'bloom' GGUF files")
    if "token_embd.weight" not in tensors:
        raise MinibloomError(f"{path}: missing tensor 'token_embd.weight' (is this a BLOOM GGUF?)")
    emb = tensors["token_embd.weight"]
    vocab = int(emb.shape[1]) if len(emb.shape) == 2 else 0
    has_output = "output.weight" in tensors
    cfg = config_from_gguf(meta, vocab, has_output, path)
    tensors = _check_tensors(reader, cfg, vocab, has_output, path)
    n_tokens = len(meta.get("tokenizer.ggml.tokens") or [])
    if n_tokens and n_tokens != vocab:
        warnings.warn(f"{path}: {n_tokens} tokens in the metadata but token_embd has {vocab} rows", stacklevel=3)

    if has_output and t_equal(tensors["output.weight"], tensors["token_embd.weight"]):
        del tensors["output.weight"]  # the old converters' copy of the embedding: tie instead of a second copy
        cfg = BloomConfig(**{**cfg.to_dict(), "tie_word_embeddings": True})

    flat = {}
    bar = _progress(sum(int(t.n_bytes) for t in tensors.values()), "dequantizing GGUF", progress)
    for name, t in tensors.items():
        hf = gguf_to_hf_name(name)
        lazy = keep_quantized and hf.startswith("h.") and len(t.data.shape) == 2 and t.tensor_type != T.F32
        if lazy:
            post = (lambda w, n=cfg.n_head: qkv_from_gguf(w, n)) if ".attn_qkv." in name else None
            flat[hf] = QuantizedWeight(t.data, t.tensor_type, tuple(reversed(t.shape.tolist())),
                                       f"{path}: tensor {name!r}", post)
        else:
            flat[hf] = _dense(t, cfg, dtype, path)
        bar.update(int(t.n_bytes))
    bar.close()
    params = nest(flat)
    return cfg, params, meta


def t_equal(a, b) -> bool:
    """Same ggml type, shape and bytes."""
    return a.tensor_type == b.tensor_type and a.data.shape == b.data.shape and bool(np.array_equal(a.data, b.data))


def read_gguf_checkpoint(path, dtype: str = "float32", backend: Backend | None = None, progress=None,
                         keep_quantized: bool = False) -> Loaded:
    """Config, parameters and tokenizer (rebuilt from the metadata) of a llama.cpp BLOOM GGUF file.

    ``keep_quantized``: keep quantized layer weights (e.g. Q8_0) as their blocks and dequantize one sub-module at a
    time while the layer runs (the embedding, LayerNorms and biases stay float).
    """
    backend = backend or Backend("numpy")
    np_dtype = DTYPES[dtype]
    cfg, params, meta = read_gguf(path, np_dtype, keep_quantized=keep_quantized, progress=progress)
    if keep_quantized:
        params["h"] = [LazyLayer(layer, np_dtype, backend.asarray) for layer in params["h"]]
    if backend.name != "numpy":
        params = {k: v if k == "h" and keep_quantized else tree_map(backend.asarray, v) for k, v in params.items()}
    tok = tokenizer_from_gguf(meta, os.fspath(path))
    return Loaded(cfg, params, wrap_tokenizer(tok, meta, os.fspath(path)), os.fspath(path))
