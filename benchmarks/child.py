"""Fresh processes for the benchmark scripts: one function of a script, run in a new Python.

A script defines its measurements as plain functions returning a JSON-able dict and ends with
``serve(FUNCTIONS) or main()``; ``run(__file__, "name", **kwargs)`` starts ``python SCRIPT --child name KWARGS`` with
the minibloom the parent imported first on ``PYTHONPATH`` (the child runs outside any checkout, so that the current
directory cannot shadow it) and returns the dict the function returned. A fresh process keeps each figure its own: its
peak resident set (VmHWM), a cold page cache for what it loads, no allocator state from an earlier measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable


def run(script: str, name: str, **kwargs) -> dict:
    """``FUNCTIONS[name](**kwargs)`` of ``script`` in a fresh Python; its result."""
    import minibloom

    root = os.path.dirname(os.path.dirname(os.path.abspath(minibloom.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, os.path.abspath(script), "--child", name, json.dumps(kwargs)],
                         stdout=subprocess.PIPE, text=True, check=True, env=env, cwd=os.sep).stdout
    return json.loads(out.strip().splitlines()[-1])


def serve(functions: dict[str, Callable[..., dict]], argv: list[str] | None = None) -> bool:
    """When this process is such a child (``--child NAME KWARGS``), run it, print its result and return True."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "--child":
        return False
    print(json.dumps(functions[argv[1]](**json.loads(argv[2]))))
    return True
