"""The teaching notebooks (``notebooks/*.ipynb``): each one executes from a clean kernel, offline, without error.

The notebooks carry their own assertions (every claim in them is checked when they run), so executing them is the
test. They are built from ``notebooks/src/*.py`` by ``scripts/build_notebooks.py``; the committed ``.ipynb`` must
match its source, and must keep the shape the project promises (imports minibloom, asserts, draws, says what's next).
Executing them is marked ``slow`` (a few seconds to a minute each); the structure checks are fast.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))
SECONDS_PER_NOTEBOOK = 300  # the budget is "a few minutes on 2 cores"; each runs in well under one today
IDS = [os.path.basename(p)[:-6] for p in NOTEBOOKS]


BUILD = os.path.join(ROOT, "scripts", "build_notebooks.py")


def _build(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python scripts/build_notebooks.py ARGS`` (the script the notebooks are made with), from the repository."""
    return subprocess.run([sys.executable, BUILD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _code(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, NOTEBOOKS
    assert os.path.isfile(os.path.join(ROOT, "notebooks", "README.md"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_matches_its_source(path):
    src = os.path.join(ROOT, "notebooks", "src", os.path.basename(path)[:-6] + ".py")
    assert os.path.isfile(src), f"{path}: no source {src}"
    r = _build("--check", os.path.basename(path)[:2])
    assert r.returncode == 0 and not r.stdout.strip(), (
        f"{path} is out of date: run `python scripts/build_notebooks.py {os.path.basename(path)[:2]}`\n{r.stdout}")


def test_the_source_check_can_fail(tmp_path):
    """--check notices a committed notebook that differs from its source (run on a copy of the repository's
    notebooks folder and script, with one cell edited)."""
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "notebooks"), root / "notebooks")
    shutil.copytree(os.path.join(ROOT, "scripts"), root / "scripts")
    nb_path = root / "notebooks" / os.path.basename(NOTEBOOKS[0])
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.cells[0].source += " (edited)"
    nbformat.write(nb, str(nb_path))
    r = subprocess.run([sys.executable, str(root / "scripts" / "build_notebooks.py"), "--check"], capture_output=True,
                       text=True, timeout=120, cwd=root)
    assert r.returncode == 1 and f"out of date: notebooks/{os.path.basename(NOTEBOOKS[0])}" in r.stdout, r.stdout


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
    prefix = os.path.basename(path)[:2]
    r = _build("--no-write", "--timeout", str(SECONDS_PER_NOTEBOOK), prefix, timeout=2 * SECONDS_PER_NOTEBOOK)
    assert r.returncode == 0, f"{path} failed to execute:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    m = re.search(r": ([0-9.]+) s, (\d+) figures, (\d+) assertions", r.stdout)
    assert m, r.stdout
    seconds = record("seconds to execute", float(m.group(1)))
    assert int(m.group(3)) > 0, "a notebook checks its claims"
    assert seconds < SECONDS_PER_NOTEBOOK, f"{path} took {seconds:.0f} s"
