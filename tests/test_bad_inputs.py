"""Every bad file, config or argument gives a MinibloomError that names the culprit — never a crash, hang,
MemoryError or bare KeyError/IndexError. The header parser is also fuzzed (hypothesis)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minibloom
from minibloom import MinibloomError
from minibloom.config import BloomConfig
from minibloom.formats.safetensors import SafetensorsFile, parse_header, save_file
from minibloom.formats.weights import expected_shapes

CFG = dict(model_type="bloom", vocab_size=32, hidden_size=8, n_layer=1, n_head=2, layer_norm_epsilon=1e-5)


def tiny_tensors(cfg=CFG, prefix="transformer.", seed=0):
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(BloomConfig.from_dict(cfg), cfg["vocab_size"])
    return {prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def write_ckpt(d, tensors=None, cfg=CFG):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tiny_tensors(cfg) if tensors is None else tensors, os.path.join(d, "model.safetensors"))
    return str(d)


def raw_file(path, header, data=b"", n=None):
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return str(path)


def expect_error(match, fn, *args, **kw):
    with pytest.raises(MinibloomError, match=match):
        fn(*args, **kw)


def test_good_checkpoint_loads(tmp_path):
    m = minibloom.load(write_ckpt(tmp_path / "ok"))
    assert m(np.array([[1, 2, 3]])).shape == (1, 3, 32)


# ---- safetensors files -------------------------------------------------------------------------------------
T = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
SAFETENSORS_CASES = {
    "empty file": (b"", None, b"", "not a safetensors file"),
    "7 bytes": (b"", None, None, "not a safetensors file"),
    "forged 2^62 header length": (T, 2**62, b"\0" * 8, "over the"),
    "header length past end": (T, 10_000, b"\0" * 8, "past the end"),
    "header not JSON": (b"{nope", None, b"", "not valid JSON"),
    "header not UTF-8": (b"{\xff\xfe}", None, b"", "not valid JSON"),
    "header a list": (b"[1, 2]", None, b"", "not valid JSON|not a JSON object"),
    "entry not object": ({"a": 5}, None, b"", "not an object"),
    "unknown dtype": ({"a": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}, None, b"\0" * 2, "unknown dtype"),
    "negative dim": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, None, b"\0" * 8, "negative"),
    "shape not ints": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, None, b"\0" * 8, "shape"),
    "bool dim": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, None, b"\0" * 4, "shape"),
    "offsets past end": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, None, b"\0" * 4, "past the end"),
    "offsets reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, None, b"\0" * 8, "reversed"),
    "offsets negative": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, None, b"", "negative"),
    "offsets malformed": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, None, b"\0" * 8, "data_offsets"),
    "shape vs bytes": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, None, b"\0" * 8, "needs 12 bytes"),
    "overlapping": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, None, b"\0" * 12, "overlaps"),
    "hole": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, None, b"\0" * 8, "hole"),
    "trailing bytes": (T, None, b"\0" * 12, "after the last tensor"),
    "metadata not strings": ({**T, "__metadata__": {"x": 1}}, None, b"\0" * 8, "__metadata__"),
    "duplicate key": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                      b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', None, b"\0" * 8, "duplicate"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_bad_safetensors(tmp_path, case):
    header, n, data, match = SAFETENSORS_CASES[case]
    path = tmp_path / "bad.safetensors"
    if case == "empty file":
        path.write_bytes(b"")
    elif case == "7 bytes":
        path.write_bytes(b"\x01" * 7)
    else:
        raw_file(path, header, data, n)
    with pytest.raises(MinibloomError, match=match) as e:
        SafetensorsFile(path).get("a")
    assert str(path) in str(e.value)


def test_truncated_checkpoint_is_reported(tmp_path):
    d = write_ckpt(tmp_path / "t")
    p = os.path.join(d, "model.safetensors")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    expect_error("model.safetensors", minibloom.load, d)


# ---- checkpoints vs config ------------------------------------------------------------------------------------
def test_missing_tensor_is_named(tmp_path):
    t = tiny_tensors()
    del t["transformer.h.0.mlp.dense_4h_to_h.bias"]
    expect_error(r"missing tensors \['h.0.mlp.dense_4h_to_h.bias'\]", minibloom.load, write_ckpt(tmp_path / "m", t))


def test_unexpected_tensor_is_named(tmp_path):
    t = tiny_tensors()
    t["transformer.h.1.input_layernorm.weight"] = np.ones(8, np.float32)
    expect_error(r"unexpected tensors \['h.1.input_layernorm.weight'\]", minibloom.load, write_ckpt(tmp_path / "u", t))


def test_shape_disagreeing_with_config_is_named(tmp_path):
    t = tiny_tensors()
    t["transformer.h.0.self_attention.dense.weight"] = np.ones((8, 4), np.float32)
    expect_error("self_attention.dense.weight.*expected", minibloom.load, write_ckpt(tmp_path / "s", t))


def test_embedding_width_disagreeing_with_config(tmp_path):
    t = tiny_tensors()
    t["transformer.word_embeddings.weight"] = np.ones((32, 6), np.float32)
    expect_error("word_embeddings.weight", minibloom.load, write_ckpt(tmp_path / "e", t))


def test_integer_tensor_is_rejected(tmp_path):
    t = tiny_tensors()
    t["transformer.ln_f.bias"] = np.zeros(8, np.int32)
    expect_error("ln_f.bias.*not a float", minibloom.load, write_ckpt(tmp_path / "i", t))


def test_bare_and_prefixed_keys_both_load(tmp_path):
    a = minibloom.load(write_ckpt(tmp_path / "p", tiny_tensors(prefix="transformer.")))
    b = minibloom.load(write_ckpt(tmp_path / "b", tiny_tensors(prefix="")))
    ids = np.array([[1, 5, 7]])
    np.testing.assert_array_equal(a(ids), b(ids))


def test_duplicate_tensor_across_shards(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    t = tiny_tensors()
    names = list(t)
    save_file({k: t[k] for k in names[:5]}, d / "model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in names[4:]}, d / "model-00002-of-00002.safetensors")
    wm = {k: "model-00001-of-00002.safetensors" for k in names[:5]}
    wm.update({k: "model-00002-of-00002.safetensors" for k in names[5:]})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps(CFG))
    expect_error("also appears in", minibloom.load, str(d))


@pytest.mark.parametrize("index, match", [
    ("{not json", "index.json: not valid JSON"),
    ('{"weight_map": {"a": "missing.safetensors"}}', "missing"),
    ('{"weight_map": {"a": "../evil.safetensors"}}', "not a .safetensors file in this directory"),
    ('{"weight_map": {"a": "model.bin"}}', "not a .safetensors file"),
    ('{"metadata": {}}', "not a usable safetensors index"),
])
def test_bad_shard_index(tmp_path, index, match):
    d = tmp_path / "idx"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    (d / "model.safetensors.index.json").write_text(index)
    expect_error(match, minibloom.load, str(d))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    expect_error("never unpickles", minibloom.load, str(d))


def test_missing_weights_and_missing_config(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    expect_error("no config.json", minibloom.load, str(d))
    (d / "config.json").write_text(json.dumps(CFG))
    expect_error("no model.safetensors", minibloom.load, str(d))
    expect_error("no such file", minibloom.load, str(tmp_path / "nope"))


# ---- configs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"hidden_size": 10, "n_head": 3}, "not divisible"),
    ({"n_layer": -1}, "n_layer must be a positive integer"),
    ({"n_head": 0}, "n_head must be a positive integer"),
    ({"hidden_size": 8.0}, "hidden_size must be a positive integer"),
    ({"vocab_size": True}, "vocab_size must be a positive integer"),
    ({"layer_norm_epsilon": -1}, "layer_norm_epsilon"),
    ({"layer_norm_epsilon": "tiny"}, "layer_norm_epsilon"),
    ({"model_type": "gpt2"}, "not 'bloom'"),
    ({"slow_but_exact": "yes"}, "slow_but_exact"),
    ({"eos_token_id": -2}, "eos_token_id"),
    ({"pretraining_tp": 0}, "pretraining_tp"),
    ({"quantization_config": "nf4"}, "quantization_config"),
])
def test_bad_config_values(tmp_path, change, match):
    cfg = {**CFG, **change}
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(tiny_tensors(), d / "model.safetensors")
    with pytest.raises(MinibloomError, match=match) as e:
        minibloom.load(str(d))
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("text, match", [
    ("{", "not valid JSON"), ("[1, 2]", "expected a JSON object"), ('{"n_head": 2}', "missing hidden_size"),
    ("\xff", "not valid JSON"),
])
def test_unreadable_config(tmp_path, text, match):
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_bytes(text.encode("latin-1"))
    save_file(tiny_tensors(), d / "model.safetensors")
    expect_error(match, minibloom.load, str(d))


def test_legacy_config_spelling():
    legacy = {"n_embed": 8, "num_attention_heads": 2, "n_layer": 1, "vocab_size": 32, "torch_dtype": "bfloat16",
              "offset_alibi": 100, "masked_softmax_fusion": True, "seq_length": 2048}
    c = BloomConfig.from_dict(legacy)
    assert (c.hidden_size, c.n_head, c.torch_dtype) == (8, 2, "bfloat16")


# ---- call arguments -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return minibloom.load(write_ckpt(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.mark.parametrize("ids, match", [
    ([[1, 32]], "token id 32 is out of range"),
    ([[-1, 2]], "token id -1 is out of range"),
    ([[1.0, 2.0]], "must be integers"),
    ([["a", "b"]], "must be integers"),
    ([[[1, 2]]], "expected shape"),
    (np.zeros((1, 0), np.int64), "empty input"),
    (np.zeros((0, 3), np.int64), "empty input"),
    ([[1, 2], [3]], "rectangular"),
])
def test_bad_ids(tiny, ids, match):
    with pytest.raises(MinibloomError, match=match) as e:
        tiny(ids)
    assert "input_ids" in str(e.value)


@pytest.mark.parametrize("mask, match", [
    (np.ones((1, 2)), "does not match"),
    (np.ones((2, 3)), "does not match"),
    (np.array([[1, 2, 1]]), "0 .padding. or 1"),
    (np.array([["a", "b", "c"]]), "0 .padding. or 1"),
])
def test_bad_mask(tiny, mask, match):
    with pytest.raises(MinibloomError, match=match) as e:
        tiny(np.array([[1, 2, 3]]), mask)
    assert "attention_mask" in str(e.value)


def test_bad_load_arguments(tmp_path):
    d = write_ckpt(tmp_path / "m")
    expect_error("dtype", minibloom.load, d, dtype="float8")
    expect_error("backend", minibloom.load, d, backend="tensorflow")
    expect_error("logits", minibloom.load(d).forward, [[1]], logits="first")


# ---- fuzzing the header parser ----------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1), st.integers(0, 2**40))
def test_fuzz_random_bytes(blob, n, file_size):
    raw = struct.pack("<Q", n) + blob
    try:
        parse_header(raw, max(file_size, len(raw)))
    except MinibloomError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=5), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "X9"]) | json_values,
    "shape": st.lists(st.integers(-3, 5), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | json_values,
})


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=4), entries | json_values, max_size=4), st.integers(0, 100))
def test_fuzz_structured_headers(header, data_len):
    h = json.dumps(header).encode()
    raw = struct.pack("<Q", len(h)) + h
    try:
        infos, _ = parse_header(raw, len(raw) + data_len)
    except MinibloomError:
        return
    # anything accepted must be self-consistent: in bounds and exactly tiling the data
    total = sum(t.nbytes for t in infos.values())
    assert total == data_len
    for t in infos.values():
        assert len(raw) <= t.begin <= t.end <= len(raw) + data_len


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 400), flip=st.integers(0, 400), byte=st.integers(0, 255))
def test_fuzz_damaged_real_file(tmp_path, cut, flip, byte):
    src = tmp_path / "src.safetensors"
    if not src.exists():
        save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float16)}, src)
    data = bytearray(src.read_bytes())
    data = data[: max(0, len(data) - cut)]
    if flip < len(data):
        data[flip] = byte
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    try:
        f = SafetensorsFile(bad)
        for name in f.names:
            f.get(name, np.float32)
        f.close()
    except MinibloomError:
        pass


def test_weights_are_read_into_memory_of_their_own(tmp_path):
    """Loaded weights do not depend on the file afterwards (no mapping kept for the dense path)."""
    d = write_ckpt(tmp_path / "z")
    m = minibloom.load(d)
    before = m(np.array([[1, 2, 3]]))
    w = m.params["h"][0]["mlp"]["dense_h_to_4h"]["weight"]
    assert w.flags.owndata or w.base is not None and w.base.flags.owndata
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:  # overwrite the data section in place
        f.seek(-4096, os.SEEK_END)
        f.write(b"\0" * 4096)
    np.testing.assert_array_equal(m(np.array([[1, 2, 3]])), before)
