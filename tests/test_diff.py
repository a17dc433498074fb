"""minibloom.trace.diff_traces and `minibloom diff`: the first layer that differs is found, exit codes are right.

Runs without torch: the planted deviations are made in a copy of the golden tiny checkpoint's parameters.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

import minibloom
from minibloom.cli import main
from minibloom.errors import MinibloomError
from minibloom.trace import diff_traces, load_trace, save_trace, trace

TINY = os.path.join(os.path.dirname(__file__), "golden", "tiny")
IDS = np.array([[5, 17, 42, 99, 3, 64, 8, 120], [3, 3, 11, 12, 13, 14, 15, 16]])
MASK = np.array([[1] * 8, [0, 0] + [1] * 6])


@pytest.fixture(scope="module")
def ref_model():
    return minibloom.load(TINY, dtype="float64")


@pytest.fixture(scope="module")
def ref_trace(ref_model):
    return trace(ref_model, IDS, MASK, attentions=True)


def planted(model, edit) -> minibloom.Bloom:
    """A copy of ``model`` whose params were changed by ``edit(params)``."""
    params = copy.deepcopy(model.params)
    edit(params)
    return minibloom.Bloom(model.config, params, "float64", path="planted")


def bump(w, rel=1e-6):
    """Change ``w`` in place by ~rel of its scale, differently per element (a uniform shift can vanish in a
    LayerNorm)."""
    w += rel * np.abs(w).max() * np.random.default_rng(0).standard_normal(w.shape)


@pytest.mark.parametrize("where, expected", [
    (lambda p: bump(p["word_embeddings_layernorm"]["bias"]), "embeddings"),
    (lambda p: bump(p["h"][0]["mlp"]["dense_4h_to_h"]["weight"]), "block 0"),
    (lambda p: bump(p["h"][1]["self_attention"]["dense"]["bias"]), "block 1 + ln_f"),
    (lambda p: bump(p["h"][1]["self_attention"]["query_key_value"]["weight"]), "block 1 attention"),
    (lambda p: bump(p["ln_f"]["weight"]), "block 1 + ln_f"),
])
def test_planted_parameter_deviation_is_found_at_its_layer(ref_model, ref_trace, where, expected):
    bad = trace(planted(ref_model, where), IDS, MASK, attentions=True)
    report = diff_traces(bad, ref_trace)  # float64 vs float64: the 1e-10 policy
    assert report.rtol == 1e-10
    assert not report.passed
    assert report.first_divergence.name == expected
    i = report.rows.index(report.first_divergence)
    assert all(r.passed for r in report.rows[:i]), "everything computed before the planted change must agree"
    assert all(r.max_abs == 0.0 for r in report.rows[:i]), "and agree bit for bit"
    assert f"first divergence: {expected}" in report.table()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_modified_hidden_state_is_named_by_the_cli(tmp_path, ref_trace, capsys, k):
    ref = save_trace(ref_trace, tmp_path / "ref.npz")
    mine = copy.deepcopy(ref_trace)
    for j in range(k, len(mine["hidden_states"])):  # a deviation at layer k propagates to every later layer
        mine["hidden_states"][j][0, 3] += 1e-7 * (j + 1)
    mine["logits"][0, 3] += 1e-7
    save_trace(mine, tmp_path / "mine.npz")
    assert main(["diff", str(tmp_path / "mine.npz"), ref]) == 1
    out = capsys.readouterr().out
    want = ["embeddings", "block 0", "block 1 + ln_f"][k]
    assert f"first divergence: {want} (hidden_states.{k})" in out
    table_rows = [line for line in out.splitlines() if line.endswith(("  ok", "  FAIL"))]
    assert sum(line.endswith("FAIL") for line in table_rows) == 4 - k  # hidden states k.. and the logits
    # a loose enough tolerance accepts the same files
    assert main(["diff", str(tmp_path / "mine.npz"), ref, "--atol", "1e-5"]) == 0
    assert "all layers agree" in capsys.readouterr().out


def test_identical_traces_pass_with_exit_0(tmp_path, ref_trace, capsys):
    p = save_trace(ref_trace, tmp_path / "a.npz")
    assert main(["diff", p, p]) == 0
    out = capsys.readouterr().out
    assert "all layers agree" in out and "FAIL" not in out and "top-1 token agreement: 100.00%" in out
    for name in ("embeddings", "block 0 attention", "block 0", "block 1 attention", "block 1 + ln_f", "logits"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


def test_default_tolerance_follows_the_less_precise_trace(ref_trace):
    f32 = trace(minibloom.load(TINY), IDS, MASK)
    report = diff_traces(f32, ref_trace)
    assert report.policy.kind == "float32" and report.passed  # float32 vs float64 policy
    assert report.rtol == minibloom.testing.FP32.at(2, 24).hidden_rel  # sized for the tiny model: 2 x 24
    strict = diff_traces(f32, ref_trace, rtol=1e-10)
    assert not strict.passed and strict.first_divergence.name == "embeddings"
    # no meta: the dtype is read from the arrays
    bare = {k: v for k, v in f32.items() if k != "meta"}
    bare["hidden_states"] = [h.astype(np.float16) for h in f32["hidden_states"]]
    bare["logits"] = f32["logits"].astype(np.float16)
    assert diff_traces(bare, ref_trace).rtol == minibloom.testing.FP16.at(2, 24).hidden_rel


def test_padded_positions_are_ignored_but_real_nan_fails(ref_trace):
    mine = copy.deepcopy(ref_trace)
    for h in mine["hidden_states"]:
        h[1, :2] = np.nan  # padding: any value is fine
    mine["logits"][1, :2] = 1e9
    assert diff_traces(mine, ref_trace).passed
    mine["hidden_states"][2][0, 0, 0] = np.nan
    report = diff_traces(mine, ref_trace)
    assert not report.passed and report.first_divergence.name == "block 1 + ln_f"
    assert np.isnan(report.first_divergence.max_abs)


def test_logits_only_dump_is_compared_on_logits(tmp_path, ref_trace, capsys):
    p = tmp_path / "other.npz"
    np.savez(p, input_ids=IDS, attention_mask=MASK, logits=ref_trace["logits"].astype(np.float32),
             meta=np.array(json.dumps({"dtype": "float32", "implementation": "my port"})))
    ref = save_trace(ref_trace, tmp_path / "ref.npz")
    assert main(["diff", str(p), ref]) == 0
    out = capsys.readouterr().out
    assert "hidden states only in" in out and "logits " in out


def test_uncomparable_traces_exit_2(tmp_path, ref_trace, capsys):
    ref = save_trace(ref_trace, tmp_path / "ref.npz")
    other = copy.deepcopy(ref_trace)
    other["input_ids"] = other["input_ids"].copy()
    other["input_ids"][0, 0] += 1
    save_trace(other, tmp_path / "ids.npz")
    assert main(["diff", str(tmp_path / "ids.npz"), ref]) == 2
    assert "different input_ids" in capsys.readouterr().err
    short = copy.deepcopy(ref_trace)
    short["hidden_states"] = short["hidden_states"][:2]
    short["attentions"] = short["attentions"][:1] if short.get("attentions") else None
    save_trace(short, tmp_path / "short.npz")
    assert main(["diff", str(tmp_path / "short.npz"), ref]) == 2
    assert "holds 2" in capsys.readouterr().err
    wide = copy.deepcopy(ref_trace)
    wide["logits"] = np.concatenate([wide["logits"], wide["logits"][..., :2]], -1)
    save_trace(wide, tmp_path / "wide.npz")
    assert main(["diff", str(tmp_path / "wide.npz"), ref]) == 2
    assert "logits: shape" in capsys.readouterr().err
    assert main(["diff", str(tmp_path / "missing.npz"), ref]) == 2
    assert "no such trace file" in capsys.readouterr().err
    with pytest.raises(MinibloomError, match="rtol"):
        diff_traces(ref_trace, ref_trace, rtol=-1)


def test_trace_cli_writes_a_loadable_trace(tmp_path, capsys):
    out = tmp_path / "t.npz"
    assert main(["trace", "--model", TINY, "--ids", "5,17,42", "--ids", "7", "--dtype", "float64",
                 "--attentions", "--out", str(out)]) == 0
    t = load_trace(out)
    assert t["input_ids"].shape == (2, 3) and t["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert len(t["hidden_states"]) == 3 and len(t["attentions"]) == 2 and t["meta"]["dtype"] == "float64"
    assert main(["trace", "--model", TINY, "--ids", "1,x", "--out", str(out)]) == 2
    assert "--ids" in capsys.readouterr().err
    assert main(["trace", "--model", TINY, "--out", str(out)]) == 2
