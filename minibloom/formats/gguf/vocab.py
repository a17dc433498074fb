"""BLOOM's byte-level BPE vocabulary as GGUF metadata (``tokenizer.ggml.*``), both ways: rebuilt into a
``tokenizers.Tokenizer`` when reading, collected from ``tokenizer.json`` when writing (gguf-py ``vocab.py``,
llama.cpp ``convert_hf_to_gguf.py`` ``_set_vocab_gpt2``).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from ...chat_templates import JINJA, template_for_name
from ...errors import MinibloomError, shown
from ...jsonfile import field, read_json_object

BLOOM_SPLIT_REGEX = " ?[^(\\s|[.,!?…。，、।۔،])]+"  # BLOOM's Split pre-tokenizer (llama.cpp pre "bloom")
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_from_gguf(meta: dict, path: str = "gguf"):
    """Rebuild BLOOM's byte-level BPE ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` metadata (None if absent).

    Vocab = the tokens minus llama.cpp's ``[PAD{i}]`` fillers (type UNUSED); merges ``"a b"``; BLOOM's Split regex then
    ByteLevel(use_regex=False); CONTROL tokens become special added tokens, USER_DEFINED plain added tokens.
    """
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None or (isinstance(tokens, list) and not tokens):
        return None
    tokens = _list_of(meta, "tokenizer.ggml.tokens", str, path)
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

    types = _list_of(meta, "tokenizer.ggml.token_type", int, path) or [TOKEN_NORMAL] * len(tokens)
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
    for m in _list_of(meta, "tokenizer.ggml.merges", str, path):
        parts = m.split(" ")
        if len(parts) != 2:
            raise MinibloomError(f"{path}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
        merges.append((parts[0], parts[1]))
    missing = next(((a, b) for a, b in merges if a not in vocab or b not in vocab or a + b not in vocab), None)
    if missing is not None:
        raise MinibloomError(f"{path}: tokenizer.ggml.merges entry {' '.join(missing)!r} names a token that is not "
                             "in tokenizer.ggml.tokens")
    try:  # the Rust extension panics (a BaseException) on inputs it does not expect
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(BLOOM_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
        if specials:
            tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        if user:
            tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001
        raise MinibloomError(f"{path}: tokenizer metadata does not form a BPE model ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
    return tok


def _list_of(meta: dict, key: str, kind: type, path: str) -> list:
    """Metadata ``key`` as a list whose items are all ``kind`` (int excludes bool); [] when absent."""
    v = meta.get(key)
    if v is None:
        return []
    ok = isinstance(v, list) and all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) if kind is int else isinstance(x, kind)
        for x in v)
    if not ok:
        raise MinibloomError(f"{path}: metadata {key!r} must be a list of {kind.__name__}, got {shown(v)}")
    return v


def wrap_tokenizer(tok, meta: dict, path: str):
    """Wrap a rebuilt ``tokenizers.Tokenizer`` in ``minibloom.tokenizer.Tokenizer`` with the GGUF's special tokens."""
    if tok is None:
        return None
    from ...tokenizer import Tokenizer

    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = {}
    for ours, theirs in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                         ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        i = meta.get(f"tokenizer.ggml.{theirs}")
        if isinstance(i, (int, np.integer)) and 0 <= i < len(tokens):
            config[ours] = tokens[int(i)]
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise MinibloomError(f"{path}: metadata 'tokenizer.chat_template' must be a string")
    if template:
        config["chat_template"] = template
    return Tokenizer(tok, config, path)


def tokenizer_metadata(directory: str, n_tokens: int) -> dict | None:
    """tokens / token types / merges / special ids from a tokenizer.json, as llama.cpp's ``_set_vocab_gpt2`` does.

    Both files are untrusted: read through ``minibloom.jsonfile`` (nesting and size bounded) and every field used is
    type-checked; token ids must lie in ``[0, max(n_tokens, len(vocab)))`` so no forged id sizes the token list.
    """
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    tj = read_json_object(path)
    model = field(tj, "model", dict, path)
    if model.get("type") not in (None, "BPE"):
        raise MinibloomError(f"{path}: model type {shown(model.get('type'))}, expected a byte-level BPE")
    vocab = dict(field(model, "vocab", dict, f"{path}: model"))
    raw_merges = field(model, "merges", list, f"{path}: model", default=[])
    added_list = field(tj, "added_tokens", list, path, default=[])
    limit = max(n_tokens, len(vocab) + len(added_list))
    added = {}
    for a in added_list:
        if not isinstance(a, dict):
            raise MinibloomError(f"{path}: added_tokens entries must be objects, got {shown(a)}")
        i = field(a, "id", int, f"{path}: added token", lo=0, hi=limit - 1)
        added[i] = a
        vocab.setdefault(field(a, "content", str, f"{path}: added token {i}"), i)
    by_id = {}
    for t, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < limit:
            raise MinibloomError(f"{path}: token {shown(t)} has id {shown(i)}, expected an integer in "
                                 f"[0, {limit})")
        by_id[i] = t
    n = max(n_tokens, max(by_id, default=-1) + 1)
    tokens, types = [], []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(TOKEN_NORMAL if a is None else TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
    merges = []
    for m in raw_merges:
        if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            m = " ".join(m)
        if not isinstance(m, str):
            raise MinibloomError(f"{path}: a merge must be a string 'a b' or a pair of strings, got {shown(m)}")
        merges.append(m)
    template = None
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        template = read_json_object(config_path).get("chat_template")
        if isinstance(template, list):  # transformers' named templates: [{"name": "default", "template": "..."}]
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise MinibloomError(f"{config_path}: chat_template must be a string, got {shown(template)}")
    if template is None:  # the seed models pick their template by name: write it, so the GGUF keeps it
        template = JINJA.get(template_for_name(os.path.abspath(directory)))
    return {"tokens": tokens, "types": types, "merges": merges, "chat_template": template}
