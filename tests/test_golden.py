"""minibloom against the committed golden files (tests/golden/, made by scripts/make_golden.py from transformers in
float64 with its softmax and slopes patched). NumPy only: this is the check downstream CI can run without torch.
minibloom runs through both primitive sets (``load``/``primitives`` in conftest.py) and must match with each."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from minibloom.formats.loading import default_model_path
from minibloom.testing import FP32, FP64_VS_HF, assert_logits_close, assert_rel_close
from minibloom.trace import diff_traces, load_trace, trace

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def sha256(directory):
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def golden_sets():
    sets = [("tiny", os.path.join(GOLDEN, "tiny"))]
    if os.path.exists(os.path.join(GOLDEN, "default.trace.npz")):
        sets.append(("default", default_model_path()))
    return sets


@pytest.fixture(params=golden_sets(), ids=lambda s: s[0])
def golden(request):
    name, checkpoint = request.param
    if name == "default" and not os.path.isfile(os.path.join(checkpoint, "config.json")):
        pytest.skip(f"{checkpoint} is not present (weights/default is part of a full clone)")
    expected = load_trace(os.path.join(GOLDEN, f"{name}.trace.npz"))
    if sha256(checkpoint) != expected["meta"]["weights_sha256"]:
        pytest.fail(f"{checkpoint}: the weights changed since tests/golden/{name}.trace.npz was made; "
                    "regenerate it with `python scripts/make_golden.py`")
    return checkpoint, expected


def test_golden_files_are_transformers_float64(golden):
    _, expected = golden
    meta = expected["meta"]
    assert meta["dtype"] == "float64" and meta["implementation"].startswith("transformers")
    assert meta["patched"] == "float64 softmax and ALiBi slopes"
    assert all(h.dtype == np.float64 for h in expected["hidden_states"]) and expected["logits"].dtype == np.float64


def test_float64_matches_golden_layer_by_layer(golden, load, record):
    checkpoint, expected = golden
    ids, mask = expected["input_ids"], expected["attention_mask"]
    got = trace(load(checkpoint, dtype="float64"), ids, mask, attentions=expected["attentions"] is not None)
    real = mask.astype(bool)
    worst = 0.0
    for i, (a, b) in enumerate(zip(got["hidden_states"], expected["hidden_states"], strict=True)):
        worst = max(worst, assert_rel_close(a[real], b[real], FP64_VS_HF, f"hidden_states.{i}"))
    for i, (a, b) in enumerate(zip(got["attentions"] or [], expected["attentions"] or [], strict=True)):
        worst = max(worst, assert_rel_close(np.moveaxis(a, 1, 2)[real], np.moveaxis(b, 1, 2)[real], FP64_VS_HF,
                                            f"attentions.{i}"))
    worst = max(worst, assert_rel_close(got["logits"][real], expected["logits"][real], FP64_VS_HF, "logits"))
    record("fp64 vs golden", worst)
    report = diff_traces(got, expected)
    assert report.passed and report.rtol == FP64_VS_HF.rel, report.table()


def test_float32_matches_golden_and_the_check_can_fail(golden, load, record):
    checkpoint, expected = golden
    ids, mask = expected["input_ids"], expected["attention_mask"]
    logits32 = load(checkpoint)(ids, mask)
    real = mask.astype(bool)
    err = record("fp32 vs golden", assert_rel_close(logits32[real], expected["logits"][real], FP32, "float32 logits"))
    assert err > FP64_VS_HF.rel, "float32 must fail the float64 tolerance, or the golden check proves nothing"
    with pytest.raises(AssertionError, match="relative max error"):
        assert_rel_close(logits32[real], expected["logits"][real], FP64_VS_HF)


def test_assert_logits_close_accepts_the_golden_logits(golden):
    """The golden (transformers) logits, given as 'another implementation', pass minibloom's own oracle check."""
    checkpoint, expected = golden
    ids, mask = expected["input_ids"], expected["attention_mask"]
    err = assert_logits_close(expected["logits"], checkpoint, ids, mask)  # float64 -> 1e-10 policy
    assert err <= FP64_VS_HF.rel
    assert_logits_close(expected["logits"].astype(np.float32), checkpoint, ids, mask)  # float32 -> 1e-4
    off = expected["logits"].copy()
    off[0, -1, 0] += 1e-3 * np.abs(off).max()
    with pytest.raises(AssertionError, match="minibloom diff"):
        assert_logits_close(off.astype(np.float32), checkpoint, ids, mask)
