"""Trace files from outside (an engine's run, a colleague's CI): every forged or broken .npz is a MinibloomError
naming the file and member, found before anything is allocated for it, within a time and memory bound."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest
from bounds import bounded

from minibloom.errors import MinibloomError
from minibloom.trace import diff_traces, load_trace, save_trace

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


def small_trace() -> dict:
    rng = np.random.default_rng(0)
    B, T, C, L, H, V = 1, 3, 4, 2, 2, 5
    return {"input_ids": np.arange(T)[None], "attention_mask": np.ones((B, T), np.int64),
            "hidden_states": [rng.standard_normal((B, T, C)) for _ in range(L + 1)],
            "attentions": [np.full((B, H, T, T), 1 / T) for _ in range(L)],
            "logits": rng.standard_normal((B, T, V)), "meta": {"implementation": "test", "dtype": "float64"}}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    return save_trace(small_trace(), tmp_path_factory.mktemp("tr") / "good.npz")


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_zip(path, entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> str:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return str(path)


def npy_header(shape, descr="<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def load(path):
    with bounded(seconds=10, megabytes=512):
        return load_trace(path)


def test_the_good_trace_loads(good):
    assert len(load(good)["hidden_states"]) == 3


def test_a_plain_npy_named_npz(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "x.npy").rename(tmp_path / "x.npz")
    with pytest.raises(MinibloomError, match="x.npz: not a .npz trace"):
        load(tmp_path / "x.npz")


def test_members_without_the_npy_suffix(good, tmp_path):
    m = members(good)
    m["logits"] = m.pop("logits.npy")
    with pytest.raises(MinibloomError, match="member 'logits': not a .npy array"):
        load(write_zip(tmp_path / "t.npz", m))


def test_a_member_claiming_2_to_the_40_elements(good, tmp_path):
    m = members(good)
    m["logits.npy"] = npy_header((1, 2**20, 2**20)) + b"\0" * 64
    with pytest.raises(MinibloomError, match=r"member 'logits.npy': header declares shape \[1, 1048576, 1048576\]"):
        load(write_zip(tmp_path / "t.npz", m))


def test_a_deflate_bomb(good, tmp_path):
    m = members(good)
    m["logits.npy"] = npy_header((1, 3, 2**24)) + b"\0" * (3 * 2**27)  # 384 MiB of zeros in a small deflated member
    with pytest.raises(MinibloomError, match="decompression bomb"):
        load(write_zip(tmp_path / "t.npz", m, zipfile.ZIP_DEFLATED))


def test_a_layer_key_with_a_huge_index(good, tmp_path):
    m = members(good)
    m["hidden_states.1000000000000.npy"] = m["hidden_states.0.npy"]
    with pytest.raises(MinibloomError, match="layer index 1000000000000"):
        load(write_zip(tmp_path / "t.npz", m))


def test_zero_d_stacked_hidden_states(good, tmp_path):
    m = {k: v for k, v in members(good).items() if not k.startswith("hidden_states")}
    buf = io.BytesIO()
    np.save(buf, np.float64(1.0))
    m["hidden_states.npy"] = buf.getvalue()
    with pytest.raises(MinibloomError, match="stacked 'hidden_states' must have 4 dimensions"):
        load(write_zip(tmp_path / "t.npz", m))


def test_deeply_nested_meta(good, tmp_path):
    m = members(good)
    buf = io.BytesIO()
    np.save(buf, np.array('{"a": ' + "[" * 100000 + "]" * 100000 + "}"))
    m["meta.npy"] = buf.getvalue()
    with pytest.raises(MinibloomError, match="'meta': JSON nested deeper"):
        load(write_zip(tmp_path / "t.npz", m))


def test_an_inconsistent_number_of_attention_arrays_is_refused(tmp_path):
    t = small_trace()
    t["attentions"] = t["attentions"][:1]
    with pytest.raises(MinibloomError, match="1 attention arrays for 3 hidden states"):
        load(save_trace(t, tmp_path / "t.npz"))


@pytest.mark.parametrize("rtol", ["x", float("nan"), -1.0, float("inf")])
def test_a_bad_rtol_is_a_minibloom_error(rtol):
    t = small_trace()
    with pytest.raises(MinibloomError, match="rtol"):
        diff_traces(t, t, rtol=rtol)


@hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
@hypothesis.given(st.data())
def test_mutated_traces_load_or_fail_cleanly(good, tmp_path_factory, data):
    """Flip bytes, truncate, or replace whole members (names, headers, shapes, dtypes, meta) of a valid trace."""
    m = members(good)
    name = data.draw(st.sampled_from(sorted(m)))
    how = data.draw(st.sampled_from(["flip", "truncate", "header", "rename", "meta", "drop"]))
    raw = bytearray(m[name])
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        m[name] = bytes(raw)
    elif how == "truncate":
        m[name] = bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    elif how == "header":
        shape = data.draw(st.lists(st.integers(0, 2**62), max_size=5))
        descr = data.draw(st.sampled_from(["<f8", "<f4", "|O", "<i8", "|b1", "<U7", "|V9"]))
        m[name] = npy_header(shape, descr) + bytes(raw[128:])
    elif how == "rename":
        m[data.draw(st.sampled_from(["x.npy", "hidden_states.-1.npy", "attentions.99.npy", "logits", "extra.a.npy",
                                     "hidden_states.9999999.npy"]))] = m.pop(name)
    elif how == "meta":
        buf = io.BytesIO()
        np.save(buf, np.array(json.dumps(data.draw(st.recursive(
            st.none() | st.integers() | st.text(max_size=5), lambda c: st.lists(c, max_size=3), max_leaves=20)))))
        m["meta.npy"] = buf.getvalue()
    else:
        del m[name]
    path = write_zip(tmp_path_factory.mktemp("fz") / "t.npz", m)
    try:
        tr = load(path)
    except MinibloomError as e:
        assert "t.npz" in str(e)
        return
    assert tr["input_ids"].ndim == 2
    report = diff_traces(tr, tr)  # a trace that loads can be diffed: against itself, every layer agrees exactly
    assert report.rows, report.table()
    for r in report.rows:  # a row fails only where the trace holds NaN or infinity (NaN - NaN is NaN)
        assert (r.max_abs == 0 and r.passed) or not np.isfinite(r.max_abs), report.table()


def test_header_struct_is_what_numpy_writes():
    assert npy_header((2, 3))[:6] == b"\x93NUMPY" and struct.unpack("<H", npy_header((2, 3))[8:10])[0] > 0
