"""BLOOM as llama.cpp stores it: GGUF files, read into minibloom and written from a Hugging Face checkpoint.

Follows llama.cpp's ``convert_hf_to_gguf.py`` ``BloomModel`` (tensor names, the QKV regrouping, tokenizer metadata)
and ``src/llama-model.cpp`` (ALiBi max_bias 8, ``output.weight`` optional and tied to ``token_embd`` when absent);
the container format is ggml's ``docs/gguf.md``. Files are parsed and dequantized with the ``gguf`` package
(``GGUFReader``, ``gguf.quants.dequantize``: pure NumPy). Formats: llama.cpp's ``gguf-py`` and ``ggml-common.h``.

Every tensor is dequantized by its own ggml type (one file mixes F32 norms, Q6_K output, Q4_K blocks ...), never by
``general.file_type``. GGUF keeps matrices as ``(out, in)`` with ggml's reversed dims, which ``GGUFReader`` turns
back into NumPy order, so only the fused QKV needs work: llama.cpp stores it as ``[all q; all k; all v]`` while
BLOOM interleaves ``(q, k, v)`` per head.
"""

from __future__ import annotations

import json
import os
import struct
import warnings

import numpy as np

from .backend import Backend
from .config import DTYPES, BloomConfig
from .errors import MinibloomError
from .quant import LazyLayer, QuantizedWeight, dequantize
from .weights import LAYER_TENSORS, Loaded, _progress, nest

ARCH = "bloom"
BLOOM_SPLIT_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"  # BLOOM's Split pre-tokenizer (llama.cpp pre "bloom")
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

GLOBAL_NAMES = {  # llama.cpp name -> HF BLOOM name (gguf-py tensor_mapping.py, entries tagged "bloom")
    "token_embd.weight": "word_embeddings.weight",
    "token_embd_norm.weight": "word_embeddings_layernorm.weight",
    "token_embd_norm.bias": "word_embeddings_layernorm.bias",
    "output_norm.weight": "ln_f.weight",
    "output_norm.bias": "ln_f.bias",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {  # per block: llama.cpp module -> HF module
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}


# ---------------------------------------------------------------------------------------------------------------
# Names and the QKV layout


def hf_to_gguf_name(hf_name: str) -> str:
    """``h.3.self_attention.query_key_value.weight`` -> ``blk.3.attn_qkv.weight`` (bare HF names)."""
    for g, h in GLOBAL_NAMES.items():
        if h == hf_name:
            return g
    parts = hf_name.split(".")
    if parts[0] == "h" and len(parts) >= 4:
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        for g, h in LAYER_NAMES.items():
            if h == module:
                return f"blk.{parts[1]}.{g}.{leaf}"
    raise MinibloomError(f"{hf_name}: not a BLOOM tensor name")


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_qkv.weight`` -> ``h.3.self_attention.query_key_value.weight``; None for unknown names."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES \
            and parts[3] in ("weight", "bias"):
        return f"h.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def qkv_to_gguf(a: np.ndarray, n_head: int) -> np.ndarray:
    """BLOOM's per-head ``(q, k, v)`` rows -> llama.cpp's ``[all q; all k; all v]`` (weight [3C, C] or bias [3C])."""
    three_c = a.shape[0]
    hd = three_c // (3 * n_head)
    return a.reshape(n_head, 3, hd, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def qkv_from_gguf(a: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``qkv_to_gguf``: ``[all q; all k; all v]`` -> per-head ``(q, k, v)``."""
    three_c = a.shape[0]
    hd = three_c // (3 * n_head)
    return np.ascontiguousarray(a.reshape(3, n_head, hd, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape))


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _open_reader(path: str):
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


def _fields(reader) -> dict:
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
    """Every GGUF tensor a BLOOM file must hold and its NumPy shape."""
    C = cfg.hidden_size
    want = {"token_embd.weight": (vocab, C), "token_embd_norm.weight": (C,), "token_embd_norm.bias": (C,),
            "output_norm.weight": (C,), "output_norm.bias": (C,)}
    if has_output:
        want["output.weight"] = (vocab, C)
    for i in range(cfg.n_layer):
        for hf, shape in LAYER_TENSORS:
            want[hf_to_gguf_name(f"h.{i}.{hf}")] = shape(C)
    return want


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
    want = _expected(cfg, vocab, has_output)
    missing = [n for n in want if n not in tensors]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MinibloomError(f"{path}: missing tensors {missing[:5]}{more} for a {cfg.n_layer}-layer BLOOM")
    extra = [n for n in tensors if n not in want]
    if extra:
        raise MinibloomError(f"{path}: unexpected tensors {extra[:5]} (block_count={cfg.n_layer})")
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
    reader = _open_reader(path)
    if getattr(reader, "byte_order", "I") == "S":
        raise MinibloomError(f"{path}: big-endian GGUF files are not supported")
    meta = _fields(reader)
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
        params = {k: v if k == "h" and keep_quantized else _to_backend(v, backend) for k, v in params.items()}
    tok = tokenizer_from_gguf(meta, os.fspath(path))
    return Loaded(cfg, params, _wrap_tokenizer(tok, meta, os.fspath(path)), os.fspath(path))


def _to_backend(tree, backend: Backend):
    if isinstance(tree, dict):
        return {k: _to_backend(v, backend) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_backend(v, backend) for v in tree]
    return backend.asarray(tree)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_from_gguf(meta: dict, path: str = "gguf"):
    """Rebuild BLOOM's byte-level BPE ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` metadata (None if absent).

    Vocab = the tokens minus llama.cpp's ``[PAD{i}]`` fillers (type UNUSED); merges ``"a b"``; BLOOM's Split regex then
    ByteLevel(use_regex=False); CONTROL tokens become special added tokens, USER_DEFINED plain added tokens.
    """
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        warnings.warn(f"{path}: tokenizer.ggml.model is {model!r}, not byte-level BPE ('gpt2'); no tokenizer",
                      stacklevel=3)
        return None
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in (None, "bloom"):
        warnings.warn(f"{path}: tokenizer.ggml.pre is {pre!r}; using BLOOM's pre-tokenizer anyway", stacklevel=3)
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )

    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise MinibloomError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab, specials, user = {}, [], []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_UNUSED and tok.startswith("[PAD"):
            continue
        if tok in vocab:
            raise MinibloomError(f"{path}: token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i
        if ty == TOKEN_CONTROL:
            specials.append(tok)
        elif ty == TOKEN_USER_DEFINED:
            user.append(tok)
    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise MinibloomError(f"{path}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
        merges.append((parts[0], parts[1]))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types
        raise MinibloomError(f"{path}: tokenizer metadata does not form a BPE model ({e})") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BLOOM_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    if specials:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if user:
        tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])
    return tok


def _wrap_tokenizer(tok, meta: dict, path: str):
    """Wrap a rebuilt ``tokenizers.Tokenizer`` in ``minibloom.tokenizer.Tokenizer`` with the GGUF's special tokens."""
    if tok is None:
        return None
    from .tokenizer import Tokenizer

    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = {}
    for ours, theirs in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                         ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        i = meta.get(f"tokenizer.ggml.{theirs}")
        if isinstance(i, (int, np.integer)) and 0 <= i < len(tokens):
            config[ours] = tokens[int(i)]
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return Tokenizer(tok, config, path)


# ---------------------------------------------------------------------------------------------------------------
# Writing (llama.cpp convert_hf_to_gguf.py BloomModel layout)


def _tokenizer_metadata(directory: str, n_tokens: int) -> dict | None:
    """tokens / token types / merges / special ids from a tokenizer.json, as llama.cpp's ``_set_vocab_gpt2`` does."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            tj = json.load(f)
        model = tj["model"]
        vocab: dict = dict(model["vocab"])
        raw_merges = model.get("merges") or []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MinibloomError(f"{path}: not a usable tokenizer.json ({e!r})") from None
    if model.get("type") not in (None, "BPE"):
        raise MinibloomError(f"{path}: model type {model.get('type')!r}, expected a byte-level BPE")
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    by_id = {i: t for t, i in vocab.items()}
    n = max(n_tokens, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(TOKEN_NORMAL if a is None else TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    template = None
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, "rb") as f:
                template = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError):
            template = None
    return {"tokens": tokens, "types": types, "merges": merges, "chat_template": template}


def convert_hf_to_gguf(src: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16", *,
                       types: dict[str, str] | None = None, duplicate_output: bool = False,
                       progress=None) -> str:
    """Write a Hugging Face BLOOM checkpoint directory as a GGUF file laid out like llama.cpp's converter.

    ``outtype``: one of ``OUTTYPES`` for the 2-D weights (norms and biases are always F32, as in llama.cpp; a matrix
    whose rows do not split into whole blocks falls back to F16). ``types``: per-tensor overrides by GGUF name, e.g.
    ``{"output.weight": "q8_0"}`` (makes a mixed file). ``duplicate_output``: also write the tied embedding as
    ``output.weight`` (what converters before llama.cpp PR #12456, March 2025, did).
    """
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter, LlamaFileType, QuantError, quants

    from .weights import Checkpoint, read_params, safetensors_files

    src, out_path = os.fspath(src), os.fspath(out_path)
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise MinibloomError(f"outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    for k, v in (types or {}).items():
        if v.lower() not in OUTTYPES:
            raise MinibloomError(f"types[{k!r}]: {v!r} is not one of {', '.join(OUTTYPES)}")
    cfg = BloomConfig.from_json(os.path.join(src, "config.json"))
    ckpt = Checkpoint(safetensors_files(src))
    try:
        params = read_params(ckpt, cfg, np.float32, progress=progress)
    finally:
        ckpt.close()
    flat = _flatten(params)
    vocab, C = flat["word_embeddings.weight"].shape
    if "lm_head.weight" not in flat and duplicate_output:
        flat["lm_head.weight"] = flat["word_embeddings.weight"]

    w = GGUFWriter(out_path, arch=ARCH)
    w.add_name(os.path.basename(os.path.normpath(src)))
    w.add_context_length(C)  # llama.cpp writes seq_length, else n_embed (ALiBi has no limit; readers ignore it)
    w.add_embedding_length(C)
    w.add_feed_forward_length(4 * C)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(getattr(LlamaFileType, _FILE_TYPES[outtype]).value)
    w.add_quantization_version(2)
    tm = _tokenizer_metadata(src, vocab)
    if tm is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("bloom")
        w.add_token_list(tm["tokens"])
        w.add_token_types(tm["types"])
        w.add_token_merges(tm["merges"])
        if isinstance(tm.get("chat_template"), str) and tm["chat_template"]:
            w.add_chat_template(tm["chat_template"])
    for key, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("unk", cfg.unk_token_id),
                       ("pad", cfg.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)

    for hf_name, a in flat.items():
        name = hf_to_gguf_name(hf_name)
        if ".attn_qkv." in name:
            a = qkv_to_gguf(a, cfg.n_head)
        kind = (types or {}).get(name, outtype).lower() if a.ndim == 2 and name.endswith(".weight") else "f32"
        if kind == "f32":
            w.add_tensor(name, np.ascontiguousarray(a, np.float32))
        elif kind == "f16":
            w.add_tensor(name, np.ascontiguousarray(a, np.float16))
        else:
            qtype = getattr(T, kind.upper())
            try:
                w.add_tensor(name, quants.quantize(np.ascontiguousarray(a, np.float32), qtype), raw_dtype=qtype)
            except QuantError:
                w.add_tensor(name, np.ascontiguousarray(a, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=bool(progress))
    w.close()
    return out_path


def _flatten(params: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in params.items():
        if k == "h":
            for i, layer in enumerate(v):
                out.update(_flatten(layer, f"{prefix}h.{i}."))
        elif isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def main(argv=None) -> int:
    """``python -m minibloom.gguf SRC OUT.gguf --outtype q8_0``: convert a checkpoint directory to GGUF."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m minibloom.gguf",
                                 description="Write a Hugging Face BLOOM checkpoint directory as a GGUF file in "
                                             "llama.cpp's layout (convert_hf_to_gguf.py BloomModel).")
    ap.add_argument("src", help="checkpoint directory (config.json, model.safetensors, optional tokenizer.json)")
    ap.add_argument("out", help="the .gguf file to write")
    ap.add_argument("--outtype", choices=OUTTYPES, default="f16", help="type of the 2-D weights (default f16)")
    ap.add_argument("--duplicate-output", action="store_true",
                    help="also store the tied embedding as output.weight (llama.cpp before March 2025 needs it)")
    args = ap.parse_args(argv)
    try:
        path = convert_hf_to_gguf(args.src, args.out, args.outtype, duplicate_output=args.duplicate_output,
                                  progress=None)
    except MinibloomError as e:
        print(f"error: {e}", flush=True)
        return 2
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
