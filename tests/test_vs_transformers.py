"""minibloom vs transformers on random checkpoints: float32 parity and exact float64 parity, per configuration."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import minibloom
from minibloom.testing import FP32, FP64_VS_HF, assert_rel_close
from factory import (hf_float64_exact, hf_hidden_states, hf_logits, left_pad, make_model, random_ids, save)

torch = pytest.importorskip("torch")

CONFIGS = {
    "pow2-heads": dict(hidden=64, n_head=4, n_layer=3),
    "6-heads": dict(hidden=48, n_head=6, n_layer=3),
    "12-heads": dict(hidden=96, n_head=12, n_layer=2),  # 8 + 4 extra slopes
    "1-head": dict(hidden=16, n_head=1, n_layer=2),
    "post-ln-residual": dict(hidden=48, n_head=6, n_layer=3, post_ln=True),
}


def check_both(model, path, ids, record, mask=None, label=""):
    """fp32 vs HF fp32 and fp64 vs patched HF fp64; returns (err32, err64)."""
    ref32 = hf_logits(model, ids, mask)
    got32 = minibloom.load(path)(ids, mask)
    assert got32.dtype == np.float32
    e32 = record(f"{label}fp32 rel err", assert_rel_close(got32, ref32, FP32, "float32 logits"))
    with hf_float64_exact():
        ref64 = hf_logits(model, ids, mask, dtype=torch.float64)
    got64 = minibloom.load(path, dtype="float64")(ids, mask)
    assert got64.dtype == np.float64
    e64 = record(f"{label}fp64 rel err", assert_rel_close(got64, ref64, FP64_VS_HF, "float64 logits"))
    # the checks must be able to fail: the two precisions differ far more than the fp64 tolerance
    assert np.abs(got32 - got64).max() > FP64_VS_HF.rel * np.abs(got64).max()
    return e32, e64


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match(tmp_path, name, record):
    model = make_model(seed=1, **CONFIGS[name])
    path = save(model, tmp_path / name)
    ids = random_ids(256, (2, 13), seed=2)
    check_both(model, path, ids, record)


def test_hidden_states_match(tmp_path):
    model = make_model(seed=3, hidden=48, n_head=6, n_layer=3)
    path = save(model, tmp_path / "m")
    ids = random_ids(256, (1, 9), seed=4)
    with hf_float64_exact():
        ref, ref_logits = hf_hidden_states(model, ids, dtype=torch.float64)
    out = minibloom.load(path, dtype="float64").forward(ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref) == 4
    for i, (a, b) in enumerate(zip(out.hidden_states, ref)):
        assert_rel_close(a, b, FP64_VS_HF, f"hidden state {i}")
    assert_rel_close(out.logits, ref_logits, FP64_VS_HF, "logits")


def test_left_padding_matches_transformers_and_unpadded_rows(tmp_path, record):
    model = make_model(seed=5, hidden=48, n_head=6, n_layer=3)
    path = save(model, tmp_path / "m")
    rows = [list(random_ids(256, 11, seed=6)), list(random_ids(256, 6, seed=7)), list(random_ids(256, 1, seed=8))]
    ids, mask = left_pad(rows)
    check_both(model, path, ids, record, mask, "left-pad ")
    for dtype, tol in (("float32", FP32), ("float64", FP64_VS_HF)):
        m = minibloom.load(path, dtype=dtype)
        batch = m(ids, mask)
        assert np.all(np.isfinite(batch)), "padded rows must never produce NaN/inf"
        for i, r in enumerate(rows):
            alone = m(np.array([r]))
            err = assert_rel_close(batch[i, -len(r):], alone[0], tol, f"row {i} padded vs alone ({dtype})")
            record(f"pad row {i} {dtype}", err)


def test_fully_masked_rows_are_finite_in_float64(tmp_path):
    model = make_model(seed=9, hidden=32, n_head=4, n_layer=2)
    path = save(model, tmp_path / "m")
    ids = random_ids(256, (2, 5), seed=10)
    mask = np.array([[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    for dtype in ("float32", "float64"):
        out = minibloom.load(path, dtype=dtype)(ids, mask)
        assert np.all(np.isfinite(out))


def test_tp2_slow_but_exact_adds_the_biases(tmp_path, record):
    """transformers' slow path drops the dense biases (its bug). minibloom reorders the sum and keeps the biases:
    it must equal HF's fast path (biases on) and HF's slow path once those biases are zero."""
    model = make_model(seed=11, hidden=64, n_head=4, n_layer=2, tp=2, slow=True)
    path = save(model, tmp_path / "slow")
    ids = random_ids(256, (2, 9), seed=12)
    mb32, mb64 = minibloom.load(path), minibloom.load(path, dtype="float64")
    assert mb32.config.pretraining_tp == 2 and mb32.config.slow_but_exact
    model.config.slow_but_exact = False
    for blk in model.transformer.h:  # the config flag is read per call from the modules
        blk.self_attention.slow_but_exact = blk.mlp.slow_but_exact = False
    ref32 = hf_logits(model, ids)
    record("tp2 vs HF fast fp32", assert_rel_close(mb32(ids), ref32, FP32, "tp=2 vs HF fast path"))
    with hf_float64_exact():
        ref64 = hf_logits(model, ids, dtype=torch.float64)
    record("tp2 vs HF fast fp64", assert_rel_close(mb64(ids), ref64, FP64_VS_HF, "tp=2 vs HF fast path"))
    # HF's slow path itself, with the biases it drops set to zero
    with torch.no_grad():
        for blk in model.transformer.h:
            blk.self_attention.slow_but_exact = blk.mlp.slow_but_exact = True
            blk.self_attention.dense.bias.zero_()
            blk.mlp.dense_4h_to_h.bias.zero_()
    path0 = save(model, tmp_path / "slow0")
    with hf_float64_exact():
        ref0 = hf_logits(model, ids, dtype=torch.float64)
    record("tp2 vs HF slow fp64", assert_rel_close(minibloom.load(path0, dtype="float64")(ids), ref0, FP64_VS_HF,
                                                   "tp=2 vs HF slow path, zero dense biases"))


def test_bf16_sharded_base_model_bare_keys(tmp_path, record):
    base = make_model(seed=13, hidden=48, n_head=6, n_layer=3, base=True)
    path = save(base, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="20KB")
    files = sorted(os.listdir(path))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        keys = json.load(f)["weight_map"]
    assert not any(k.startswith("transformer.") for k in keys)
    # reference: a CausalLM carrying exactly the bf16-rounded weights, run in float32 / float64
    from factory import transformers

    lm = transformers.BloomForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = random_ids(256, (2, 10), seed=14)
    check_both(lm, path, ids, record, label="bf16 ")


def test_fp16_checkpoint_legacy_config(tmp_path, record):
    model = make_model(seed=15, hidden=48, n_head=6, n_layer=2)
    path = save(model, tmp_path / "legacy", dtype=torch.float16, legacy_config=True)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert "n_embed" in cfg and "num_attention_heads" in cfg and "hidden_size" not in cfg
    from factory import transformers

    lm = transformers.BloomForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = random_ids(256, (1, 12), seed=16)
    check_both(lm, path, ids, record, label="fp16 legacy ")


def test_untied_lm_head(tmp_path, record):
    model = make_model(seed=17, hidden=32, n_head=4, n_layer=2, tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.transformer.word_embeddings.weight.data_ptr()
    path = save(model, tmp_path / "untied")
    ids = random_ids(256, (1, 7), seed=18)
    check_both(model, path, ids, record, label="untied ")
