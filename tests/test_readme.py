"""The README runs as written: every ```python block (each on its own, in a fresh interpreter, as a reader pastes
it), every console example, and the ``minibloom`` / ``python -m minibloom`` lines of its bash blocks, in README order,
in a scratch directory. Where the README shows output (``# `` lines under a ``print``, or the lines under a ``$``
command), the output must be what it shows. The oracle section has its own test (test_oracle_readme_example.py).

Not run, with the reason: commands that need the network or real BLOOM weights (hub ids, ``download``), ``minibloom
bench`` (minutes, and transformers), and lines that are not minibloom commands (pip, pytest, the scripts).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
ORACLE = "## Use minibloom as an oracle in your CI"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
SKIP = {  # a command matching this pattern is not run: the reason
    r"bigscience/|\bdownload\b": "needs the network and real BLOOM weights",
    r"\bbench\b": "takes minutes and needs transformers",
    r"--steps 458": "the default model's training recipe: minutes, and it would overwrite weights/default",
}
pytestmark = pytest.mark.xdist_group("readme")  # the console commands share one scratch directory, in order


def blocks() -> list[tuple[int, str, str]]:
    """(line, language, body) of every fenced block outside the oracle section."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index(ORACLE)
    end = text.find("\n## ", start + len(ORACLE))
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)
            if not start <= m.start() < end]


PYTHON = [(line, body) for line, lang, body in blocks() if lang == "python"]


def shown_prints(body: str) -> list[str]:
    """The output a block shows: the ``# `` comment lines right under each ``print(...)`` statement."""
    lines, out = body.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("print("):
            shown = []
            for nxt in lines[i + 1:]:
                if not nxt.startswith("# "):
                    break
                shown.append(nxt[2:])
            if shown:
                out.append("\n".join(shown))
    return out


def scratch(tmp_path) -> dict:
    os.symlink(os.path.join(ROOT, "tests"), tmp_path / "tests")
    os.symlink(os.path.join(ROOT, "weights"), tmp_path / "weights")
    return {**os.environ, "HF_HUB_OFFLINE": "1",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(PYTHON) >= 8 and len(commands()) >= 10


@pytest.mark.parametrize("line, body", PYTHON, ids=[f"line{line}" for line, _ in PYTHON])
def test_python_block_runs_as_pasted(tmp_path, line, body):
    env = scratch(tmp_path)
    r = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, f"README line {line}:\n{r.stderr[-3000:]}"
    for shown in shown_prints(body):
        assert shown in r.stdout, f"README line {line} shows\n{shown}\nbut printed\n{r.stdout}"


def commands() -> list[tuple[int, str, list[str] | None]]:
    """(line, command, shown output or None) for every console ``$`` command and every minibloom line of a bash
    block, in README order."""
    out = []
    for line, lang, body in blocks():
        rows = body.splitlines()
        if lang == "console":
            for i, row in enumerate(rows):
                if row.startswith("$ "):
                    shown = []
                    for nxt in rows[i + 1:]:
                        if nxt.startswith("$ "):
                            break
                        shown.append(nxt)
                    out.append((line + 1 + i, row[2:], shown or None))
        elif lang == "bash":
            out += [(line + 1 + i, row, None) for i, row in enumerate(rows)
                    if re.match(r"(\w+=\S+ )*(minibloom |python -m minibloom)", row)]
    return out


def skipped(cmd: str) -> str | None:
    return next((why for pattern, why in SKIP.items() if re.search(pattern, cmd)), None)


def test_console_and_bash_commands_run_in_order_and_print_what_the_readme_shows(tmp_path):
    env = scratch(tmp_path)
    ran, failures = 0, []
    for line, cmd, shown in commands():
        if skipped(cmd):
            continue
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        ran += 1
        if r.returncode != 0:
            failures.append(f"line {line}: {cmd}\n  exit {r.returncode}: {r.stderr[-500:]}")
        elif shown is not None:
            want = [s.replace("/home/you/minibloom/", ROOT + "/") for s in shown]
            got = r.stdout.rstrip("\n").splitlines()
            if got != want:
                failures.append(f"line {line}: {cmd}\n  README shows {want}\n  printed      {got}")
    assert ran >= 10
    assert not failures, "\n".join(failures)


def test_every_repository_path_the_docs_name_exists():
    """Files and folders of the repository named in README.md and notebooks/README.md exist (weights/ names are
    examples of download destinations, so they are left out)."""
    missing = []
    for doc in ("README.md", os.path.join("notebooks", "README.md")):
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        for m in re.finditer(r"(?<![\w./-])((?:minibloom|tests|scripts|benchmarks|notebooks|data|\.ci)/[\w./-]*\w)",
                             text):
            path = m.group(1)
            here = os.path.join(ROOT, os.path.dirname(doc), path)
            if not (os.path.exists(os.path.join(ROOT, path)) or os.path.exists(here)):
                missing.append(f"{doc}: {path}")
    assert not missing, missing
