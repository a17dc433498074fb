"""bitsandbytes 4-bit checkpoints saved by transformers (``load_in_4bit``) and read by minibloom with NumPy only.

Fixtures are real: a random fp32 BLOOM quantized by transformers + bitsandbytes on CPU and ``save_pretrained``-ed.
The oracle is a float32 transformers BLOOM carrying bitsandbytes' own ``dequantize_4bit`` of every quantized weight.
The logits scenario takes the ``load`` fixture (conftest.py): once per primitive set, same assertions.
"""

from __future__ import annotations

import json
import os
import shutil

import factory
import numpy as np
import pytest

import minibloom
from minibloom import testing
from minibloom.errors import MinibloomError

HIDDEN, HEADS, LAYERS, VOCAB = 64, 4, 2, 160
# (quant type, double quant, quant_storage, dtype of the unquantized tensors / of dequantization)
VARIANTS = [("nf4", True, "uint8", "float32"), ("nf4", False, "float16", "float16"),
            ("fp4", True, "bfloat16", "bfloat16"), ("fp4", False, "float32", "float32"),
            ("nf4", True, "float16", "bfloat16")]


def _bnb():
    torch, transformers = factory._import_torch()
    pytest.importorskip("accelerate", reason="transformers' 4-bit loading needs accelerate (test extra)")
    bnb = pytest.importorskip("bitsandbytes", reason="making 4-bit fixtures needs bitsandbytes (test extra)")
    return torch, transformers, bnb


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    _bnb()
    m = factory.make_model(seed=7, hidden=HIDDEN, n_head=HEADS, n_layer=LAYERS, vocab=VOCAB)
    d = factory.save(m, tmp_path_factory.mktemp("src"))
    return m, d, factory.random_ids(VOCAB, (2, 24), seed=8)


def quantize_and_save(src, dst, qtype, double, storage, dtype):
    """transformers' own 4-bit path: from_pretrained(quantization_config=...) then save_pretrained; returns the
    quantized model too."""
    torch, transformers, _ = _bnb()
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qtype,
                                          bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=torch.float32,
                                          bnb_4bit_quant_storage=getattr(torch, storage))
    q = transformers.BloomForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=getattr(torch, dtype))
    q.save_pretrained(dst)
    return q


def hf_on_bnb_dequantized(q):
    """A float32 transformers BLOOM with bitsandbytes' dequantization of each Linear4bit, other tensors widened."""
    _, _, bnb = _bnb()
    sd = {}
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            sd[name + ".weight"] = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
    assert len(sd) == 4 * LAYERS
    for name, p in q.named_parameters():
        sd.setdefault(name, p.detach().float())
    ref = factory.make_model(seed=0, hidden=HIDDEN, n_head=HEADS, n_layer=LAYERS, vocab=VOCAB)
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ref.tie_weights()
    return ref


@pytest.fixture(scope="module")
def nf4_dir(source, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("nf4"))
    quantize_and_save(source[1], d, "nf4", True, "uint8", "float32")
    return d


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: "-".join(map(str, v)))
def variant(request, source, tmp_path_factory):
    """(variant, its 4-bit checkpoint dir, transformers' float32 logits on bnb's dequantized weights): quantized once
    for both primitive sets."""
    d = tmp_path_factory.mktemp("variant")
    q = quantize_and_save(source[1], d, *request.param)
    return request.param, str(d), factory.hf_logits(hf_on_bnb_dequantized(q), source[2])


def test_logits_equal_transformers_on_bnb_dequantized_weights(source, variant, load, record):
    m, _, ids = source
    (qtype, double, storage, _), path, ref = variant
    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"]) == (qtype, double)
    model = load(path)
    got = model(ids)
    err = testing.assert_rel_close(got, ref, testing.BNB_VS_DEQUANT, f"bnb {qtype} dq={double} storage={storage}")
    record(f"{qtype} dq={double} {storage} vs HF(bnb dequant)", err)
    record(f"{qtype} dq={double} {storage} vs HF(source)", testing.rel_error(got, factory.hf_logits(m, ids)))


def test_weights_are_bit_exact_with_bitsandbytes(source, tmp_path):
    _, _, bnb = _bnb()
    q = quantize_and_save(source[1], tmp_path, "fp4", True, "bfloat16", "float16")
    model = minibloom.load(str(tmp_path))
    mod = q.transformer.h[1].mlp.dense_h_to_4h
    want = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().numpy()
    np.testing.assert_array_equal(model.params["h"][1]["mlp"]["dense_h_to_4h"]["weight"], want)


# ---- malformed metadata ------------------------------------------------------------------------------------------


def _edit(src, dst, change):
    """Copy a 4-bit checkpoint dir, applying ``change(tensors: dict, config: dict)`` before writing it back."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    change(tensors, config)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


QKV = "transformer.h.1.self_attention.query_key_value.weight"
STATE = QKV + ".quant_state.bitsandbytes__nf4"


def _set_state(t, **kw):
    meta = json.loads(t[STATE].tobytes())
    meta.update(kw)
    t[STATE] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()


@pytest.mark.parametrize("change,match", [
    (lambda t, c: t.__setitem__(STATE, np.frombuffer(b"{not json", np.uint8).copy()), "not valid JSON"),
    (lambda t, c: _set_state(t, shape=[64, 64]), "field 'shape'"),
    (lambda t, c: _set_state(t, blocksize=0), "field 'blocksize'"),
    (lambda t, c: _set_state(t, blocksize=2**40), "field 'blocksize' must be a positive integer up to"),
    (lambda t, c: _set_state(t, nested_blocksize=2**40), "field 'nested_blocksize'"),
    (lambda t, c: t.__setitem__(STATE, np.frombuffer(b"[" * 5000, np.uint8).copy()), "JSON nested deeper"),
    (lambda t, c: _set_state(t, dtype="int8"), "field 'dtype'"),
    (lambda t, c: _set_state(t, nested_offset=None), "field 'nested_offset'"),
    (lambda t, c: _set_state(t, nested_offset=10**400), "field 'nested_offset' must be a finite float32"),
    (lambda t, c: _set_state(t, nested_offset=1e39), "field 'nested_offset' must be a finite float32"),
    (lambda t, c: t.pop(QKV + ".absmax"), r"missing .*absmax"),
    (lambda t, c: t.__setitem__(QKV + ".absmax", t[QKV + ".absmax"][:-1].copy()), "absmax"),
    (lambda t, c: t.__setitem__(QKV + ".quant_map", np.zeros(8, np.float32)), "quant_map"),
    (lambda t, c: t.__setitem__(QKV + ".quant_map", t[QKV + ".quant_map"] * 1e30), "code tables lie in"),
    (lambda t, c: t.__setitem__(QKV + ".nested_quant_map", t[QKV + ".nested_quant_map"] * np.nan), "entry 0 is nan"),
    (lambda t, c: t.__setitem__(QKV, t[QKV][:-2].copy()), "packed 4-bit codes"),
    (lambda t, c: t.__setitem__(QKV + ".quant_state.bitsandbytes__fp4", t[STATE].copy()), "expected one"),
    (lambda t, c: c["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True),
     "8-bit"),
])
def test_malformed_metadata_is_a_clear_error(nf4_dir, tmp_path, change, match):
    from bounds import bounded

    d = _edit(nf4_dir, tmp_path / "bad", change)
    with bounded(seconds=10, megabytes=512), pytest.raises(MinibloomError, match=match) as e:
        minibloom.load(d)
    if "8-bit" not in match:
        assert "query_key_value" in str(e.value)  # names the tensor


def test_a_4bit_checkpoint_fine_tunes_dequantized(nf4_dir):
    """A bitsandbytes 4-bit checkpoint loads as plain dequantized arrays, and training steps lower its loss."""
    from minibloom import training
    from minibloom.bloom import hf_names

    model = minibloom.load(nf4_dir)
    model.trainable()  # plain arrays: no quantized blocks left
    training.writable(model)
    opt = training.AdamW(hf_names(model.params), lr=1e-3)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, (2, 8))
    losses = [training.train_step(model, opt, [(ids, np.ones_like(ids), ids)], 1e-3)[0] for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
