"""Random BLOOM checkpoints built with transformers, shared by every test that needs an oracle.

Every parameter is randomized — biases and LayerNorm weights too — because transformers' init leaves biases at 0
and LayerNorm weights at 1, which would hide a loader that swaps or drops them.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from minibloom.tokenizer import left_pad as _left_pad

torch = None
transformers = None


def _import_torch():
    global torch, transformers
    import pytest

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def make_model(seed=0, std=0.08, base=False, **cfg_kw):
    """A random ``BloomForCausalLM`` (or bare ``BloomModel``) in float32, eval mode, every parameter random
    (``minibloom.oracle.hf.random_model``)."""
    _import_torch()
    from minibloom.oracle.hf import random_model

    return random_model(seed=seed, std=std, base=base, **cfg_kw)


def save(model, path, dtype=None, max_shard_size=None, legacy_config=False):
    """``save_pretrained`` in ``dtype`` (a torch dtype); optionally rewrite config.json in the bigscience spelling."""
    _import_torch()
    m = model if dtype is None else model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    m.save_pretrained(path, **kw)
    if dtype is not None:
        model.to(torch.float32)
    if legacy_config:
        legacy_config_json(path)
    return os.fspath(path)


def legacy_config_json(path):
    """Rewrite config.json the way the original bigscience hub files spell it (n_embed, num_attention_heads, ...)."""
    p = os.path.join(path, "config.json")
    with open(p) as f:
        d = json.load(f)
    d["n_embed"] = d.pop("hidden_size")
    d["num_attention_heads"] = d.pop("n_head")
    d["torch_dtype"] = d.pop("dtype", None) or d.pop("torch_dtype", None) or "float32"
    d.update(offset_alibi=100, masked_softmax_fusion=True, attention_softmax_in_fp32=True, bias_dropout_fusion=True,
             skip_bias_add=True, skip_bias_add_qkv=False, seq_length=2048, n_inner=None)
    with open(p, "w") as f:
        json.dump(d, f, indent=2)


def hf_logits(model, ids, mask=None, dtype=None):
    """transformers' logits as NumPy (``dtype``: a torch dtype to run in, e.g. torch.float64)."""
    _import_torch()
    m = model if dtype is None else model.to(dtype)
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.as_tensor(np.asarray(mask))}
        out = m(torch.as_tensor(np.asarray(ids)), **kw).logits.numpy()
    if dtype is not None:
        model.to(torch.float32)
    return out


def hf_hidden_states(model, ids, mask=None, dtype=None):
    _import_torch()
    m = model if dtype is None else model.to(dtype)
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.as_tensor(np.asarray(mask))}
        out = m(torch.as_tensor(np.asarray(ids)), output_hidden_states=True, **kw)
    if dtype is not None:
        model.to(torch.float32)
    return [h.numpy() for h in out.hidden_states], out.logits.numpy()


@contextlib.contextmanager
def hf_float64_exact():
    """Make transformers' BLOOM an exact float64 reference (softmax and ALiBi slopes in float64): the context manager
    lives in ``minibloom.oracle`` so that ``minibloom check`` and the tests patch transformers the same way."""
    _import_torch()
    from minibloom.oracle import hf_float64_exact as patched

    with patched():
        yield


def random_ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def left_pad(rows, pad_id=3):
    """Left-pad lists of ids to one length: (ids [B, T], mask [B, T])."""
    return _left_pad(rows, pad_id)
