"""Reading llama.cpp BLOOM GGUF files into minibloom's plain data (config, parameters under HF names, tokenizer).

Follows llama.cpp's ``src/llama-model.cpp`` (ALiBi max_bias 8, ``output.weight`` optional and tied to ``token_embd``
when absent); the container format is ggml's ``docs/gguf.md``. Files are parsed with the ``gguf`` package
(``GGUFReader``) and every tensor is dequantized by its own ggml type (one file mixes F32 norms, Q6_K output, Q4_K
blocks ...), never by ``general.file_type``.
"""

from __future__ import annotations

import math
import os
import struct
import warnings

import numpy as np

from ...backend import Backend
from ...config import DTYPES, BloomConfig
from ...errors import MinibloomError, shown
from ..weights import Loaded, _progress, check_layer_count, check_names, expected_shapes, nest, tree_map
from .names import ARCH, gguf_to_hf_name, hf_to_gguf_name, qkv_from_gguf
from .quants import LazyLayer, QuantizedWeight, dequantize
from .vocab import _list_of, tokenizer_from_gguf, wrap_tokenizer


MAX_ARRAY_DEPTH = 4  # GGUF metadata arrays of arrays; llama.cpp's own files nest one level at most
MAX_DIMS = 4  # GGML_MAX_DIMS
PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)  # what a failing parser may still raise


def open_reader(path: str):
    """``gguf.GGUFReader`` on ``path``, after ``prescan`` has walked the header within bounds; anything the reader
    still raises (Python errors, or a panic of a Rust extension, a BaseException) becomes a MinibloomError."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MinibloomError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
    prescan(path)
    try:
        return GGUFReader(path, "r")
    except PASS_THROUGH:
        raise
    except BaseException as e:  # noqa: BLE001 - the reader of an untrusted file: any failure is the file's
        raise MinibloomError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None


class _Header:
    """A bounds-checked cursor over the mapped file (docs/gguf.md little-endian layout)."""

    SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str):
        raise MinibloomError(f"{self.path}: {what}")

    def take(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        if self.pos + n > len(self.buf):
            self.fail("truncated GGUF header")
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.take("Q")
        if n > len(self.buf) - self.pos:
            self.fail(f"{what}: string of {n} bytes runs past the end of the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what}: string is not UTF-8")

    def value(self, t: int, key: str, depth: int = 0):
        """Skip (or, for short scalars and strings, return) one metadata value of type ``t``."""
        if t in self.SCALARS:
            return self.take(self.SCALARS[t])
        if t == 8:
            return self.string(f"metadata {key!r}")
        if t != 9:
            self.fail(f"metadata {key!r}: unknown value type {t}")
        if depth >= MAX_ARRAY_DEPTH:
            self.fail(f"metadata {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
        et, n = self.take("I"), self.take("Q")
        least = struct.calcsize("<" + self.SCALARS[et]) if et in self.SCALARS else 8 if et == 8 else 12
        if et not in self.SCALARS and et not in (8, 9):
            self.fail(f"metadata {key!r}: unknown array element type {et}")
        if n * least > len(self.buf) - self.pos:
            self.fail(f"metadata {key!r}: an array of {n} elements cannot fit in the rest of the file")
        if et in self.SCALARS:
            self.pos += n * least
            return None
        for _ in range(n):
            self.value(et, key, depth + 1)
        return None


def prescan(path: str) -> None:
    """Walk the GGUF header (docs/gguf.md) with every count, length and offset checked against the bytes present,
    before any parser trusts them: nesting depth, array lengths, ``general.alignment``, tensor dims and types, and
    each tensor's data range (without integer wrap-around)."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 4 or f.read(4) != b"GGUF":
            f.seek(0)
            raise MinibloomError(f"{path}: not a GGUF file (magic {f.read(4)!r}, expected b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _Header(buf, path)
            h.pos = 4
            version = h.take("I")
            if version not in (2, 3):
                h.fail(f"GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = h.take("Q"), h.take("Q")
            if n_kv * 12 > size or n_tensors * 24 > size:
                h.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file holds")
            alignment = 32
            for _ in range(n_kv):
                key = h.string("metadata key")
                v = h.value(h.take("I"), key)
                if key == "general.alignment":
                    if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v & (v - 1):
                        h.fail(f"metadata 'general.alignment' must be a positive power of two, got {v!r}")
                    alignment = v
            infos = []
            for _ in range(n_tensors):
                name = h.string("tensor name")
                n_dims = h.take("I")
                if not 1 <= n_dims <= MAX_DIMS:  # ggml has at most 4; every BLOOM tensor has at least 1
                    h.fail(f"tensor {name!r}: {n_dims} dimensions (expected 1 to {MAX_DIMS})")
                dims = [h.take("Q") for _ in range(n_dims)]
                infos.append((name, dims, h.take("I"), h.take("Q")))
            data_start = (h.pos + alignment - 1) // alignment * alignment
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise MinibloomError(f"{path}: tensor {name!r}: unknown ggml type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = math.prod(dims) if dims else 1
        if dims and dims[0] % block:
            raise MinibloomError(f"{path}: tensor {name!r}: row length {dims[0]} is not a multiple of the "
                                 f"{qtype.name} block size {block}")
        end = data_start + offset + n // block * type_size  # Python integers: no wrap-around
        if offset % alignment or end > size:
            raise MinibloomError(f"{path}: tensor {name!r}: data at offset {offset} ({n // block * type_size} "
                                 f"bytes) lies outside the {size}-byte file or off its {alignment}-byte alignment "
                                 "(truncated or forged file?)")


# the vocabulary's list-valued keys and the type of their items: checked as metadata is read, so that every reader
# of the metadata (the loader, `minibloom info`) sees a list of the right items or gets a MinibloomError
LIST_METADATA = {"tokenizer.ggml.tokens": str, "tokenizer.ggml.merges": str, "tokenizer.ggml.token_type": int}


def metadata(reader, path: str | None = None) -> dict:
    """All metadata as Python values (strings, numbers, lists); the vocabulary lists are type-checked."""
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except PASS_THROUGH:
            raise
        except BaseException:  # noqa: BLE001 - an unreadable field reads as absent; the keys we need are checked
            out[name] = None
    where = path or str(getattr(getattr(reader, "data", None), "filename", None) or "gguf")
    for key, kind in LIST_METADATA.items():
        _list_of(out, key, kind, where)
    return out


def _need(meta: dict, key: str, path: str, default=None) -> int:
    """Metadata ``key`` as a positive int (``default`` when absent, if given)."""
    v = meta.get(key, default)
    if v is None:
        raise MinibloomError(f"{path}: metadata {key!r} is missing")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise MinibloomError(f"{path}: metadata {key!r} must be a positive integer, got {shown(v)}")
    return int(v)


def config_from_gguf(meta: dict, vocab: int, has_output: bool, path: str) -> BloomConfig:
    """The ``bloom.*`` hyper-parameters -> BloomConfig (``context_length`` is ignored: ALiBi has no limit)."""
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise MinibloomError(f"{path}: general.architecture is {arch!r}, minibloom reads only 'bloom' GGUF files")
    C = _need(meta, "bloom.embedding_length", path)
    H = _need(meta, "bloom.attention.head_count", path)
    ff = _need(meta, "bloom.feed_forward_length", path, 4 * C)
    if ff != 4 * C:
        raise MinibloomError(f"{path}: bloom.feed_forward_length {ff} is not 4 x embedding_length ({4 * C})")
    kv = _need(meta, "bloom.attention.head_count_kv", path, H)
    if kv != H:
        raise MinibloomError(f"{path}: bloom.attention.head_count_kv {kv} != head_count {H} (BLOOM has no GQA)")
    eps = meta.get("bloom.attention.layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) or not (
            np.isfinite(eps) and eps > 0):
        raise MinibloomError(f"{path}: metadata 'bloom.attention.layer_norm_epsilon' must be a positive number, "
                             f"got {shown(eps)}")
    # stored as float32: 1e-5 reads back as 9.99999974e-06; its shortest float32 spelling is the number HF used
    eps = float(str(np.float32(eps)))
    ids = {}
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        v = meta.get(f"tokenizer.ggml.{theirs}")
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):  # the range is checked by validate()
            raise MinibloomError(f"{path}: metadata 'tokenizer.ggml.{theirs}' must be a token id, got {shown(v)}")
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
    meta = metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    if meta.get("general.architecture") != ARCH:
        raise MinibloomError(f"{path}: general.architecture is {meta.get('general.architecture')!r}, "
                             "minibloom reads only 'bloom' GGUF files")
    if "token_embd.weight" not in tensors:
        raise MinibloomError(f"{path}: missing tensor 'token_embd.weight' (is this a BLOOM GGUF?)")
    emb = tensors["token_embd.weight"]
    if len(emb.shape) != 2 or min(int(d) for d in emb.shape) < 1:
        raise MinibloomError(f"{path}: tensor 'token_embd.weight' has shape {[int(d) for d in emb.shape]}; the "
                             "embedding is a matrix [n_embd, n_vocab] (GGUF order)")
    vocab = int(emb.shape[1])
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
