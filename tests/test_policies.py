"""Verdict policies (minibloom.testing) and their calibration (minibloom.oracle.calibrate).

The figures are checked against hand-computed values; the policies against ports the calibration never saw (a
fresh seed, and the trained models): every correct port passes its kind's policy, every planted bug that the
committed bug matrix calls separable fails it. The emulated ports stand in for the real engines (llama.cpp's f32
path is the ``float32-gelu-table`` port: GeLU through ggml's fp16 table); tests/test_engines.py runs the real ones.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import minibloom
from minibloom.oracle import calibrate as C
from minibloom.oracle import emulate as E
from minibloom import model as M
from minibloom.cli import main
from minibloom.errors import MinibloomError
from minibloom.testing import POLICIES, check_logits, limits, logit_metrics, policy_for
from minibloom.trace import diff_traces, save_trace, trace, verify_trace

pytestmark = pytest.mark.xdist_group("policies")  # one worker computes the calibration evidence once

ROOT = os.path.join(os.path.dirname(__file__), "..")
DEFAULT = os.path.join(ROOT, "weights", "default")
CALIB = os.path.join(ROOT, "weights", "calib-12h")
TEXT = os.path.join(ROOT, "data", "tinyshakespeare.txt")


def SIZE_OF(model):  # noqa: N802 - (n_layer, hidden_size), the size= a verdict is sized with
    return model.config.n_layer, model.config.hidden_size
with open(C.POLICY_FILE) as f:
    COMMITTED = json.load(f)


# ---- figures, by hand ------------------------------------------------------------------------------------------
def test_logit_metrics_by_hand():
    ref = np.zeros((1, 2, 2))  # vocab 2; position 0 uniform, position 1 favours token 0
    ref[0, 1] = [2.0, 0.0]
    act = np.zeros((1, 2, 2))
    act[0, 0] = [math.log(3.0), 0.0]  # q = (3/4, 1/4): same argmax as the tie broken to token 0
    act[0, 1] = [0.0, 2.0]  # the favourite swapped: argmax differs
    m = logit_metrics(act, ref)
    kl0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(ref || act) at position 0
    p0 = math.exp(2) / (math.exp(2) + 1)
    kl1 = (p0 - (1 - p0)) * 2.0  # sum p log(p/q) with q = p reversed
    assert m["rel"] == pytest.approx(2.0 / 2.0)
    assert m["kl_mean"] == pytest.approx((kl0 + kl1) / 2)
    assert m["kl_max"] == pytest.approx(max(kl0, kl1))
    assert m["top1"] == 0.5
    assert m["worst"] == (0, 1, 0) and m["positions"] == 2


def test_padding_never_counts_left_right_or_holes():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 6, 10))
    act = ref + 1e-9
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 1]])
    act[mask == 0] = 1e6  # garbage at every pad
    v = check_logits(act, ref, mask, "float32", size=(2, 64))
    assert v.passed, v.message()
    assert v.positions == int(mask.sum())
    act[2, 3, 4] += 1.0  # a real position
    v = check_logits(act, ref, mask, "float32", size=(2, 64))
    assert not v.passed and v.worst == (2, 3, 4)


def test_failure_message_names_position_token_values_policy_and_part():
    ref = np.random.default_rng(1).standard_normal((2, 5, 7))
    act = ref.copy()
    act[1, 3, 6] += 0.5
    ids = np.arange(10).reshape(2, 5) + 100
    v = check_logits(act.astype(np.float32), ref, np.ones((2, 5)), input_ids=ids, size=(2, 64))
    assert v.policy.kind == "float32" and v.failed and "rel" in v.failed
    msg = v.message()
    assert "row 1, position 3 (input token 108), token 6" in msg
    assert f"{act[1, 3, 6]:.6g} vs {ref[1, 3, 6]:.6g}" in msg
    assert "'float32'" in msg and "FAIL max|A-B| / max|B|" in msg
    assert "np.int64" not in msg


@pytest.mark.parametrize("name, kind", [
    ("float32", "float32"), ("f32", "float32"), ("fp16", "float16"), ("half", "float16"), ("bf16", "bfloat16"),
    ("torch.bfloat16", "bfloat16"), ("int8", "int8-dynamic"), ("int8_float32", "int8-dynamic"),
    ("int8-weight-only", "int8-weight-only"), ("Q8_0", "q8_0"), ("q4_0", "q4_0"), ("q5_1", "q4_0"),
    ("Q4_K_M", "q4_k"), ("q6_k", "q4_k"), ("nf4", "nf4"), ("fp4", "nf4"), ("bnb4", "nf4"), ("float64", "float64"),
    ("int4", "int4-weight-only"), ("w4a16", "int4-weight-only"), ("int4_sym", "int4-weight-only"),
    ("int4_asym", "int4-weight-only"), ("int4-weight-only", "int4-weight-only"),
    ("int8-activations", "int8-activations"), ("w8a8-same-weights", "int8-activations"),
])
def test_policy_names(name, kind):
    assert policy_for(name).kind == kind


def test_policy_for_numpy_dtypes_engines_and_unknown_names():
    assert policy_for(np.dtype(np.float16)).kind == "float16"
    assert policy_for("float32", "llama.cpp b4000 (f32)").kind == "float32-gelu-table"
    assert policy_for("float32", "CTranslate2 4.8.5").kind == "float32"
    with pytest.raises(MinibloomError, match="float8.*names no verdict policy"):
        policy_for("float8")


def test_every_kind_has_a_policy_with_every_part():
    for kind in E.KINDS:
        p = POLICIES[kind]
        assert p.rel > 0 and p.kl_mean > 0 and p.kl_max >= p.kl_mean and 0 <= p.top1 <= 1 and p.hidden_rel > 0
        assert p.reference in ("same file", "unquantized")


def test_committed_limits_sit_above_every_correct_figure_they_came_from():
    for kind, per_case in COMMITTED["correct_ports"].items():
        for case, m in per_case.items():
            lim = limits(COMMITTED["policies"][kind], *COMMITTED["sizes"][case])
            assert not C.verdict_of(m, lim), (kind, case, m, lim)
            assert m["hidden_rel"] <= lim["hidden_rel"]


def test_limits_grow_with_the_model_as_sqrt_of_depth_times_width():
    p = POLICIES["q8_0"]
    small, big = p.at(4, 256), p.at(16, 1024)  # scale 32 and 128
    assert big.rel == pytest.approx(4 * small.rel) and big.kl_mean == pytest.approx(16 * small.kl_mean)
    assert POLICIES["float32"].at(2, 64).rel == 2e-5  # the float32 floor
    v = check_logits(np.ones((1, 2, 3)), np.ones((1, 2, 3)) * 1.01, policy="q8_0", size=(4, 256))
    assert v.policy.size == (4, 256) and "sized for 4 x 256" in v.message()


# ---- held out: a seed the calibration never saw, and the trained models ----------------------------------------
def held_out_cases():
    cases = C.random_cases(1, seed0=7, shapes=C.RANDOM_SHAPES[:3]) + C.trained_cases([DEFAULT, CALIB], TEXT)
    assert any(c.trained for c in cases)
    return cases


@pytest.fixture(scope="module")
def evidence():
    """kind -> list of (case, correct-port metrics per port, bug -> metrics) on held-out cases (the bugs: those the
    committed matrix calls separable from the kind, the ones the held-out test checks)."""
    out = {kind: [] for kind in E.KINDS}
    for case in held_out_cases():
        for kind in E.KINDS:
            params = E.file_weights(kind, case.params)
            ref = M.forward_outputs(params, case.ids, case.mask, case.cfg, hidden_states=True)
            ref = (ref.logits, ref.hidden_states)
            correct = []
            for port in E.ports_for(kind):
                prepared = E.prepare(port, params)
                correct.append((port.name, C.metrics(E.run_port(port, None, prepared, case.cfg, case.ids,
                                                                case.mask), ref, case.mask)))
            port = E.ports_for(kind)[0]
            prepared = E.prepare(port, params)
            separable = [b for b, cell in COMMITTED["bug_matrix"][kind].items() if cell["separable"]]
            bugs = {bug: C.metrics(E.run_port(port, bug, prepared, case.cfg, case.ids, case.mask), ref, case.mask)
                    for bug in separable if E.applies(bug, case.cfg, case.mask)}
            out[kind].append((case.name, (case.cfg.n_layer, case.cfg.hidden_size), correct, bugs))
    return out


@pytest.mark.parametrize("kind", E.KINDS)
def test_correct_ports_pass_on_held_out_cases(evidence, kind, record):
    worst = 0.0
    for case, size, correct, _ in evidence[kind]:
        pol = limits(COMMITTED["policies"][kind], *size)
        for port, m in correct:
            assert not C.verdict_of(m, pol), f"{port} on {case}: {m} against {pol}"
            worst = max(worst, m["rel"] / pol["rel"])
    record(f"{kind}: worst rel / limit", worst)


@pytest.mark.parametrize("kind", E.KINDS)
def test_separable_bugs_fail_on_held_out_cases(evidence, kind):
    matrix = COMMITTED["bug_matrix"][kind]
    separable = [bug for bug, cell in matrix.items() if cell["separable"]]
    assert separable
    if kind in ("float32", "float32-gelu-table", "float16"):  # the statistical kinds' limits cover every weight scale
        assert {"pads-attended", "causal-off-by-one", "qkv-blocks", "untied-head"} <= set(separable)
    for case, size, correct, bugs in evidence[kind]:
        # sized as assert_logits_close / verify size it: by the model, and a statistical kind by its probe (the
        # worst of the kind's emulated ports on this case)
        probe = {f: max(m[f] for _, m in correct) for f in ("rel", "kl_mean", "kl_max")}
        pol = C._case_limits(COMMITTED["policies"][kind], size, probe if "probe" in COMMITTED["policies"][kind]
                             else None)
        for bug in separable:
            if bug in bugs:
                assert C.verdict_of(bugs[bug], pol), f"{bug} passed {kind} on {case}: {bugs[bug]}"


def test_strict_float32_catches_what_noise_hides_elsewhere():
    """float32 separates the activation bugs that the quantized kinds cannot (their noise is larger)."""
    matrix = COMMITTED["bug_matrix"]
    for bug in ("layernorm-eps", "layernorm-unbiased", "alibi-scaled", "scale-1/D"):
        assert matrix["float32"][bug]["separable"]
        assert not matrix["int8-dynamic"][bug]["separable"]


def test_float32_on_the_same_weights_separates_every_bug_that_moves_the_logits():
    """The same-weights path: every planted bug fails float32 on int8 and int4 weights, except the two whose effect
    on the quietest random checkpoints (weight std 0.02) stays below float32's floor."""
    same = COMMITTED["same_weights_matrix"]
    for column in ("float32 on int8", "float32 on int4"):
        missed = {bug for bug, cell in same[column].items() if not cell["separable"]}
        assert missed <= {"gelu-erf", "softmax-half"}, (column, missed)
        assert all(same[column][bug]["rel"] < 2e-5 for bug in missed)
    assert set(same["float32 on int8"]) == set(E.BUGS)


# ---- the llama.cpp f32 stand-in -----------------------------------------------------------------------------
def test_gelu_table_matches_ggml_rules():
    x = np.array([-12.0, -10.0, -1.0, 0.0, 0.5, 1.2345678, 9.99, 10.0, 30.0], np.float32)
    y = E.gelu_table(x)
    assert y[0] == 0.0 and y[1] == 0.0 and y[-1] == 30.0 and y[-2] == 10.0
    h = np.float32(np.float16(x[5]))
    exact = 0.5 * h * (1 + math.tanh(math.sqrt(2 / math.pi) * h * (1 + 0.044715 * h * h)))
    assert y[5] == np.float32(np.float16(exact))  # the input and the table entry are fp16 values


@pytest.fixture(scope="module")
def trained():
    return minibloom.load(DEFAULT, dtype="float64")


def _ggml_f32_trace(model, ids, mask):
    port = E.ports_for("float32-gelu-table")[0]
    prepared = E.prepare(port, model.params)
    logits, hidden = E.run_port(port, None, prepared, model.config, ids, mask)
    return {"input_ids": ids, "attention_mask": mask, "logits": logits, "hidden_states": hidden,
            "meta": {"dtype": "float32", "implementation": "llama.cpp (stand-in: ggml f32 GeLU table)"}}


def test_llama_cpp_f32_stand_in_passes_its_policy_and_not_blas_float32(trained):
    ids = np.random.default_rng(3).integers(0, 2000, (2, 20))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    cand = _ggml_f32_trace(trained, ids, mask)
    ref = trace(trained, ids, mask)
    report = diff_traces(cand, ref)
    assert report.policy.kind == "float32-gelu-table" and report.passed, report.table()
    strict = check_logits(cand["logits"], ref["logits"], mask, "float32", size=SIZE_OF(trained))
    assert not strict.passed  # why the kind exists: the table GeLU is not float32 rounding


def test_a_float32_candidate_of_a_gguf_reference_gets_the_ggml_policy(trained):
    ids = np.arange(1, 17)[None]
    cand = _ggml_f32_trace(trained, ids, np.ones_like(ids))
    cand["meta"] = {"dtype": "float32"}  # no engine named
    ref = trace(trained, ids)
    assert diff_traces(cand, ref).policy.kind == "float32"
    ref["meta"]["model"] = "bloom.f32.gguf"
    assert diff_traces(cand, ref).policy.kind == "float32-gelu-table"


def test_verify_of_a_float32_candidate_against_a_gguf_file_gets_the_ggml_policy(trained, tmp_path):
    """verify sizes and picks the policy itself: a float32 candidate judged against a .gguf file is a ggml port."""
    from minibloom.gguf import convert_hf_to_gguf

    path = convert_hf_to_gguf(DEFAULT, tmp_path / "default.f32.gguf", "f32")
    ids = np.arange(1, 17)[None]
    cand = _ggml_f32_trace(trained, ids, np.ones_like(ids))
    cand["meta"] = {"dtype": "float32"}  # no engine named
    report = verify_trace(cand, str(path))
    assert report.policy.kind == "float32-gelu-table" and report.passed, report.table()


# ---- diff and verify on a quantized port ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def q8_case(trained, tmp_path_factory):
    """The trained model's Q8_0 weights; a correct ggml-style Q8_0 port's trace and one with the pads attended."""
    params = E.file_weights("q8_0", trained.params)
    model = minibloom.Bloom(trained.config, params, "float64", tokenizer=trained.tokenizer, path="q8_0 weights")
    with open(TEXT, encoding="utf-8") as f:
        enc = trained.encode(f.read()[-3000:])
    row = np.asarray(getattr(enc, "ids", enc))[:24]
    ids = np.stack([row, np.concatenate([np.full(6, 3), row[:18]])])
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    port = E.ports_for("q8_0")[0]
    prepared = E.prepare(port, params)
    d = tmp_path_factory.mktemp("q8")
    paths = {}
    for name, bug in (("correct", None), ("pads", "pads-attended")):
        logits, hidden = E.run_port(port, bug, prepared, trained.config, ids, mask)
        paths[name] = save_trace({"input_ids": ids, "attention_mask": mask, "logits": logits.astype(np.float32),
                                  "meta": {"dtype": "q8_0", "implementation": "ggml-style emulation"}},
                                 d / f"{name}.npz")
    paths["ref"] = save_trace(trace(model, ids, mask), d / "ref.npz")
    return model, paths


def test_diff_cli_judges_a_q8_0_port_by_its_kind(q8_case, capsys):
    _, paths = q8_case
    assert main(["diff", paths["correct"], paths["ref"]]) == 0
    out = capsys.readouterr().out
    assert "policy: q8_0" in out and "KL mean" in out and "top-1 agreement" in out
    assert main(["diff", paths["pads"], paths["ref"]]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "row 1, position" in out


def test_verify_cli_and_api_take_external_logits(q8_case, capsys, tmp_path):
    model, paths = q8_case

    assert verify_trace(paths["correct"], model).passed
    assert not verify_trace(paths["pads"], model).passed
    ids = np.random.default_rng(5).integers(0, 2000, (2, 12))
    mine = minibloom.load(DEFAULT, dtype="float32")
    cand = save_trace({"input_ids": ids, "logits": mine(ids), "meta": {"dtype": "float32"}}, tmp_path / "c.npz")
    assert main(["verify", cand, "--model", DEFAULT, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["passed"] and out["policy"] == "float32" and out["rel"] < 1e-5
    assert main(["verify", cand, "--model", DEFAULT, "--kind", "nope"]) == 2


def test_diff_rejects_bad_tolerances(q8_case):
    _, paths = q8_case
    for bad in (float("nan"), -1.0, "x"):
        with pytest.raises(MinibloomError, match="rtol"):
            diff_traces(paths["correct"], paths["ref"], rtol=bad)


# ---- transformers as a real port ------------------------------------------------------------------------------
def test_transformers_half_precision_passes_and_a_dropped_mask_fails(trained):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")  # hf_logits returns None without it
    ids = np.random.default_rng(9).integers(4, 2000, (2, 24))
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    ref = trained(ids, mask)
    for kind in ("float16", "bfloat16", "float32"):
        out = C.hf_logits(trained.params, trained.config, ids, mask, kind)
        v = check_logits(torch.from_numpy(out[0]).to(getattr(torch, kind)), ref, mask, input_ids=ids,
                         size=SIZE_OF(trained))
        assert v.policy.kind == kind and v.passed, v.message()
        bad = C.hf_logits(trained.params, trained.config, ids, np.ones_like(mask), kind)[0]
        assert not check_logits(bad, ref, mask, kind, size=SIZE_OF(trained)).passed


def test_float32_logits_against_a_gguf_file_get_the_ggml_policy(trained, tmp_path):
    from minibloom.gguf import convert_hf_to_gguf
    from minibloom.testing import assert_logits_close

    path = convert_hf_to_gguf(DEFAULT, tmp_path / "default.f32.gguf", outtype="f32")
    ids = np.random.default_rng(4).integers(4, 2000, (1, 16))
    cand = _ggml_f32_trace(trained, ids, np.ones_like(ids))["logits"].astype(np.float32)
    assert assert_logits_close(cand, str(path), ids) > 2e-5  # passes: float32-gelu-table, sized for 4 x 256
    with pytest.raises(AssertionError, match="policy 'float32'"):
        assert_logits_close(cand, DEFAULT, ids)  # the same numbers judged as a BLAS-order float32 port


def test_readme_shows_the_committed_calibration():
    """The oracle guide's tables are `minibloom calibrate`'s output for the committed policies.json, to the letter."""
    md = C.markdown(COMMITTED["policies"], COMMITTED["bug_matrix"], COMMITTED["cases"],
                    COMMITTED["same_weights_matrix"])
    with open(os.path.join(ROOT, "docs", "oracle.md"), encoding="utf-8") as f:
        assert md in f.read()


def test_one_disagreement_is_always_allowed():
    from minibloom.testing import top1_fails

    assert not top1_fails(5 / 6, 6, 0.98)  # one flip in six positions: a near-tie
    assert top1_fails(4 / 6, 6, 0.98)
    assert top1_fails(0.90, 100, 0.95) and not top1_fails(0.95, 100, 0.95)
