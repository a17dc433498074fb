"""Forged sizes in checkpoint files are refused before anything is built or allocated from them."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from bounds import bounded

import minibloom
from minibloom.errors import MinibloomError
from minibloom.formats.weights import write_random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    cfg = minibloom.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)
    return write_random_checkpoint(tmp_path_factory.mktemp("hostile") / "m", cfg, 64, np.float32, progress=False)


def with_config(src: str, dst, **changes) -> str:
    os.makedirs(dst, exist_ok=True)
    os.symlink(os.path.join(src, "model.safetensors"), os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


@pytest.mark.parametrize("n_layer", [3, 4000])
def test_a_layer_count_the_file_cannot_hold_is_refused_before_names_are_built(tiny, tmp_path, n_layer):
    path = with_config(tiny, tmp_path / "m", n_layer=n_layer)
    with bounded(seconds=5, megabytes=256), \
            pytest.raises(MinibloomError, match=f"n_layer={n_layer}, but the file holds 29 tensors"):
        minibloom.load(path)


@pytest.mark.parametrize("field, value", [("n_layer", 10**6), ("n_layer", 10**9), ("vocab_size", 2**40),
                                          ("hidden_size", 2**40), ("n_head", 10**9), ("pretraining_tp", 10**9)])
def test_sizes_larger_than_any_bloom_are_refused(tiny, tmp_path, field, value):
    path = with_config(tiny, tmp_path / "m", **{field: value})
    with bounded(seconds=5, megabytes=256), \
            pytest.raises(MinibloomError, match=f"config.json: {field} = {value} is larger than any BLOOM"):
        minibloom.load(path)


# what a config's token id may not be, for the tiny checkpoint's 64 tokens: below 0, past the vocabulary (up to
# integers no float holds), or not an integer at all (JSON true, a number with a fraction, a string, a list)
NOT_TOKEN_IDS = st.one_of(st.integers(max_value=-1), st.integers(min_value=64), st.booleans(),
                          st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
                          st.floats(0, 63).map(float), st.text(max_size=3), st.lists(st.integers(0, 63), max_size=2))


@given(field=st.sampled_from(["eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"]), value=NOT_TOKEN_IDS)
@example(field="eos_token_id", value=10**30)
@example(field="pad_token_id", value=-1)
@example(field="bos_token_id", value="x")
@example(field="unk_token_id", value=1.5)
@example(field="eos_token_id", value=64)  # one past the last token
@example(field="pad_token_id", value=True)
def test_token_ids_in_the_config_must_be_token_ids(tiny, field, value):
    with tempfile.TemporaryDirectory() as tmp:
        path = with_config(tiny, os.path.join(tmp, "m"), **{field: value})
        with pytest.raises(MinibloomError, match=f"config.json: {field} must be a token id"):
            minibloom.load(path)


def test_pretraining_tp_with_more_slices_than_columns_is_refused(tiny, tmp_path):
    path = with_config(tiny, tmp_path / "m", pretraining_tp=32)
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="pretraining_tp 32 is more slices"):
        minibloom.load(path)


@pytest.mark.parametrize("text", ["[" * 100000, '{"a": ' * 5000 + "1" + "}" * 5000])
def test_deeply_nested_config_json_is_a_minibloom_error(tiny, tmp_path, text):
    path = with_config(tiny, tmp_path / "m")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(text)
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="config.json: JSON nested deeper"):
        minibloom.load(path)


@pytest.mark.parametrize("n_layer", [10**9])
def test_a_forged_gguf_block_count_is_refused_before_names_are_built(tiny, tmp_path, n_layer):
    gguf = pytest.importorskip("gguf")
    from minibloom.gguf import convert_hf_to_gguf

    path = convert_hf_to_gguf(tiny, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields["bloom.block_count"]
    field.parts[field.data[0]][0] = n_layer  # patch the value in the mapped file
    del reader
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=f"n_layer = {n_layer} is larger"):
        minibloom.load(path)


def test_deep_json_in_a_safetensors_header_is_a_minibloom_error(tmp_path):
    from minibloom.formats.safetensors import parse_header

    body = ("{" + '"a": {' * 5000 + "}" * 5001).encode()
    raw = len(body).to_bytes(8, "little") + body
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="header: JSON nested deeper"):
        parse_header(raw, len(raw), "x.safetensors")


def test_a_zero_byte_tensor_claiming_a_huge_shape_is_refused(tmp_path):
    from minibloom.formats.safetensors import parse_header

    body = json.dumps({"t": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}).encode()
    raw = len(body).to_bytes(8, "little") + body
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=r"tensor 't': shape \[0, "):
        parse_header(raw, len(raw), "x.safetensors")


def test_deep_json_in_the_shard_index_is_a_minibloom_error(tiny, tmp_path):
    path = with_config(tiny, tmp_path / "m")
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": ' + "[" * 100000)
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="index.json: JSON nested deeper"):
        minibloom.load(path)


def with_tensor(src: str, dst, name: str, edit) -> str:
    """A copy of checkpoint ``src`` with tensor ``name`` (HF saved name) changed by ``edit(array)``."""
    from minibloom.formats.safetensors import SafetensorsFile, save_file

    os.makedirs(dst, exist_ok=True)
    with SafetensorsFile(os.path.join(src, "model.safetensors")) as f:
        tensors = {n: np.array(f.get(n)) for n in f.names}
    edit(tensors[name])
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return str(dst)


@st.composite
def poisoned(draw, names: list[str]) -> tuple[str, float, float]:
    """(tensor name, nan / inf / -inf, where in the tensor as a fraction of its size)."""
    return (draw(st.sampled_from(names)), draw(st.sampled_from([np.nan, np.inf, -np.inf])),
            draw(st.one_of(st.just(0.5), st.floats(0, 1, exclude_max=True))))


TINY_NAMES = [f"transformer.h.{i}.{p}" for i in range(2) for p in (
    "input_layernorm.weight", "input_layernorm.bias", "self_attention.query_key_value.weight",
    "self_attention.query_key_value.bias", "self_attention.dense.weight", "self_attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")] + [
    "transformer.word_embeddings.weight", "transformer.word_embeddings_layernorm.weight",
    "transformer.word_embeddings_layernorm.bias", "transformer.ln_f.weight", "transformer.ln_f.bias"]


@given(poison=poisoned(TINY_NAMES), low_memory=st.booleans())
@example(poison=("transformer.h.1.mlp.dense_h_to_4h.weight", np.nan, 0.5), low_memory=False)
@example(poison=("transformer.word_embeddings.weight", np.inf, 0.5), low_memory=True)
@example(poison=("transformer.ln_f.bias", -np.inf, 0.5), low_memory=True)
@example(poison=("transformer.word_embeddings.weight", np.nan, 0.99), low_memory=True)  # a row the ids do not use
def test_nan_or_inf_weights_are_refused_naming_the_tensor(tiny, poison, low_memory):
    name, value, where = poison

    def edit(a):
        a.reshape(-1)[int(where * a.size)] = value

    with tempfile.TemporaryDirectory() as tmp:
        path = with_tensor(tiny, os.path.join(tmp, "m"), name, edit)
        with pytest.raises(MinibloomError, match=rf"{name.split('.', 1)[1]}.*(nan|inf).*weights must be finite"):
            model = minibloom.load(path, low_memory=low_memory)
            model([[1, 2, 3]])  # low-memory reads a layer (and the rows of the embedding) when it is used


def test_large_finite_weights_are_not_mistaken_for_inf(tiny, tmp_path):
    """The sum check overflows on values near float32's largest: the per-value check must then pass them."""
    path = with_tensor(tiny, tmp_path / "m", "transformer.h.0.mlp.dense_h_to_4h.weight",
                       lambda a: a.__setitem__(slice(None), 3e38))
    assert minibloom.load(path).params["h"][0]["mlp"]["dense_h_to_4h"]["weight"].max() == np.float32(3e38)


# ---- GGUF ---------------------------------------------------------------------------------------------------------
def gguf_bytes(kv: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0, tail: bytes = b"") -> bytes:
    """A GGUF v3 file written by hand (docs/gguf.md): header, raw metadata and tensor-info bytes, then ``tail``."""
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors + tail


def gstr(s: str) -> bytes:
    import struct

    return struct.pack("<Q", len(s.encode())) + s.encode()


def test_gguf_metadata_arrays_nested_5000_deep_are_refused(tmp_path):
    import struct

    kv = gstr("x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)
    path = tmp_path / "deep.gguf"
    path.write_bytes(gguf_bytes(kv, 1))
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="'x': arrays nested deeper"):
        minibloom.load(str(path))


def test_a_gguf_array_claiming_2_to_the_60_elements_is_refused(tmp_path):
    import struct

    for et in (4, 8, 9):  # uint32, strings, arrays
        kv = gstr("big") + struct.pack("<I", 9) + struct.pack("<IQ", et, 2**60)
        path = tmp_path / f"big{et}.gguf"
        path.write_bytes(gguf_bytes(kv, 1, tail=b"\0" * 64))
        with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="cannot fit in the rest"):
            minibloom.load(str(path))


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_gguf_alignment_must_be_a_positive_power_of_two(tmp_path, alignment):
    import struct

    kv = gstr("general.alignment") + struct.pack("<II", 4, alignment)
    path = tmp_path / "a.gguf"
    path.write_bytes(gguf_bytes(kv, 1))
    with pytest.raises(MinibloomError, match=f"general.alignment' must be a positive power of two, got {alignment}"):
        minibloom.load(str(path))


@pytest.mark.parametrize("offset", [2**64 - 1, 2**63, 10**12, 8])
def test_a_gguf_tensor_offset_outside_the_file_is_refused(tmp_path, offset):
    import struct

    info = gstr("token_embd.weight") + struct.pack("<I", 1) + struct.pack("<Q", 32) + struct.pack("<IQ", 0, offset)
    path = tmp_path / "o.gguf"
    path.write_bytes(gguf_bytes(tensors=info, n_tensors=1, tail=b"\0" * 256))
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="token_embd.weight.*outside"):
        minibloom.load(str(path))


GOOD_META = {"general.architecture": "bloom", "bloom.embedding_length": 16, "bloom.attention.head_count": 2,
             "bloom.block_count": 2, "bloom.feed_forward_length": 64, "bloom.attention.layer_norm_epsilon": 1e-5,
             "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
             "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.merges": ["a b"]}


@pytest.mark.parametrize("key, value, match", [
    ("bloom.attention.layer_norm_epsilon", "1e-5", "layer_norm_epsilon' must be a positive number"),
    ("bloom.attention.layer_norm_epsilon", [1e-5], "layer_norm_epsilon' must be a positive number"),
    ("bloom.attention.layer_norm_epsilon", float("nan"), "layer_norm_epsilon' must be a positive number"),
    ("bloom.feed_forward_length", "64", "feed_forward_length' must be a positive integer"),
    ("bloom.block_count", [2], "block_count' must be a positive integer"),
    ("bloom.block_count", 10**9, "n_layer = 1000000000 is larger than any BLOOM"),
])
def test_gguf_hyperparameters_of_the_wrong_type_are_refused(key, value, match):
    from minibloom.formats.gguf import config_from_gguf

    with pytest.raises(MinibloomError, match=match):
        config_from_gguf({**GOOD_META, key: value}, 10, False, "m.gguf")


@pytest.mark.parametrize("key, value, match", [
    ("tokenizer.ggml.tokens", "abc", "tokens' must be a list of str"),
    ("tokenizer.ggml.tokens", [1, 2, 3], "tokens' must be a list of str"),
    ("tokenizer.ggml.merges", [1, 2], "merges' must be a list of str"),
    ("tokenizer.ggml.merges", ["a c"], "merges entry 'a c' names a token that is not in"),
    ("tokenizer.ggml.merges", ["b a"], "merges entry 'b a' names a token that is not in"),
    ("tokenizer.ggml.token_type", ["x", 1, 1], "token_type' must be a list of int"),
])
def test_gguf_vocabulary_metadata_of_the_wrong_type_is_refused(key, value, match):
    from minibloom.formats.gguf import tokenizer_from_gguf

    with pytest.raises(MinibloomError, match=match):
        tokenizer_from_gguf({**GOOD_META, key: value}, "m.gguf")


def test_the_good_gguf_vocabulary_metadata_builds_a_tokenizer():
    from minibloom.formats.gguf import tokenizer_from_gguf

    tok = tokenizer_from_gguf(GOOD_META, "m.gguf")
    assert tok.encode("ab").ids == [2]


@pytest.mark.parametrize("key, value", [("bloom.feed_forward_length", np.uint32(63)),
                                        ("bloom.attention.layer_norm_epsilon", np.float32(-1.0)),
                                        ("bloom.block_count", np.int64(-2))])
def test_messages_show_plain_numbers_not_numpy_reprs(key, value):
    from minibloom.formats.gguf import config_from_gguf

    with pytest.raises(MinibloomError) as e:
        config_from_gguf({**GOOD_META, key: value}, 10, False, "m.gguf")
    assert "np." not in str(e.value) and str(value.item()) in str(e.value)
