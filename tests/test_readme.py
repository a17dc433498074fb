"""The README and the pages in docs/ run as written: every ```python block (each on its own, in a fresh interpreter,
as a reader pastes it), every console example, and the ``minibloom`` / ``python -m minibloom`` lines of its bash
blocks, page by page in page order, in a scratch directory. Where a page shows output (``# `` lines under a
``print``, or the lines under a ``$`` command), the output must be what it shows. The README's oracle quick start has
its own test (test_oracle_readme_example.py). The pages also stay what they promise: the README at most 300 lines,
every relative link pointing at a file and heading that exist, every repository path they name present.

Not run, with the reason: commands that need the network or real BLOOM weights (hub ids, ``download``), ``minibloom
bench`` (minutes, and transformers), and lines that are not minibloom commands (pip, pytest, the scripts).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 300
ORACLE = "## Use minibloom as an oracle in your CI"  # README's section that test_oracle_readme_example.py runs
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
SKIP = {  # a command matching this pattern is not run: the reason
    r"bigscience/|\bdownload\b": "needs the network and real BLOOM weights",
    r"\bbench\b": "takes minutes and needs transformers",
    r"--steps 458": "the default model's training recipe: minutes, and it would overwrite weights/default",
}
pytestmark = pytest.mark.xdist_group("readme")  # the console commands of a page share one scratch directory, in order


def read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def blocks(page: str) -> list[tuple[int, str, str]]:
    """(line, language, body) of every fenced block of a page, outside the README's oracle section."""
    text = read(page)
    start = end = -1
    if page == "README.md":
        start = text.index(ORACLE)
        end = text.find("\n## ", start + len(ORACLE))
        end = len(text) if end == -1 else end
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)
            if not start <= m.start() < end]


PYTHON = [(page, line, body) for page in PAGES for line, lang, body in blocks(page) if lang == "python"]


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


def test_the_pages_have_the_blocks_this_test_runs():
    assert "README.md" in PAGES and len(PAGES) >= 6, PAGES
    assert len(PYTHON) >= 8 and sum(len(commands(page)) for page in PAGES) >= 10
    for page in PAGES:  # a block whose fence this test does not parse would silently go unrun
        fences = sum(1 for line in read(page).splitlines() if line.startswith("```"))
        assert fences == 2 * len(FENCE.findall(read(page))), f"{page}: a fence without a language, or unclosed"


@pytest.mark.parametrize("page, line, body", PYTHON, ids=[f"{page}:{line}" for page, line, _ in PYTHON])
def test_python_block_runs_as_pasted(tmp_path, page, line, body):
    env = scratch(tmp_path)
    r = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, f"{page} line {line}:\n{r.stderr[-3000:]}"
    for shown in shown_prints(body):
        assert shown in r.stdout, f"{page} line {line} shows\n{shown}\nbut printed\n{r.stdout}"


def commands(page: str) -> list[tuple[int, str, list[str] | None]]:
    """(line, command, shown output or None) for every console ``$`` command and every minibloom line of a bash
    block, in page order."""
    out = []
    for line, lang, body in blocks(page):
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


@pytest.mark.parametrize("page", PAGES)
def test_console_and_bash_commands_run_in_order_and_print_what_the_page_shows(tmp_path, page):
    env = scratch(tmp_path)
    ran, failures = 0, []
    for line, cmd, shown in commands(page):
        if skipped(cmd):
            continue
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        ran += 1
        if r.returncode != 0:
            failures.append(f"{page} line {line}: {cmd}\n  exit {r.returncode}: {r.stderr[-500:]}")
        elif shown is not None:
            want = [s.replace("/home/you/minibloom/", ROOT + "/") for s in shown]
            got = r.stdout.rstrip("\n").splitlines()
            if got != want:
                failures.append(f"{page} line {line}: {cmd}\n  page shows {want}\n  printed    {got}")
    assert ran == sum(1 for _, cmd, _ in commands(page) if not skipped(cmd))
    assert not failures, "\n".join(failures)


def test_the_readme_starts_small():
    n = len(read("README.md").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move reference material to docs/"


def prose(text: str) -> str:
    """A page without its fenced blocks and inline code spans: what a reader sees as text and headings."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (word characters, spaces and hyphens
    kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading anchor of a Markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} (.+?)#*\s*$", line)
        if m:
            base = slug(m.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def links(page: str) -> list[str]:
    """The link targets of a page's prose: ``[text](target)``, titles dropped."""
    return [m.group(1) for m in re.finditer(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(read(page)))]


def test_slug_follows_github():
    assert slug("Models bigger than RAM: `low_memory=True` and `max_memory`") == \
        "models-bigger-than-ram-low_memorytrue-and-max_memory"
    assert slug("Backends: NumPy, CuPy, and the strict array API") == "backends-numpy-cupy-and-the-strict-array-api"
    assert slug("Measured: 1 and 2 workers, and what bloom-176b would cost") == \
        "measured-1-and-2-workers-and-what-bloom-176b-would-cost"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page):
    broken = []
    targets = links(page)
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            broken.append(f"{target}: no file {os.path.relpath(full, ROOT)}")
        elif anchor and (not full.endswith(".md") or anchor not in anchors(full)):
            broken.append(f"{target}: no heading with anchor #{anchor} in {os.path.relpath(full, ROOT)}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(t.partition("#")[0]) for t in links("README.md")}
    assert not [p for p in PAGES[1:] if p not in linked], linked


def test_the_link_checker_sees_a_broken_link(tmp_path):
    """The checks above can fail: a link to a missing heading and one to a missing file are both caught."""
    (tmp_path / "a.md").write_text("# Title\n\n```python\n# not a heading\n```\n## Two words\n## Two words\n")
    assert anchors(str(tmp_path / "a.md")) == {"title", "two-words", "two-words-1"}
    assert "not-a-heading" not in anchors(str(tmp_path / "a.md"))
    text = "see [x](docs/none.md) and [y](#gone) but `[z](ignored.md)` and\n```\n[w](ignored.md)\n```\n"
    assert re.findall(r"\]\(([^)\s]+)\)", prose(text)) == ["docs/none.md", "#gone"]


def test_every_repository_path_the_docs_name_exists():
    """Files and folders of the repository named in the README, docs/ and notebooks/README.md exist (weights/ names
    are examples of download destinations, so they are left out)."""
    missing = []
    named = re.compile(r"(?<![\w./-])((?:minibloom|tests|scripts|benchmarks|notebooks|data|docs|\.ci)/[\w./-]*\w)")
    for doc in PAGES + [os.path.join("notebooks", "README.md")]:
        for m in named.finditer(read(doc)):
            path = m.group(1)
            here = os.path.join(ROOT, os.path.dirname(doc), path)
            if not (os.path.exists(os.path.join(ROOT, path)) or os.path.exists(here)):
                missing.append(f"{doc}: {path}")
    assert not missing, missing
