"""Limits the candidate cannot bend (issue 26, item 4): a verdict is sized by the model or the reference trace, never
by the candidate's meta; meta sizes are validated; ``check_logits`` refuses to guess a size for a calibrated kind.

Runs without torch, on the golden tiny checkpoint (2 blocks x 24).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import minibloom
from minibloom.cli import main
from minibloom.errors import MinibloomError
from minibloom.testing import POLICIES, check_logits, policy_for
from minibloom.trace import diff_traces, save_trace, trace, verify_trace

TINY = os.path.join(os.path.dirname(__file__), "golden", "tiny")
IDS = np.array([[5, 17, 42, 99, 3, 64, 8, 120], [3, 3, 11, 12, 13, 14, 15, 16]])
MASK = np.array([[1] * 8, [0, 0] + [1] * 6])


@pytest.fixture(scope="module")
def ref_trace():
    return trace(minibloom.load(TINY, dtype="float64"), IDS, MASK)


def logits_only(tr: dict, scale: float = 1.0, **meta) -> dict:
    """A logits-only trace of ``tr``'s input, its logits times ``scale``, with ``meta``."""
    return {"input_ids": tr["input_ids"], "attention_mask": tr["attention_mask"], "logits": tr["logits"] * scale,
            "meta": meta}


# ---- check_logits -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["float32", "float16", "int8", "int4", "q8_0", "nf4"])
def test_check_logits_refuses_to_guess_a_size_for_a_calibrated_kind(kind):
    ref = np.random.default_rng(0).standard_normal((1, 4, 8))
    with pytest.raises(MinibloomError, match=r"size=\(n_layer, hidden_size\)"):
        check_logits(ref, ref, policy=kind)
    assert check_logits(ref, ref, policy=kind, size=(2, 64)).passed
    assert check_logits(ref, ref, policy=policy_for(kind, size=(2, 64))).passed  # a policy sized already


def test_check_logits_of_a_dtype_needs_a_size_too():
    ref = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    with pytest.raises(MinibloomError, match="size"):
        check_logits(ref, ref)


def test_a_bare_number_and_float64_need_no_size():
    ref = np.random.default_rng(0).standard_normal((1, 4, 8))
    assert check_logits(ref * (1 + 1e-4), ref, policy=1e-3).passed
    assert not check_logits(ref * (1 + 1e-2), ref, policy=1e-3).passed
    assert check_logits(ref, ref, policy="float64").passed


@pytest.mark.parametrize("size, key", [((1e30, 64), "n_layer"), ((10 ** 400, 64), "n_layer"), ((2, 0), "hidden_size"),
                                       ((True, 64), "n_layer"), ((2, 65537), "hidden_size"), ((2.0, 64), "n_layer")])
def test_bad_sizes_are_minibloom_errors_naming_the_key(size, key):
    ref = np.ones((1, 2, 3))
    with pytest.raises(MinibloomError, match=key):
        check_logits(ref, ref, policy="float32", size=size)
    with pytest.raises(MinibloomError, match=key):
        POLICIES["float32"].at(*size)


# ---- traces: meta sizes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta, key", [
    ({"n_layer": 1e30, "hidden_size": 1e30}, "n_layer"),
    ({"n_layer": 10 ** 400, "hidden_size": 24}, "n_layer"),
    ({"n_layer": 2, "hidden_size": -24}, "hidden_size"),
    ({"n_layer": "2", "hidden_size": 24}, "n_layer"),
    ({"n_layer": 2}, "hidden_size"),
])
def test_meta_sizes_are_validated(ref_trace, meta, key):
    cand = logits_only(ref_trace, dtype="float32", **meta)
    with pytest.raises(MinibloomError, match=key):
        diff_traces(cand, ref_trace)
    with pytest.raises(MinibloomError, match=key):
        verify_trace(cand, TINY)


def test_a_400_digit_n_layer_in_a_file_is_a_minibloom_error(ref_trace, tmp_path):
    cand = logits_only(ref_trace, dtype="float32")
    path = save_trace(cand, tmp_path / "cand.npz")
    with np.load(path) as z:
        arrays = dict(z)
    arrays["meta"] = np.array('{"dtype": "float32", "n_layer": ' + "9" * 400 + ', "hidden_size": 24}')
    np.savez(tmp_path / "huge.npz", **arrays)
    with pytest.raises(MinibloomError, match="n_layer"):
        diff_traces(str(tmp_path / "huge.npz"), ref_trace)
    assert main(["verify", str(tmp_path / "huge.npz"), "--model", TINY]) == 2


def test_the_candidate_cannot_size_its_own_verdict(ref_trace):
    """Logits 5x off with meta claiming the largest model the bounds allow: refused (the size disagrees with the
    reference), and without that meta they FAIL under both diff and verify."""
    for huge in ({"n_layer": 4096, "hidden_size": 65536}, {"n_layer": 2, "hidden_size": 65536}):
        cand = logits_only(ref_trace, 5.0, dtype="int8", **huge)
        with pytest.raises(MinibloomError, match="disagree"):
            diff_traces(cand, ref_trace)
        with pytest.raises(MinibloomError, match="disagree"):
            verify_trace(cand, TINY)
    cand = logits_only(ref_trace, 5.0, dtype="int8")
    assert not diff_traces(cand, ref_trace).passed
    report = verify_trace(cand, TINY)
    assert not report.passed and report.policy.size == (2, 24)
    right = logits_only(ref_trace, 1.0, dtype="int8", n_layer=2, hidden_size=24)
    assert diff_traces(right, ref_trace).passed and verify_trace(right, TINY).passed


def test_a_logits_only_reference_sizes_from_its_meta_or_refuses(ref_trace):
    ref = logits_only(ref_trace, dtype="float64", n_layer=2, hidden_size=24)
    assert diff_traces(logits_only(ref_trace, dtype="float32"), ref).policy.size == (2, 24)
    bare = logits_only(ref_trace, dtype="float64")
    cand = logits_only(ref_trace, dtype="float32", n_layer=2, hidden_size=24)  # the candidate's word is not enough
    with pytest.raises(MinibloomError, match="size is unknown"):
        diff_traces(cand, bare)
    assert diff_traces(cand, bare, rtol=1e-6).passed  # an explicit tolerance needs no size


def test_reference_meta_disagreeing_with_its_own_hidden_states_is_refused(ref_trace):
    ref = {**ref_trace, "meta": {**ref_trace["meta"], "n_layer": 3}}
    with pytest.raises(MinibloomError, match="disagree"):
        diff_traces(ref_trace, ref)


# ---- unknown kinds -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta, key", [({"kind": "float8"}, "kind"), ({"dtype": "int3"}, "dtype"),
                                       ({"kind": 7}, "kind")])
def test_an_unknown_meta_kind_or_dtype_is_an_error(ref_trace, meta, key):
    cand = logits_only(ref_trace, **meta)
    with pytest.raises(MinibloomError, match=f"meta '{key}'"):
        diff_traces(cand, ref_trace)
    with pytest.raises(MinibloomError, match=f"meta '{key}'"):
        verify_trace(cand, TINY)
    assert verify_trace(cand, TINY, kind="float32").passed  # --kind overrides it


def test_verify_cli_refuses_an_unknown_kind_in_one_line(ref_trace, tmp_path, capsys):
    path = save_trace(logits_only(ref_trace, kind="float8"), tmp_path / "c.npz")
    assert main(["verify", str(path), "--model", TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "float8" in err and "kind" in err
