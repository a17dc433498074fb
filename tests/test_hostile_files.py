"""Forged sizes in checkpoint files are refused before anything is built or allocated from them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
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


@pytest.mark.parametrize("field", ["eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"])
@pytest.mark.parametrize("value", [10**30, -1, "x", 1.5])
def test_token_ids_in_the_config_must_be_token_ids(tiny, tmp_path, field, value):
    path = with_config(tiny, tmp_path / "m", **{field: value})
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


@pytest.mark.parametrize("name", ["transformer.h.1.mlp.dense_h_to_4h.weight", "transformer.word_embeddings.weight",
                                  "transformer.ln_f.bias"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("low_memory", [False, True])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(tiny, tmp_path, name, value, low_memory):
    def poison(a):
        a.reshape(-1)[a.size // 2] = value

    path = with_tensor(tiny, tmp_path / "m", name, poison)
    with pytest.raises(MinibloomError, match=rf"{name.split('.', 1)[1]}.*(nan|inf).*weights must be finite"):
        model = minibloom.load(path, low_memory=low_memory)
        model([[1, 2, 3]])  # low-memory reads a layer (and the rows of the embedding) when it is used


def test_large_finite_weights_are_not_mistaken_for_inf(tiny, tmp_path):
    """The sum check overflows on values near float32's largest: the per-value check must then pass them."""
    path = with_tensor(tiny, tmp_path / "m", "transformer.h.0.mlp.dense_h_to_4h.weight",
                       lambda a: a.__setitem__(slice(None), 3e38))
    assert minibloom.load(path).params["h"][0]["mlp"]["dense_h_to_4h"]["weight"].max() == np.float32(3e38)
