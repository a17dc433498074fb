"""Shared fixtures. Checkpoint builders live in ``factory.py``; tolerances in ``minibloom.testing``."""

from __future__ import annotations

import numpy as np
import pytest

import minibloom
from minibloom import fast
from minibloom import model as M

MEASURED: list[tuple[str, str, float]] = []  # (test, quantity, value): printed at the end of the run


@pytest.fixture
def record(request):
    """``record("fp32 rel err", value)``: keep a measured figure for the end-of-run table (and return it)."""

    def _record(quantity: str, value: float) -> float:
        MEASURED.append((request.node.name, quantity, float(value)))
        return value

    return _record


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured figures")
        for test, quantity, value in MEASURED:
            terminalreporter.write_line(f"{test:<60} {quantity:<28} {value:.3e}")


# The two primitive tables minibloom.model.forward runs with (issue 17: one definition of BLOOM): the pure array-API
# reference and the NumPy drop-ins that Bloom uses by default on NumPy. End-to-end scenarios (golden files,
# generation, low-memory, GGUF, bitsandbytes) run through both and must meet the same tolerance with each.
PRIMITIVE_SETS: dict[str, M.Primitives] = {"reference": M.REFERENCE, "numpy": fast.PRIMITIVES}


@pytest.fixture(params=list(PRIMITIVE_SETS))
def primitives(request) -> M.Primitives:
    """Each primitive set in turn (test ids ``[reference]`` / ``[numpy]``)."""
    return PRIMITIVE_SETS[request.param]


@pytest.fixture
def load(primitives):
    """``minibloom.load`` whose model runs with the parametrized ``primitives`` (requesting it runs the test once
    per primitive set)."""

    def _load(*args, **kwargs) -> minibloom.Bloom:
        model = minibloom.load(*args, **kwargs)
        model.primitives = primitives
        return model

    return _load


@pytest.fixture
def rng():
    return np.random.default_rng(0)


BLOOM_560M = dict(vocab=250880, hidden=1024, n_layer=24, n_head=16)


@pytest.fixture(scope="session")
def bloom560m_dir(tmp_path_factory):
    """A random checkpoint of the exact bloom-560m shape, fp16 on disk, built once per session (slow tests only)."""
    torch = pytest.importorskip("torch")
    from factory import make_model, save

    path = tmp_path_factory.mktemp("bloom560m") / "bloom-560m-random"
    model = make_model(seed=560, std=0.02, **BLOOM_560M)
    save(model, path, dtype=torch.float16)
    del model
    return str(path)
