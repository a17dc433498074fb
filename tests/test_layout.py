"""The package's architecture, enforced: import-linter's contracts (setup.cfg) hold, and the model is defined once."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minibloom")


def test_import_contracts_hold():
    pytest.importorskip("importlinter")
    exe = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    r = subprocess.run([exe, "--config", os.path.join(PACKAGE, "..", "setup.cfg")], cwd=os.path.dirname(PACKAGE),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout + r.stderr
    for contract in ("Layers: the CLI on top", "Inside the oracle", "Inside training", "Inside corpus evaluation",
                     "Inside the formats", "GGUF split by role", "Checkpoint formats never import the model object",
                     "No import cycles"):
        assert contract in r.stdout, contract
    assert "8 kept" in r.stdout


def _public_names(path: str) -> set[str]:
    """The names a module defines at its top level (functions, classes, constants), the private ones left out."""
    names = set()
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {t.id for t in (target.elts if isinstance(target, ast.Tuple) else [target])
                          if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("_")}


def test_documented_module_paths_are_real_modules():
    """The paths the README documents (minibloom.testing, .trace, .engines, .gguf) are modules of their own, named
    as imported and listing their names in __all__ (what an IDE or a type checker reads): every public name of the
    subpackage module they stand for, the very same objects, so an isinstance check through either path agrees."""
    import importlib

    import minibloom
    import minibloom.oracle.engines

    sources = {"minibloom.testing": {"minibloom.oracle.testing": None},
               "minibloom.trace": {"minibloom.oracle.trace": None},
               "minibloom.engines": {"minibloom.oracle.engines": None,
                                     "minibloom.oracle.engines_openvino": minibloom.oracle.engines._OPENVINO_NAMES},
               "minibloom.gguf": {"minibloom.formats.gguf": None}}
    for path, modules in sources.items():
        facade = importlib.import_module(path)
        assert facade.__name__ == path and facade is getattr(minibloom, path.split(".")[1]), path
        assert os.path.basename(facade.__file__) == path.split(".")[1] + ".py", facade.__file__
        assert not {"sys", "_module"} & set(vars(facade)), path
        expected = set()
        for name, only in modules.items():
            source = importlib.import_module(name)
            names = set(only or getattr(source, "__all__", None) or _public_names(source.__file__))
            assert names, name
            for n in names:
                assert getattr(facade, n) is getattr(source, n), f"{path}.{n} is not {name}.{n}"
            expected |= names
        assert set(facade.__all__) == expected, (path, sorted(expected ^ set(facade.__all__)))
    assert callable(minibloom.oracle.hf_float64_exact)
    code = ("import sys, minibloom.engines, minibloom.testing, minibloom.trace, minibloom.gguf; "
            "engines = {m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'onnxruntime', 'openvino', 'nncf', "
            "'ctranslate2', 'transformers'}; assert not engines, engines")  # the engines load when an adapter runs
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(PACKAGE))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "minibloom.gguf", "--help"], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(PACKAGE))
    assert r.returncode == 0 and "usage: python -m minibloom.gguf" in r.stdout, r.stdout + r.stderr


def test_the_model_is_defined_once():
    counts = {"block": 0, "attention": 0, "forward": 0}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    text = f.read()
                for fn in counts:
                    counts[fn] += len(re.findall(rf"^def {fn}\(", text, re.M))
    assert counts == {"block": 1, "attention": 1, "forward": 1}, counts


def test_the_wheel_ships_the_policies_and_the_default_model(tmp_path):
    """`pip install` users get what a clone has: policies.json (package data) and weights/default (installed under
    sys.prefix/share/minibloom/weights, where minibloom.paths.weights_dir looks)."""
    import glob
    import zipfile

    root = os.path.dirname(PACKAGE)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), root], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names = zipfile.ZipFile(glob.glob(str(tmp_path / "*.whl"))[0]).namelist()
    assert "minibloom/oracle/policies.json" in names
    shipped = {n.split("share/minibloom/weights/default/")[1] for n in names if "share/minibloom/weights/default/" in n}
    assert {f for f in os.listdir(os.path.join(root, "weights", "default"))} <= shipped


def test_no_cross_folder_import_hacks():
    """Tests, scripts and benchmarks import the package (and tests their own conftest/factory), never each other's
    files through sys.path or spec_from_file_location."""
    root = os.path.dirname(PACKAGE)
    hacks = re.compile(r"sys\.path\.(insert|append)|spec_from_file_location|runpy\.run_path")
    found = []
    for folder in ("minibloom", "tests", "scripts", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                path = os.path.join(dirpath, name)
                if name.endswith(".py") and path != os.path.abspath(__file__):
                    with open(path, encoding="utf-8") as f:
                        found += [f"{os.path.relpath(path, root)}:{i}" for i, line in enumerate(f, 1)
                                  if hacks.search(line)]
    assert not found, found
