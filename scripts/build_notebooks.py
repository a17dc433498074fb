"""Build the notebooks: ``notebooks/src/NN_name.py`` (jupytext "percent" format) -> ``notebooks/NN_name.ipynb``.

Development script. Each source is a plain Python file that reads top to bottom:

    # %% [markdown]
    # # A title
    # Some prose.

    # %%
    x = 1 + 1

The script turns every ``# %%`` block into a cell, executes the notebook from a clean kernel with nbclient (offline:
``HF_HUB_OFFLINE=1``; working directory ``notebooks/``), strips volatile metadata (timings, kernel versions; cell ids
are derived from the cell's position) and writes the ``.ipynb`` with its outputs, so the notebooks read well on a code
host.

    python scripts/build_notebooks.py                 # build and execute every notebook
    python scripts/build_notebooks.py 03 05           # only the notebooks whose names start with these prefixes
    python scripts/build_notebooks.py --no-execute    # write the cells without running them
    python scripts/build_notebooks.py --check         # exit 1 if a committed .ipynb differs from its source
    python scripts/build_notebooks.py --no-write 03   # execute from the source without writing (what CI runs)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
SOURCES = os.path.join(NOTEBOOKS, "src")
KERNEL = "python3"


def parse_percent(text: str) -> list[tuple[str, str]]:
    """``[(kind, source)]`` with kind "markdown" or "code", from a jupytext percent-format script."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
        # lines before the first marker (a module docstring, say) are not part of the notebook
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if lines:
            out.append((kind, "\n".join(lines)))
    return out


def make_notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    for i, (kind, source) in enumerate(cells):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding an unchanged notebook changes nothing
        nb.cells.append(cell)
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": KERNEL},
                   "language_info": {"name": "python"}}
    return nb


def kernel_env(spec_root: str) -> dict:
    """Environment for the notebook kernel: offline, and a ``python3`` kernel spec (written under ``spec_root``) that
    runs this interpreter."""
    spec_dir = os.path.join(spec_root, "kernels", KERNEL)
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "Python 3", "language": "python"}, f)
    return {"JUPYTER_PATH": os.pathsep.join([spec_root, os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> float:
    """Run ``nb`` in place from a clean kernel in ``notebooks/``; returns the wall time in seconds."""
    from nbclient import NotebookClient

    saved = dict(os.environ)
    spec_root = tempfile.mkdtemp(prefix="minibloom-kernel-")
    os.environ.update(kernel_env(spec_root))
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, record_timing=False,
                                resources={"metadata": {"path": NOTEBOOKS}})
        t0 = time.perf_counter()
        client.execute()
        return time.perf_counter() - t0
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(spec_root, ignore_errors=True)


def strip_volatile(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb.metadata = {"kernelspec": nb.metadata.get("kernelspec", {}), "language_info": {"name": "python"}}
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k not in ("execution", "collapsed", "scrolled")}
        for out in cell.get("outputs", []):
            out.get("metadata", {}).pop("execution", None)
            # machine-specific paths (a model's repr shows where it was loaded from) -> relative to the repository
            if "text" in out:
                out["text"] = out["text"].replace(ROOT + os.sep, "")
            if "text/plain" in out.get("data", {}):
                out["data"]["text/plain"] = out["data"]["text/plain"].replace(ROOT + os.sep, "")
    return nb


def count_assertions(nb: nbformat.NotebookNode) -> int:
    """``assert`` statements plus ``assert_*(...)`` checks in the code cells (each counted once, even in a loop)."""
    lines = [ln for c in nb.cells if c.cell_type == "code" for ln in c.source.splitlines()
             if not ln.lstrip().startswith(("#", "import ", "from "))]
    return sum(len(re.findall(r"\bassert\b|\bassert_\w+\(", ln)) for ln in lines)


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(SOURCES, "[0-9][0-9]_*.py")))


def target(src: str) -> str:
    return os.path.join(NOTEBOOKS, os.path.basename(src)[:-3] + ".ipynb")


def cells_of(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        return parse_percent(f.read())


def committed_cells(ipynb: str) -> list[tuple[str, str]]:
    nb = nbformat.read(ipynb, as_version=4)
    return [(c.cell_type, c.source) for c in nb.cells]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build and execute the notebooks from notebooks/src/*.py")
    p.add_argument("only", nargs="*", help="name prefixes (e.g. 03) of the notebooks to build")
    p.add_argument("--no-execute", action="store_true")
    p.add_argument("--check", action="store_true", help="only check that every .ipynb matches its source")
    p.add_argument("--no-write", action="store_true",
                   help="build and execute, but leave the committed .ipynb as it is (a cell error exits 1)")
    p.add_argument("--timeout", type=int, default=600, help="per-cell timeout in seconds")
    args = p.parse_args(argv)
    chosen = [s for s in sources() if not args.only or any(os.path.basename(s).startswith(o) for o in args.only)]
    if args.check:
        bad = [s for s in chosen if not os.path.exists(target(s)) or committed_cells(target(s)) != cells_of(s)]
        for s in bad:
            print(f"out of date: {os.path.relpath(target(s), ROOT)} (rebuild from {os.path.relpath(s, ROOT)})")
        return 1 if bad else 0
    for src in chosen:
        nb = make_notebook(cells_of(src))
        name = os.path.relpath(target(src), ROOT)
        if not args.no_execute:
            seconds = execute(nb, args.timeout)
            figures = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
            print(f"{name}: {seconds:.1f} s, {figures} figures, {count_assertions(nb)} assertions", flush=True)
        if not args.no_write:
            nbformat.write(strip_volatile(nb), target(src))
    return 0


if __name__ == "__main__":
    sys.exit(main())
