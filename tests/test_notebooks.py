"""The teaching notebooks (``notebooks/*.ipynb``): each one executes from a clean kernel, offline, without error.

The notebooks carry their own assertions (every claim in them is checked when they run), so executing them is the
test. They are built from ``notebooks/src/*.py`` by ``scripts/build_notebooks.py``; the committed ``.ipynb`` must
match its source, and must keep the shape the project promises (imports minibloom, asserts, draws, says what's next).
Executing them is marked ``slow`` (a few seconds to a minute each); the structure checks are fast.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))
SECONDS_PER_NOTEBOOK = 300  # the budget is "a few minutes on 2 cores"; each runs in well under one today
IDS = [os.path.basename(p)[:-6] for p in NOTEBOOKS]


def _builder():
    path = os.path.join(ROOT, "scripts", "build_notebooks.py")
    spec = importlib.util.spec_from_file_location("build_notebooks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _code(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS
    assert os.path.isfile(os.path.join(ROOT, "notebooks", "README.md"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_matches_its_source(path):
    build = _builder()
    src = os.path.join(ROOT, "notebooks", "src", os.path.basename(path)[:-6] + ".py")
    assert os.path.isfile(src), f"{path}: no source {src}"
    assert build.committed_cells(path) == build.cells_of(src), (
        f"{path} is out of date: run `python scripts/build_notebooks.py {os.path.basename(path)[:2]}`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_shape(path):
    """H1 title, "What's next", imports minibloom, asserts, and was committed executed with a figure and no error."""
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "the first cell must be the H1 title"
    assert any(c.cell_type == "markdown" and "## What's next" in c.source for c in nb.cells)
    code = _code(nb)
    assert re.search(r"^(import minibloom|from minibloom)", code, re.M), "a notebook imports minibloom"
    assert re.search(r"\bassert\b|assert_\w+\(", code), "a notebook checks its claims"
    assert "np.random.default_rng(0)" in code
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"], "committed with an error output"
    assert any("image/png" in o.get("data", {}) for o in outputs), "committed without its figures (not executed?)"
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code" and c.source.strip()), \
        "committed with unexecuted cells"


def test_notebooks_stay_small():
    total = sum(os.path.getsize(p) for p in NOTEBOOKS)
    assert total < 3 * 2**20, f"notebooks take {total / 2**20:.1f} MiB; keep figures small (dpi 80)"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path, record):
    """Run the notebook from a clean kernel, offline, with its outputs cleared; any cell error fails."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    build = _builder()
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    seconds = build.execute(nb, timeout=SECONDS_PER_NOTEBOOK)  # sets HF_HUB_OFFLINE=1 for the kernel
    record("seconds to execute", seconds)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert seconds < SECONDS_PER_NOTEBOOK, f"{path} took {seconds:.0f} s"
