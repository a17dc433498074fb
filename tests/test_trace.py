"""minibloom.trace: traces agree with transformers' hidden states (float64, patched) and round-trip through .npz."""

from __future__ import annotations

import json

import numpy as np
import pytest

import minibloom
from minibloom.errors import MinibloomError
from minibloom.testing import FP32, FP64_VS_HF, assert_rel_close
from minibloom.trace import load_trace, save_trace, trace
from factory import hf_float64_exact, left_pad, make_model, random_ids, save

torch = pytest.importorskip("torch")

CHECKPOINTS = {  # different head counts: power of two, the extra-slope rule, one head
    "4-heads": dict(seed=11, hidden=64, n_head=4, n_layer=3),
    "6-heads": dict(seed=12, hidden=48, n_head=6, n_layer=3),
    "12-heads": dict(seed=13, hidden=96, n_head=12, n_layer=2),
    "1-head-post-ln": dict(seed=14, hidden=16, n_head=1, n_layer=2, post_ln=True),
}


def hf_outputs(model, ids, mask, dtype=torch.float64):
    m = model.to(dtype)
    with torch.no_grad():
        out = m(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True,
                output_attentions=True)
    model.to(torch.float32)
    return out


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_trace_matches_transformers_float64(tmp_path, name, record):
    cfg = dict(CHECKPOINTS[name])
    model = make_model(**cfg)
    path = save(model, tmp_path / name)
    ids, mask = left_pad([list(random_ids(256, 10, seed=cfg["seed"])), list(random_ids(256, 6, seed=cfg["seed"] + 1))])
    tr = trace(path, ids, mask, attentions=True, dtype="float64")
    with hf_float64_exact():
        ref = hf_outputs(model, ids, mask)
    real = mask.astype(bool)
    assert len(tr["hidden_states"]) == len(ref.hidden_states) == cfg["n_layer"] + 1
    worst = 0.0
    for i, (a, b) in enumerate(zip(tr["hidden_states"], ref.hidden_states)):
        assert a.dtype == np.float64
        worst = max(worst, assert_rel_close(a[real], b.numpy()[real], FP64_VS_HF, f"hidden_states.{i}"))
    for i, (a, b) in enumerate(zip(tr["attentions"], ref.attentions)):
        q = np.moveaxis(a, 1, 2)[real], np.moveaxis(b.numpy(), 1, 2)[real]
        worst = max(worst, assert_rel_close(*q, FP64_VS_HF, f"attentions.{i}"))
    worst = max(worst, assert_rel_close(tr["logits"][real], ref.logits.numpy()[real], FP64_VS_HF, "logits"))
    record(f"trace vs HF fp64 ({name})", worst)


def test_float32_trace_matches_transformers_float32(tmp_path):
    model = make_model(seed=15, hidden=48, n_head=6, n_layer=3)
    path = save(model, tmp_path / "m")
    ids = random_ids(256, (2, 9), seed=16)
    tr = trace(minibloom.load(path), ids)
    assert tr["meta"]["dtype"] == "float32" and tr["logits"].dtype == np.float32
    ref = hf_outputs(model, ids, np.ones_like(ids), dtype=torch.float32)
    for i, (a, b) in enumerate(zip(tr["hidden_states"], ref.hidden_states)):
        assert_rel_close(a, b.numpy(), FP32, f"hidden_states.{i}")
    assert tr["attentions"] is None


def test_save_load_round_trip_is_exact(tmp_path):
    model = make_model(seed=17, hidden=32, n_head=4, n_layer=2)
    path = save(model, tmp_path / "m")
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]])
    tr = trace(path, ids, mask, attentions=True)
    out = save_trace(tr, tmp_path / "t.npz")
    back = load_trace(out)
    assert np.array_equal(back["input_ids"], ids) and np.array_equal(back["attention_mask"], mask)
    for name in ("hidden_states", "attentions"):
        assert len(back[name]) == len(tr[name])
        for a, b in zip(back[name], tr[name]):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(back["logits"], tr["logits"])
    assert back["meta"]["dtype"] == "float64" and back["meta"]["version"] == 1
    with np.load(out, allow_pickle=False) as z:  # the documented keys, readable without minibloom
        assert set(z.files) == {"input_ids", "attention_mask", "logits", "meta", "hidden_states.0", "hidden_states.1",
                                "hidden_states.2", "attentions.0", "attentions.1"}
        assert json.loads(str(z["meta"]))["n_layer"] == 2


def test_numpy_only_writer_with_stacked_layers_is_readable(tmp_path):
    """Another implementation writes the format with plain np.savez, stacked layers, no meta."""
    rng = np.random.default_rng(0)
    hs = rng.standard_normal((4, 1, 5, 8)).astype(np.float16)
    p = tmp_path / "other.npz"
    np.savez(p, input_ids=np.arange(5), hidden_states=hs, logits=rng.standard_normal((1, 5, 11)))
    t = load_trace(p)
    assert t["input_ids"].shape == (1, 5) and t["attention_mask"].sum() == 5
    assert len(t["hidden_states"]) == 4 and np.array_equal(t["hidden_states"][2], hs[2])
    assert t["meta"] == {}


@pytest.mark.parametrize("arrays, message", [
    (dict(logits=np.zeros((1, 3, 4))), "missing key 'input_ids'"),
    (dict(input_ids=np.arange(3.0), logits=np.zeros((1, 3, 4))), "must be integers"),
    (dict(input_ids=np.arange(3)), "neither 'logits' nor hidden states"),
    (dict(input_ids=np.arange(3), logits=np.zeros((1, 4, 4))), "logits: shape (1, 4, 4)"),
    (dict(input_ids=np.arange(3), **{"hidden_states.0": np.zeros((1, 3, 2)), "hidden_states.2": np.zeros((1, 3, 2))}),
     "hidden_states.1 is missing"),
    (dict(input_ids=np.arange(3), logits=np.zeros((1, 3, 4)), foo=np.zeros(1)), "unknown key 'foo'"),
    (dict(input_ids=np.arange(3), logits=np.zeros((1, 3, 4)), meta=np.array("{not json")), "not valid JSON"),
    (dict(input_ids=np.arange(3), logits=np.zeros((1, 3, 4)), attention_mask=np.array([1, 2, 1])), "attention_mask"),
    (dict(input_ids=np.arange(3), hidden_states=np.zeros((2, 1, 3, 2)), **{"hidden_states.0": np.zeros((1, 3, 2))}),
     "both a stacked"),
])
def test_bad_trace_files_name_the_problem(tmp_path, arrays, message):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(MinibloomError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_trace(p)
    assert "bad.npz" in str(e.value)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(MinibloomError, match="no such trace file"):
        load_trace(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(MinibloomError, match="junk.npz: not a .npz trace"):
        load_trace(tmp_path / "junk.npz")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, input_ids=np.arange(2), logits=np.zeros((1, 2, 2)), meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(MinibloomError, match="meta.npy': holds Python objects"):  # pickles are never loaded
        load_trace(pickled)
