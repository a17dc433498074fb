"""The calibration's bug emulations and weight schemes (issue 26, items 3 and 5; issue 27's calibrate inputs).

Each new planted bug, run in float32 on the *same* quantized weights as the float64 reference (the same-weights
path), must fail the float32 policy; the correct float32 port on those weights must pass it. The group-wise
quantizers are checked against hand-made groups; ``minibloom calibrate`` refuses bad inputs before any work.
"""

from __future__ import annotations

import numpy as np
import pytest

from minibloom import model as M
from minibloom.cli import main
from minibloom.config import BloomConfig
from minibloom.errors import MinibloomError
from minibloom.oracle import calibrate as C
from minibloom.oracle import emulate as E
from minibloom.testing import check_logits

NEW_BUGS = ("alibi-scaled", "slopes-reversed", "layernorm-unbiased", "layernorms-swapped", "embedding-ln-skipped",
            "final-ln-skipped", "layer-dropped", "softmax-no-max-f16")


@pytest.fixture(scope="module")
def tiny():
    cfg = BloomConfig(vocab_size=256, hidden_size=64, n_layer=3, n_head=8)
    params = C.random_checkpoint(cfg, 256, seed=11, std=0.08)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 256, (4, 16))
    return cfg, params, ids, C.calibration_mask(4, 16)


@pytest.mark.parametrize("scheme", sorted(C.SAME_WEIGHTS))
def test_every_new_bug_fails_float32_on_the_same_quantized_weights(tiny, scheme):
    cfg, params, ids, mask = tiny
    weights = E.map_matrices(params, C.SAME_WEIGHTS[scheme], head=False)
    ref = M.forward(weights, ids, mask, cfg)  # float64 on the quantized weights
    port = E.ports_for("float32")[1]  # the reference primitives in float32
    prepared = E.prepare(port, weights)
    size = (cfg.n_layer, cfg.hidden_size)
    good = E.run_port(port, None, prepared, cfg, ids, mask)[0]
    assert check_logits(good, ref, mask, "float32", size=size).passed
    for bug in NEW_BUGS:
        assert E.applies(bug, cfg, mask)
        bad = E.run_port(port, bug, prepared, cfg, ids, mask)[0]
        v = check_logits(bad, ref, mask, "float32", size=size)
        assert not v.passed, f"{bug} on {scheme} weights passed float32: {v.message()}"


def test_the_new_bugs_do_what_they_say():
    x = np.array([[1.0, 2.0, 4.0, 7.0]])
    xc = x - x.mean()
    want = xc / np.sqrt(np.sum(xc * xc) / 3 + 1e-5)
    assert np.allclose(E.layer_norm_unbiased(x, 1.0, 0.0, 1e-5), want, rtol=1e-12)
    s = E.softmax_no_max_half(np.array([[0.0, 1.0, 2.0], [0.0, 12.0, 1.0], [11.5, 12.0, 1.0]]))
    assert np.allclose(s[0], np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum(), rtol=2e-3)  # small scores: fine
    assert np.isnan(s[1, 1]) and s[1, 0] == 0.0  # exp(12) overflows float16: inf / inf, the rest 0
    assert np.isnan(s[2, 0]) and np.isnan(s[2, 1])


@pytest.mark.parametrize("bits, group, sym", [(4, 32, True), (4, 64, False), (4, 128, True), (8, 64, False)])
def test_group_quantizers_by_hand(bits, group, sym):
    w = np.random.default_rng(bits * group).standard_normal((6, 192)) * 0.05
    q = E.quant_groups(w, bits, group, sym)
    for g in range(0, 192, group):
        blk, qb = w[:, g:g + group], q[:, g:g + group]
        for row, qrow in zip(blk, qb):
            if sym:
                step = np.max(np.abs(row)) / (2 ** (bits - 1) - 1)
                levels = qrow / step
                assert np.all(levels >= -(2 ** (bits - 1)) - 1e-9) and np.all(levels <= 2 ** (bits - 1) - 1 + 1e-9)
            else:
                step = (row.max() - row.min()) / (2 ** bits - 1)
            assert np.allclose(qrow / step, np.rint(qrow / step), atol=1e-6)  # on the grid
            assert np.max(np.abs(qrow - row)) <= step / 2 + 1e-12  # round to nearest
            assert len(np.unique(np.round(qrow / step, 6))) <= 2 ** bits


def test_int4_ports_cover_both_schemes_and_three_group_sizes():
    names = [p.name for p in E.ports_for("int4-weight-only")]
    assert {n.split()[1] for n in names} == {"group-32", "group-64", "group-128"}
    assert any("asym" in n for n in names) and any(" sym" in n for n in names)


# ---- calibrate's inputs, checked before any work ----------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["--seeds", "1000000000"], "--seeds"),
    (["--seeds", "0"], "--seeds"),
    (["--markdown", "/nonexistent-dir/x.md"], "--markdown"),
    (["--write", "/nonexistent-dir/p.json"], "--write"),
    (["--text", "/nonexistent-file.txt"], "--text"),
    (["--trained", "/nonexistent-dir"], "--trained"),
])
def test_calibrate_refuses_bad_inputs_at_the_start(argv, option, capsys):
    assert main(["calibrate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err


def test_calibrate_refuses_text_that_is_not_utf8_or_not_a_file(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert main(["calibrate", "--text", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--text" in err and "UTF-8" in err
    assert main(["calibrate", "--text", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--text" in err and "regular file" in err
    with pytest.raises(MinibloomError, match="--markdown"):
        C.check_arguments(C.argparse.Namespace(seeds=1, quick=False, write=None, markdown=str(tmp_path), text=None,
                                               trained=None))


def test_activation_quantizers_keep_nan():
    """A NaN from a buggy softmax must reach the logits through every emulated activation quantizer."""
    x = np.array([[1.0, np.nan, 2.0], [0.5, -1.0, 0.25]])
    for quant in (E.quant_rows_int8, E.quant_tensor_uint8, lambda a: E.quant_blocks(a, 32, True)):
        assert np.isnan(quant(x)[0]).all() or np.isnan(quant(x)).any()
    assert np.isnan(E.quant_rows_int8(x)[0]).all() and np.allclose(E.quant_rows_int8(x)[1], [0.5, -1.0, 0.25],
                                                                     atol=1 / 254)
