"""The benchmark scripts are not run in CI (they need minutes and a quiet machine), but they must stay importable and
their command lines must parse: a syntax error there would otherwise go unnoticed until someone measures."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["bench.py", "lowmem_7b1.py"])
def test_benchmark_script_help(script):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_minibloom_bench_help():
    from minibloom.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
