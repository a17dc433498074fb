"""Statistical kinds sized by the model under test (``minibloom.testing.probe_policy``): a verdict that has the model
runs the kind's emulated correct ports on it and bounds the candidate by a multiple of how far they move *this*
model, never above the size-scaled envelope. Quiet models (small weights) get tight limits, so a bug the envelope
lets through there fails; a correct port still passes.
"""

from __future__ import annotations

import numpy as np
import pytest

import minibloom
from minibloom.config import BloomConfig
from minibloom.formats.weights import write_checkpoint
from minibloom.oracle import emulate as E
from minibloom.oracle.calibrate import calibration_mask, random_checkpoint
from minibloom.testing import PROBE_FLOORS, assert_logits_close, policy_for, probe_figures, probe_policy


@pytest.fixture(scope="module")
def quiet(tmp_path_factory) -> str:
    """A random 3 x 96, 12-head checkpoint with weights at std 0.02 (every parameter random)."""
    cfg = BloomConfig(vocab_size=256, hidden_size=96, n_layer=3, n_head=12)
    return write_checkpoint(tmp_path_factory.mktemp("quiet"), cfg, random_checkpoint(cfg, 256, 7, 0.02), "float32")


@pytest.fixture(scope="module")
def inputs():
    ids = np.random.default_rng(3).integers(0, 256, (4, 16))
    return ids, calibration_mask(4, 16)


def _port(model_dir, kind, ids, mask, bug=None, which=0) -> np.ndarray:
    """Logits of ``kind``'s emulated port ``which`` (with ``bug`` planted) on ``model_dir``."""
    m = minibloom.load(model_dir, dtype="float64")
    port = E.ports_for(kind)[which]
    return E.run_port(port, bug, E.prepare(port, m.params), m.config, ids, mask)[0]


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "int8-weight-only", "int4-weight-only", "int8-dynamic"])
def test_probe_limits_sit_under_the_envelope_and_over_the_floors(quiet, inputs, kind):
    ids, mask = inputs
    pol = policy_for(kind).at(3, 96)
    assert pol.probes
    probed = probe_policy(pol, quiet, ids, mask)
    fig = probe_figures(kind, quiet, ids, mask)
    assert fig["rel"] > 0 and fig["kl_mean"] >= 0
    assert PROBE_FLOORS["rel"] <= probed.rel <= pol.rel and probed.kl_mean <= pol.kl_mean
    assert probed.rel < pol.rel  # a quiet model: the probe is tighter than the envelope over all evidence


def test_float_kinds_are_not_probed():
    assert not policy_for("float32").probes and not policy_for("q8_0").probes and not policy_for("nf4").probes


@pytest.mark.parametrize("kind, which", [("int8-weight-only", 0), ("int8-weight-only", 2), ("int4-weight-only", 1),
                                         ("float16", 0)])
def test_a_correct_port_passes_its_probed_limits(quiet, inputs, kind, which):
    ids, mask = inputs
    which = min(which, len(E.ports_for(kind)) - 1)
    assert_logits_close(_port(quiet, kind, ids, mask, which=which), quiet, ids, mask, kind=kind)


BUGS = ["dense-bias-dropped", "pads-attended", "qkv-blocks", "layer-dropped", "layernorms-swapped"]


@pytest.fixture(scope="module")
def buggy(quiet, inputs) -> dict:
    ids, mask = inputs
    return {bug: _port(quiet, "int8-weight-only", ids, mask, bug=bug) for bug in BUGS}


@pytest.mark.parametrize("bug", BUGS)
def test_structural_bugs_fail_the_probed_limits(quiet, inputs, buggy, bug):
    """int8 weight-only with a structural bug planted, on the quiet model: beyond the probe's multiple of this
    model's own int8 noise."""
    ids, mask = inputs
    with pytest.raises(AssertionError, match="sized by the kind's emulated ports"):
        assert_logits_close(buggy[bug], quiet, ids, mask, kind="int8-weight-only")


def test_the_envelope_alone_lets_some_of_them_through(quiet, inputs, buggy):
    """The reason for the probe: the size-scaled envelope, which must cover the noisiest evidence, passes some of
    these bugs on a quiet model."""
    from minibloom.testing import check_logits

    ids, mask = inputs
    env = policy_for("int8-weight-only").at(3, 96)
    ref = minibloom.load(quiet, dtype="float64")(ids, mask)
    assert any(check_logits(buggy[bug], ref, mask, env).passed for bug in BUGS)
