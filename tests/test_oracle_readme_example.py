"""The README section "Use minibloom as an oracle in your CI" runs as written, and the sample diff table in
docs/oracle.md is what ``minibloom diff`` prints.

The section's ```python blocks starting with ``# file: NAME`` are saved under that name, its ```bash blocks are run
with bash, in order, in a scratch directory that sees the repository's ``tests/`` (the examples use tests/golden/tiny),
so the documentation and this test cannot drift apart. NumPy only: no torch needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
ORACLE_DOC = os.path.join(ROOT, "docs", "oracle.md")  # the oracle guide: the failure output, policies, engines
TITLE = "## Use minibloom as an oracle in your CI"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)


def section() -> str:
    """The README's oracle section: from its title to the next level-2 heading."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index(TITLE)
    end = text.find("\n## ", start + len(TITLE))
    return text[start:end if end != -1 else len(text)]


def blocks():
    return [(lang, body) for lang, body in BLOCK.findall(section())]


def test_the_section_has_runnable_blocks():
    langs = [lang for lang, _ in blocks()]
    assert langs.count("python") >= 2 and langs.count("bash") >= 2
    assert section().startswith(TITLE)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("minibloom") is None,
                    reason="needs bash and the minibloom console script (pip install -e .)")
def test_readme_example_runs_verbatim(tmp_path):
    os.symlink(os.path.join(ROOT, "tests"), tmp_path / "tests")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    outputs = []
    for lang, body in blocks():
        if lang == "python":
            first = body.splitlines()[0]
            m = re.match(r"# file: (\S+)$", first)
            assert m, f"python block must start with '# file: NAME', got {first!r}"
            (tmp_path / m.group(1)).write_text(body)
        elif lang == "bash":
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
            assert r.returncode == 0, f"README block failed:\n{body}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
            outputs.append(r.stdout)
    text = "\n".join(outputs)
    assert re.search(r"\b2 passed\b", text), text  # the pytest example, bloom_oracle fixture included
    assert "all layers agree" in text and "first divergence" not in text
    assert (tmp_path / "mine.npz").exists() and (tmp_path / "ref.npz").exists()


def test_the_documented_failure_output_is_what_diff_prints(tmp_path):
    """The sample table in docs/oracle.md is real: rebuild broken.npz the way it was made and compare the table."""
    import numpy as np

    import minibloom
    from minibloom.trace import diff_traces, save_trace, trace

    ids = np.array([[5, 17, 42, 99, 3, 64]])
    tiny = os.path.join(ROOT, "tests", "golden", "tiny")
    mine = trace(minibloom.load(tiny), ids)
    mine["hidden_states"][1][0, 2, :4] += 0.01
    mine["hidden_states"][2][0, 2:, :] *= 1.01
    mine["logits"][0, 2:] *= 1.01
    mine["meta"] = {"dtype": "float32"}
    report = diff_traces(save_trace(mine, tmp_path / "broken.npz"), trace(tiny, ids, dtype="float64"))
    with open(ORACLE_DOC, encoding="utf-8") as f:
        doc = f.read()
    assert not report.passed and report.first_divergence.name == "block 0"
    for r in report.rows:  # same verdicts and, to the printed digits, the same max rel errors
        line = next(ln for ln in doc.splitlines() if ln.startswith(f"{r.name:<22} "))
        assert line.endswith("ok" if r.passed else "FAIL") and f"{r.max_rel:.3e}"[:4] in line, line
