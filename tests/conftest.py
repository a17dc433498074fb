"""Shared fixtures. Checkpoint builders live in ``factory.py``; tolerances in ``minibloom.testing``."""

from __future__ import annotations

import os

import numpy as np
import pytest

import minibloom
from minibloom import fast
from minibloom import model as M

try:
    from hypothesis import settings
except ImportError:  # the test extra installs it; modules that use it import it themselves
    settings = None

if settings is not None:
    # "ci" (the default): the same examples on every run and machine (derandomize, no example database), no
    # per-example deadline (CI machines stall), and a bounded number of generated examples per test (a test asks
    # for more or fewer with @settings(max_examples=...)); the corner cases a test must always reach are pinned
    # with @example. "explore" (HYPOTHESIS_PROFILE=explore): random and longer, to look for new failures locally.
    settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=20)
    settings.register_profile("explore", deadline=None, max_examples=500)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MEASURED: list[tuple[str, str, float]] = []  # (test, quantity, value): printed at the end of the run


def pytest_configure(config):
    """Under pytest-xdist each worker is one process per core: its BLAS gets one thread, so the workers do not fight
    over the cores (OpenBLAS threads busy-wait between products)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and int(workers) > 1:
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # subprocesses: notebooks, CLI
            os.environ.setdefault(var, threads)
        try:
            from threadpoolctl import threadpool_limits

            config._blas_limit = threadpool_limits(limits=max(1, (os.cpu_count() or 1) // int(workers)))
        except ImportError:
            pass


@pytest.fixture
def record(request):
    """``record("fp32 rel err", value)``: keep a measured figure for the end-of-run table (and return it). Figures
    travel as the test's ``user_properties``, so they reach the table from pytest-xdist workers too."""

    def _record(quantity: str, value: float) -> float:
        request.node.user_properties.append(("measured", (quantity, float(value))))
        return value

    return _record


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        test = report.nodeid.split("::", 1)[-1]
        MEASURED.extend((test, *value) for name, value in report.user_properties if name == "measured")


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured figures")
        for test, quantity, value in sorted(MEASURED):
            terminalreporter.write_line(f"{test:<60} {quantity:<28} {value:.3e}")


# The two primitive tables minibloom.model.forward runs with (one definition of BLOOM): the pure array-API
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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """One small transformers-saved checkpoint (hidden 48, 6 heads: not a power of two, 3 layers, every parameter
    random) shared by every module that only reads it."""
    pytest.importorskip("torch")
    from factory import make_model, save

    return save(make_model(seed=21, hidden=48, n_head=6, n_layer=3), tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


BLOOM_560M = dict(vocab=250880, hidden=1024, n_layer=24, n_head=16)


def _write_random(directory, vocab, hidden, n_layer, n_head, seed) -> str:
    """A random checkpoint (every tensor drawn, fp16 on disk) written tensor by tensor by minibloom's streamed writer:
    a 560m-shaped file never exists whole in memory (building it through transformers would hold the whole model)."""
    from minibloom.formats.weights import write_random_checkpoint

    cfg = minibloom.BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=n_layer, n_head=n_head)
    return write_random_checkpoint(directory, cfg, vocab, np.float16, seed=seed, progress=False)


@pytest.fixture(scope="session")
def bloom560m_dir(tmp_path_factory):
    """A random checkpoint of the exact bloom-560m shape, fp16 on disk, built once per session (slow tests only)."""
    return _write_random(tmp_path_factory.mktemp("bloom560m") / "bloom-560m-random", seed=560, **BLOOM_560M)


@pytest.fixture(scope="session")
def bloom560m_layers_dir(tmp_path_factory):
    """bloom-560m's 24 layers (hidden 1024, 16 heads) under a 4096-token vocabulary: the float64 checks' model. With
    the full vocabulary, transformers alone holds 560M parameters x 8 bytes in float64; the layers, where float64
    exactness is at stake, are the same."""
    shape = {**BLOOM_560M, "vocab": 4096}
    return _write_random(tmp_path_factory.mktemp("bloom560m-layers") / "bloom-560m-layers", seed=561, **shape)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps freed blocks under its mmap threshold,
    which rises to 32 MiB after big frees: a deleted 560m-shaped model would otherwise stay in RSS)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.fixture(autouse=True)
def _release_after_slow_tests(request):
    yield
    if request.node.get_closest_marker("slow"):
        release_memory()


@pytest.fixture(scope="session")
def dask_client():
    """A real Dask LocalCluster of 2 worker processes (one thread each) and its client, shared by the session's Dask
    tests (mark them ``xdist_group("dask")`` so one pytest-xdist worker runs them all) and closed at its end."""
    pytest.importorskip("distributed")
    from minibloom.evaluate.distributed import connect

    with connect(workers=2) as client:
        yield client
