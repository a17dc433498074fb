"""Property-based fuzzing of every checkpoint format minibloom reads, plus one regression test per root cause of the
attack report that the other test files do not already pin down.

Each hypothesis example starts from a valid tiny checkpoint (safetensors directory, sharded directory, GGUF file,
bitsandbytes 4-bit directory), changes it (a config field set to any JSON value, a header field forged, metadata of
the wrong type, a tensor offset or shape out of range, bytes flipped, the file cut short) and then asserts the one
acceptable outcome: either a ``MinibloomError`` whose message names the file (its path or name), or a model that loads,
runs and gives finite logits. Every load runs under ``bounded`` so a hidden huge allocation or a hang fails the
example instead of passing or stalling CI. ``derandomize=True`` keeps CI reproducible.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest
from bounds import bounded
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

import minibloom
import tiny_tokenizer
from minibloom.errors import MinibloomError

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
IDS = np.array([[1, 2, 3, 4]])
# a forged config may drop vocab_size; the loader then warns that the embedding's rows win, which is expected here
pytestmark = pytest.mark.filterwarnings("ignore:.*but the embedding has:UserWarning")
SECONDS, MEGABYTES = 15, 512


def outcome(load, names: tuple[str, ...]) -> str:
    """``"error"`` (a MinibloomError naming one of ``names``) or ``"ok"`` (the model ran and its logits are finite);
    any other exception, a time-out or an allocation past the bound fails the example."""
    with bounded(seconds=SECONDS, megabytes=MEGABYTES):
        try:
            model = load()
            logits = np.asarray(model(IDS))
        except MinibloomError as e:
            msg = str(e)
            assert any(n in msg for n in names), f"the message does not name the file {names}: {msg}"
            if currently_in_test_context():  # counted in --hypothesis-show-statistics
                event("refused")
            return "error"
    assert np.isfinite(logits).all(), "a checkpoint that loads must give finite logits"
    if currently_in_test_context():
        event("loaded and ran")
    return "ok"


def info_outcome(path: str, names: tuple[str, ...]) -> None:
    """``minibloom info`` reads configs, headers and GGUF metadata by its own route: facts about this file (what
    ``info --json`` prints) or a MinibloomError naming the file, under the same bounds."""
    from minibloom.cli.info import describe

    with bounded(seconds=SECONDS, megabytes=MEGABYTES):
        try:
            facts = describe(path)
        except MinibloomError as e:
            assert any(n in str(e) for n in names), f"the message does not name the file {names}: {e}"
            return
        assert os.path.samefile(facts["path"], path) and facts["n_params"] > 0, facts
        json.dumps(facts, default=str)  # as info --json prints them


# ---- values ------------------------------------------------------------------------------------------------------
INTS = st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**32, 2**40, 2**63, 2**64 - 1, 2**64, 10**30, -2**63]),
                 st.integers(-2**70, 2**70))
JSON_SCALARS = st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                             max_size=3),
                           max_leaves=8)


def nested_text(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---- a tiny safetensors checkpoint with a tokenizer ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return tiny_tokenizer.write_checkpoint(tmp_path_factory.mktemp("fuzz") / "m", vocab=300, hidden=16, n_layer=2,
                                           n_head=2)


def copy_checkpoint(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def read_header(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: str, header, data: bytes, length: int | None = None) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if length is None else length) + h + data)


def test_the_unchanged_fixtures_load_and_run(tiny, tiny_gguf_parts, tmp_path):
    """The starting points of every fuzz test are good checkpoints (else every example would be a refusal)."""
    assert outcome(lambda: minibloom.load(tiny), (tiny,)) == "ok"
    g = gguf_file(str(tmp_path / "m.gguf"), tiny_gguf_parts)
    assert outcome(lambda: minibloom.load(g), (g,)) == "ok"


# ---- config.json ------------------------------------------------------------------------------------------------
CONFIG_FIELDS = ["vocab_size", "hidden_size", "n_embed", "n_layer", "num_hidden_layers", "n_head",
                 "num_attention_heads", "layer_norm_epsilon", "pretraining_tp",
                 "apply_residual_connection_post_layernorm", "slow_but_exact", "tie_word_embeddings", "bos_token_id",
                 "eos_token_id", "pad_token_id", "unk_token_id", "model_type", "dtype", "torch_dtype",
                 "quantization_config", "chat_template"]


@settings(FUZZ, max_examples=200)
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS), JSON_VALUES, min_size=1, max_size=3),
       low_memory=st.booleans())
def test_fuzz_config_fields(tiny, changes, low_memory):
    with tempfile.TemporaryDirectory() as tmp:
        d = copy_checkpoint(tiny, os.path.join(tmp, "m"))
        path = os.path.join(d, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(path, "w") as f:
            json.dump(cfg, f)
        outcome(lambda: minibloom.load(d, low_memory=low_memory), (d,))
        info_outcome(d, (d,))


@FUZZ
@given(cut=st.integers(0, 400), junk=st.sampled_from(["", "[", "{", "]", "\0", "\ufeff", "NaN", "1e999",
                                                      nested_text(3000), '{"a": ' * 3000]))
def test_fuzz_config_text(tiny, cut, junk):
    with tempfile.TemporaryDirectory() as tmp:
        d = copy_checkpoint(tiny, os.path.join(tmp, "m"))
        path = os.path.join(d, "config.json")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text[:cut] + junk + text[cut:] if junk else text[:cut])
        outcome(lambda: minibloom.load(d), (d,))


# ---- safetensors headers and bytes --------------------------------------------------------------------------------
DTYPES = st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "f32", ""]),
                   st.text(max_size=5))
SHAPES = st.one_of(st.lists(INTS, max_size=4), JSON_VALUES)
OFFSETS = st.one_of(st.tuples(INTS, INTS).map(list), JSON_VALUES)


@st.composite
def safetensors_edit(draw):
    """A function that forges one thing of (header, data): a field of a tensor entry, an entry added or removed, the
    metadata, the header length, a flipped byte of the header or of the data, a cut."""
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "remove", "add", "metadata", "length", "flip",
                                 "cut", "nan"]))
    k = draw(st.integers(0, 10**6))
    value = draw({"dtype": DTYPES, "shape": SHAPES, "offsets": OFFSETS, "entry": JSON_VALUES,
                  "metadata": JSON_VALUES}.get(kind, st.none()))
    number = draw(INTS)

    def edit(header: dict, data: bytes):
        names = sorted(n for n in header if n != "__metadata__")
        name = names[k % len(names)]
        length = None
        if kind in ("dtype", "shape", "offsets"):
            header[name][{"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[kind]] = value
        elif kind == "entry":
            header[name] = value
        elif kind == "remove":
            del header[name]
        elif kind == "add":
            header[f"transformer.h.{k % 5}.extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        elif kind == "metadata":
            header["__metadata__"] = value
        elif kind == "length":
            length = number % 2**64
        elif kind == "flip":
            raw = bytearray(json.dumps(header).encode())
            raw[k % len(raw)] ^= 1 << (number % 8)
            return bytes(raw), data, length
        elif kind == "cut":
            data = data[:k % max(len(data), 1)]
        elif kind == "nan":  # a float32 NaN / inf somewhere in the data
            start = (k % (len(data) // 4)) * 4
            data = data[:start] + struct.pack("<f", [np.nan, np.inf, -np.inf][number % 3]) + data[start + 4:]
        return header, data, length

    return edit


@settings(FUZZ, max_examples=300)
@given(edits=st.lists(safetensors_edit(), min_size=1, max_size=2), low_memory=st.booleans())
def test_fuzz_safetensors(tiny, edits, low_memory):
    with tempfile.TemporaryDirectory() as tmp:
        d = copy_checkpoint(tiny, os.path.join(tmp, "m"))
        path = os.path.join(d, "model.safetensors")
        header, data = read_header(path)
        length = None
        for edit in edits:
            if isinstance(header, bytes):
                break
            header, data, length = edit(header, data)
        write_safetensors(path, header, data, length)
        outcome(lambda: minibloom.load(d, low_memory=low_memory), (path, d))
        info_outcome(path, (path, d))


# ---- the shard index ----------------------------------------------------------------------------------------------
@st.composite
def index_edit(draw):
    kind = draw(st.sampled_from(["value", "key", "weight_map", "whole", "remove", "text"]))
    value = draw(st.one_of(JSON_VALUES, st.sampled_from(["../model-1.safetensors", "/etc/passwd", "missing.safetensors",
                                                         "model-1.safetensors/..", "model-1", ""])))
    k = draw(st.integers(0, 10**6))
    return kind, value, k


@settings(FUZZ, max_examples=150)
@given(edit=index_edit())
def test_fuzz_shard_index(tiny, edit):
    kind, value, k = edit
    with tempfile.TemporaryDirectory() as tmp:
        d = copy_checkpoint(tiny, os.path.join(tmp, "m"))
        os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "model-1.safetensors"))
        header, _ = read_header(os.path.join(d, "model-1.safetensors"))
        index = {"metadata": {}, "weight_map": {n: "model-1.safetensors" for n in header if n != "__metadata__"}}
        names = sorted(index["weight_map"])
        text = None
        if kind == "value":
            index["weight_map"][names[k % len(names)]] = value
        elif kind == "key":
            index["weight_map"][str(value)] = "model-1.safetensors"
        elif kind == "weight_map":
            index["weight_map"] = value
        elif kind == "whole":
            index = value
        elif kind == "remove":
            del index["weight_map"][names[k % len(names)]]
        else:
            text = json.dumps(index)[:k % 500] + nested_text(k % 3000)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps(index) if text is None else text)
        outcome(lambda: minibloom.load(d), (d,))


# ---- GGUF ---------------------------------------------------------------------------------------------------------
# GGUF value types (docs/gguf.md) and their struct formats
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FORMAT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
                 U64: "<Q", I64: "<q", F64: "<d"}


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(types: list[int], value) -> bytes:
    """The bytes of a metadata value of (nested) type ``types``, e.g. ``[ARR, STR]`` for a list of strings."""
    t = types[0]
    if t == STR:
        return gguf_string(value)
    if t == ARR:
        return struct.pack("<IQ", types[1], len(value)) + b"".join(gguf_value(types[1:], v) for v in value)
    return struct.pack(SCALAR_FORMAT[t], value)


def gguf_parts(checkpoint: str) -> dict:
    """The metadata (key -> (types, value)), tensor infos and data of the GGUF written from ``checkpoint``."""
    import gguf

    from minibloom.gguf import convert_hf_to_gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = convert_hf_to_gguf(checkpoint, os.path.join(tmp, "m.gguf"), "q8_0")
        reader = gguf.GGUFReader(path)
        meta = {k: ([int(t) for t in f.types], f.contents()) for k, f in reader.fields.items()
                if not k.startswith("GGUF.")}
        tensors = [[t.name, [int(x) for x in t.shape], int(t.tensor_type), int(t.data_offset - reader.data_offset)]
                   for t in reader.tensors]
        with open(path, "rb") as f:
            f.seek(reader.data_offset)
            data = f.read()
        del reader
    return {"meta": meta, "tensors": tensors, "data": data, "alignment": 32}


def gguf_bytes(parts: dict) -> bytes:
    """A GGUF v3 file written by hand from ``parts`` (so any field can be forged, which GGUFWriter would refuse)."""
    kv = b"".join(gguf_string(k) + struct.pack("<I", types[0]) + gguf_value(types, v)
                  for k, (types, v) in parts["meta"].items())
    info = b"".join(gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                    + struct.pack("<IQ", t, offset) for name, dims, t, offset in parts["tensors"])
    head = b"GGUF" + struct.pack("<IQQ", 3, len(parts["tensors"]), len(parts["meta"])) + kv + info
    return head + b"\0" * (-len(head) % parts["alignment"]) + parts["data"]


def gguf_file(path: str, parts: dict) -> str:
    with open(path, "wb") as f:
        f.write(gguf_bytes(parts))
    return path


@pytest.fixture(scope="module")
def tiny_gguf_parts(tiny) -> dict:
    pytest.importorskip("gguf")
    return gguf_parts(tiny)


SCALAR_VALUES = {
    U8: st.integers(0, 255), I8: st.integers(-128, 127), U16: st.integers(0, 2**16 - 1),
    I16: st.integers(-2**15, 2**15 - 1),
    U32: st.one_of(st.integers(0, 70), st.integers(0, 2**32 - 1)), I32: st.integers(-2**31, 2**31 - 1),
    F32: st.floats(width=32), BOOL: st.booleans(), STR: st.text(max_size=6),
    U64: st.one_of(st.integers(0, 70), st.integers(0, 2**64 - 1)), I64: st.integers(-2**63, 2**63 - 1),
    F64: st.floats(),
}


@st.composite
def typed_value(draw):
    """(types, value): a scalar of any GGUF type, an array of one, or an array of arrays of one."""
    depth = draw(st.sampled_from([0, 0, 1, 1, 2]))
    t = draw(st.sampled_from(sorted(SCALAR_VALUES)))
    values = SCALAR_VALUES[t]
    for _ in range(depth):
        values = st.lists(values, max_size=4)
    return [ARR] * depth + [t], draw(values)


GGUF_KEYS = ["general.architecture", "general.alignment", "bloom.block_count", "bloom.embedding_length",
             "bloom.feed_forward_length", "bloom.attention.head_count", "bloom.attention.layer_norm_epsilon",
             "bloom.context_length", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
             "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
             "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.chat_template",
             "general.file_type"]
DIMS = st.lists(st.one_of(st.integers(0, 64), st.sampled_from([2**32, 2**40, 2**63, 2**64 - 1])), max_size=6)


@st.composite
def gguf_edit(draw):
    """A function forging one thing of a GGUF's parts: a metadata value (any type), a key removed, a tensor's name,
    dims, type or offset, a token list entry, or (on the bytes) a flipped header byte or a cut."""
    kind = draw(st.sampled_from(["meta", "meta", "remove", "dims", "type", "offset", "name", "token", "merge",
                                 "flip", "cut", "nan"]))
    key = draw(st.sampled_from(GGUF_KEYS))
    value = draw(typed_value())
    k = draw(st.integers(0, 10**6))
    dims = draw(DIMS)
    number = draw(st.one_of(st.integers(0, 40), st.sampled_from([2**32 - 1, 2**63, 2**64 - 1]),
                            st.integers(0, 2**64 - 1)))
    text = draw(st.text(max_size=6))

    def edit(parts: dict) -> None:
        tensor = parts["tensors"][k % len(parts["tensors"])]
        meta = parts["meta"]
        if kind == "meta":
            meta[key] = value
        elif kind == "remove":
            meta.pop(key, None)
        elif kind == "dims":
            tensor[1] = dims
        elif kind == "type":
            tensor[2] = number % 2**32
        elif kind == "offset":
            tensor[3] = number
        elif kind == "name":
            tensor[0] = text
        elif kind in ("token", "merge"):
            field = "tokenizer.ggml.tokens" if kind == "token" else "tokenizer.ggml.merges"
            types, values = meta[field]
            values = list(values)
            if values:
                values[k % len(values)] = text
            meta[field] = (types, values)
        elif kind == "flip":
            parts["flip"] = (k, number % 8)
        elif kind == "cut":
            parts["cut"] = k
        elif kind == "nan":  # a NaN in the f32 token_embd_norm.weight (norms stay F32 in a q8_0 file)
            name, _, _, offset = next(t for t in parts["tensors"] if t[0] == "token_embd_norm.weight")
            data = parts["data"]
            at = offset + 4 * (k % 16)
            parts["data"] = data[:at] + struct.pack("<f", np.nan) + data[at + 4:]

    return edit


def forged_gguf(parts: dict, edits, path: str) -> str:
    parts = {**parts, "meta": dict(parts["meta"]), "tensors": [list(t) for t in parts["tensors"]]}
    for edit in edits:
        edit(parts)
    raw = bytearray(gguf_bytes(parts))
    if "flip" in parts:
        k, bit = parts["flip"]
        raw[k % (len(raw) - len(parts["data"]))] ^= 1 << bit  # a byte of the header
    if "cut" in parts:
        raw = raw[:parts["cut"] % len(raw)]
    with open(path, "wb") as f:
        f.write(raw)
    return path


@settings(FUZZ, max_examples=300)
@given(edits=st.lists(gguf_edit(), min_size=1, max_size=3), keep_quantized=st.booleans())
def test_fuzz_gguf(tiny_gguf_parts, edits, keep_quantized):
    with tempfile.TemporaryDirectory() as tmp:
        path = forged_gguf(tiny_gguf_parts, edits, os.path.join(tmp, "m.gguf"))
        outcome(lambda: minibloom.load(path, keep_quantized=keep_quantized), (path,))
        info_outcome(path, (path,))


# ---- bitsandbytes quant state -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bnb_dir(tmp_path_factory) -> str:
    """A 4-bit NF4 (double-quantized) checkpoint saved by transformers + bitsandbytes from a tiny random BLOOM."""
    import test_bnb

    torch, transformers, _ = test_bnb._bnb()
    src = test_bnb.factory.save(test_bnb.factory.make_model(seed=7, hidden=64, n_head=4, n_layer=2, vocab=160),
                                tmp_path_factory.mktemp("bnb-src"))
    d = str(tmp_path_factory.mktemp("bnb"))
    test_bnb.quantize_and_save(src, d, "nf4", True, "uint8", "float32")
    return d


BNB_FIELDS = ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]


@st.composite
def bnb_edit(draw):
    kind = draw(st.sampled_from(["field", "field", "remove", "state", "absmax", "quant_map", "nested_absmax",
                                 "nested_quant_map", "codes"]))
    key = draw(st.sampled_from(BNB_FIELDS))
    value = draw(JSON_VALUES)
    k = draw(st.integers(0, 10**6))
    # non-finite or out-of-table values; huge finite scales (1e38) are left out: they give huge finite weights, which
    # every format accepts (see test_large_finite_weights_are_not_mistaken_for_inf) and which overflow the forward pass
    special = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -1.0, 1.5, 1e38]))
    return kind, key, value, k, special


@settings(FUZZ, max_examples=80)
@given(edit=bnb_edit())
def test_fuzz_bnb_quant_state(bnb_dir, edit):
    from minibloom.formats.safetensors import SafetensorsFile, save_file

    kind, key, value, k, special = edit
    with tempfile.TemporaryDirectory() as tmp:
        d = copy_checkpoint(bnb_dir, os.path.join(tmp, "m"))
        path = os.path.join(d, "model.safetensors")
        with SafetensorsFile(path) as f:
            tensors = {n: np.array(f.get(n)) for n in f.names}
        states = sorted(n for n in tensors if ".quant_state.bitsandbytes__" in n)
        state = states[k % len(states)]
        base = state.split(".quant_state.")[0]  # the packed weight, e.g. transformer.h.0.mlp.dense_h_to_4h.weight
        if kind in ("field", "remove"):
            meta = json.loads(tensors[state].tobytes())
            if kind == "field":
                meta[key] = value
            else:
                meta.pop(key, None)
            tensors[state] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
        elif kind == "state":
            text = json.dumps(value) if k % 2 else nested_text(k % 4000)
            tensors[state] = np.frombuffer(text.encode() or b" ", np.uint8).copy()
        elif kind in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            name = f"{base}.{kind}"
            if name in tensors and tensors[name].dtype.kind == "f" and (kind.endswith("quant_map") or special < 1e30):
                tensors[name] = tensors[name].astype(np.float32)
                tensors[name].reshape(-1)[k % tensors[name].size] = special
        else:
            tensors[base] = tensors[base][: k % tensors[base].shape[0]].copy()  # packed codes cut short
        save_file(tensors, path)
        outcome(lambda: minibloom.load(d), (d,))


# ---- regression tests: one per root cause ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json"])
def test_deep_json_in_tokenizer_files_is_a_minibloom_error(tiny, tmp_path, name):
    d = copy_checkpoint(tiny, str(tmp_path / "m"))
    with open(os.path.join(d, name), "w") as f:
        f.write("[" * 100000)
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=f"{name}: JSON nested deeper"):
        minibloom.load(d)


def test_deep_json_in_tokenizer_json_is_a_minibloom_error_when_writing_gguf(tiny, tmp_path):
    pytest.importorskip("gguf")
    from minibloom.gguf import convert_hf_to_gguf

    d = copy_checkpoint(tiny, str(tmp_path / "m"))
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write('{"model": ' + "[" * 100000)
    with bounded(seconds=5, megabytes=256), \
            pytest.raises(MinibloomError, match="tokenizer.json: JSON nested deeper"):
        convert_hf_to_gguf(d, str(tmp_path / "m.gguf"), "f32")


@pytest.mark.parametrize("edit, match", [
    (lambda tj: tj["model"]["vocab"].update({"zz": 10**12}), r"token 'zz' has id 1000000000000, expected an integer"),
    (lambda tj: tj["model"]["vocab"].update({"zz": "7"}), r"token 'zz' has id '7'"),
    (lambda tj: tj["model"].update(merges=[1, 2]), "a merge must be a string"),
    (lambda tj: tj["model"].update(vocab=["a"]), "'vocab' must be an object"),
    (lambda tj: tj.update(added_tokens=[{"id": 2**40, "content": "x"}]), "'id' = 1099511627776 is outside"),
])
def test_a_forged_tokenizer_json_is_refused_when_writing_gguf(tiny, tmp_path, edit, match):
    """A token id of 10^12 would have made the writer build 10^12 filler tokens."""
    pytest.importorskip("gguf")
    from minibloom.gguf import convert_hf_to_gguf

    d = copy_checkpoint(tiny, str(tmp_path / "m"))
    with open(os.path.join(d, "tokenizer.json")) as f:
        tj = json.load(f)
    edit(tj)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tj, f)
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=match):
        convert_hf_to_gguf(d, str(tmp_path / "m.gguf"), "f32")


def test_a_token_id_outside_the_config_vocabulary_is_refused(tiny, tmp_path):
    d = copy_checkpoint(tiny, str(tmp_path / "m"))
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = 300  # vocab_size is 300: ids are 0 .. 299
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(MinibloomError, match=r"config.json: eos_token_id must be a token id \(0 .. 299\) or null, "
                                             r"got 300"):
        minibloom.load(d)


def test_an_embedding_of_zero_rows_is_refused_at_load(tiny, tmp_path):
    d = copy_checkpoint(tiny, str(tmp_path / "m"))
    from minibloom.formats.safetensors import SafetensorsFile, save_file

    path = os.path.join(d, "model.safetensors")
    with SafetensorsFile(path) as f:
        tensors = {n: np.array(f.get(n)) for n in f.names}
    tensors["transformer.word_embeddings.weight"] = np.zeros((0, 16), np.float32)
    save_file(tensors, path)
    with pytest.raises(MinibloomError, match=r"word_embeddings.weight.*shape \[0, 16\]"):
        minibloom.load(d)


def test_a_nan_in_a_gguf_norm_is_refused_naming_the_tensor(tiny_gguf_parts, tmp_path):
    parts = {**tiny_gguf_parts}
    offset = next(t[3] for t in parts["tensors"] if t[0] == "token_embd_norm.weight")
    parts["data"] = parts["data"][:offset] + struct.pack("<f", np.nan) + parts["data"][offset + 4:]
    path = gguf_file(str(tmp_path / "m.gguf"), parts)
    with pytest.raises(MinibloomError, match="token_embd_norm.weight"):
        minibloom.load(path)


@pytest.mark.parametrize("key, types, value, match", [
    ("tokenizer.ggml.tokens", [U32], 7, "tokens' must be a list of str"),
    ("bloom.attention.layer_norm_epsilon", [STR], "1e-5", "layer_norm_epsilon' must be a positive number"),
    ("tokenizer.ggml.merges", [ARR, U32], [1, 2], "merges' must be a list of str"),
])
def test_minibloom_info_on_a_gguf_with_mistyped_metadata_is_a_minibloom_error(tiny_gguf_parts, tmp_path, key, types,
                                                                              value, match):
    from minibloom.cli.info import describe

    parts = {**tiny_gguf_parts, "meta": {**tiny_gguf_parts["meta"], key: (types, value)}}
    path = gguf_file(str(tmp_path / "m.gguf"), parts)
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=match) as e:
        describe(path)
    assert path in str(e.value)


@pytest.mark.parametrize("types, value, match", [
    ([STR], "2", "metadata 'tokenizer.ggml.eos_token_id' must be a token id, got '2'"),
    ([ARR, U32], [2], "metadata 'tokenizer.ggml.eos_token_id' must be a token id, got \\[2\\]"),
    ([U64], 10**12, r"eos_token_id must be a token id \(0 .. 299\) or null, got 1000000000000"),
])
def test_gguf_special_token_ids_must_be_ids_of_the_vocabulary(tiny_gguf_parts, tmp_path, types, value, match):
    parts = {**tiny_gguf_parts, "meta": {**tiny_gguf_parts["meta"], "tokenizer.ggml.eos_token_id": (types, value)}}
    path = gguf_file(str(tmp_path / "m.gguf"), parts)
    with pytest.raises(MinibloomError, match=match):
        minibloom.load(path)


def test_a_tokenizers_panic_becomes_a_minibloom_error(tiny_gguf_parts, tmp_path):
    """A merge over a token the vocabulary lacks makes the Rust tokenizers library panic (a BaseException)."""
    types, merges = tiny_gguf_parts["meta"]["tokenizer.ggml.merges"]
    parts = {**tiny_gguf_parts, "meta": {**tiny_gguf_parts["meta"],
                                         "tokenizer.ggml.merges": (types, list(merges) + ["\u2603 \u2604"])}}
    path = gguf_file(str(tmp_path / "m.gguf"), parts)
    with pytest.raises(MinibloomError, match="m.gguf"):
        minibloom.load(path)


def test_pretraining_tp_that_does_not_divide_hidden_size_is_refused(tiny, tmp_path):
    d = copy_checkpoint(tiny, str(tmp_path / "m"))
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(pretraining_tp=3, slow_but_exact=True)  # hidden_size 16
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(MinibloomError, match="config.json: hidden_size 16 is not divisible by pretraining_tp 3"):
        minibloom.load(d)


def test_an_empty_weight_map_in_the_shard_index_is_refused(tiny, tmp_path):
    d = copy_checkpoint(tiny, str(tmp_path / "m"))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {}}, f)
    with pytest.raises(MinibloomError, match="index.json: weight_map is empty"):
        minibloom.load(d)


@pytest.mark.parametrize("n_dims", [0, 5])
def test_a_gguf_tensor_with_no_or_too_many_dimensions_is_refused(tiny_gguf_parts, tmp_path, n_dims):
    """A 0-dimensional token_embd made `minibloom info` index an empty shape (IndexError)."""
    from minibloom.cli.info import describe

    tensors = [list(t) for t in tiny_gguf_parts["tensors"]]
    tensors[0][1] = [1] * n_dims
    path = gguf_file(str(tmp_path / "m.gguf"), {**tiny_gguf_parts, "tensors": tensors})
    for read in (minibloom.load, describe):
        with pytest.raises(MinibloomError, match=rf"m.gguf.*tensor '{tensors[0][0]}': {n_dims} dimensions"):
            read(path)
