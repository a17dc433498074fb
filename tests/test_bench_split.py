"""``minibloom.bench``'s decode split (products alone vs the rest of a decoding step) and its fresh-process children,
on a tiny random checkpoint (the real benchmark needs minutes and a quiet machine)."""

from __future__ import annotations

import collections
import subprocess

import numpy as np
import pytest

from minibloom import bench, fast
from minibloom.bench import children
from minibloom.config import BloomConfig
from minibloom.formats.weights import write_random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    cfg = BloomConfig(vocab_size=256, hidden_size=32, n_layer=2, n_head=4)
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, 256, progress=False)


def test_decode_split_arithmetic():
    # NEW steps of 100 ms, 90 ms of them products; the weights once at the bandwidth: 85 ms
    line = bench.decode_split(bench.NEW * 0.100, bench.NEW * 0.090, 1, 85 * 10**7, 10.0)
    assert "per token: 100.0 ms = matrix products 90.0 ms (94.4% of the roofline alone)" in line
    assert "non-product 10.0 ms (10.0% of the step)" in line and "decode = 85.0% of the sgemv roofline" in line
    line = bench.decode_split(bench.NEW * 0.200, bench.NEW * 0.170, 8, 85 * 10**7, 10.0)
    assert "per step of 8 tokens: 200.0 ms = matrix products 170.0 ms (50.0%" in line
    assert "non-product 30.0 ms (15.0% of the step)" in line and "decode = 42.5% of the sgemv roofline" in line


def test_report_prints_the_split_it_measured(capsys):
    C, L, V = 1024, 24, 250880
    n = V * C + 4 * C + L * (12 * C * C + 13 * C)
    best = {"minibloom:decode1": 8.0, "minibloom:forward_all": 3.0, "minibloom:ttft": 1.0, "minibloom:decode8": 12.0,
            "minibloom:products_decode1": 6.4, "minibloom:products_decode8": 9.6}
    res = {"C": C, "L": L, "V": V, "n_params": n, "weight_bytes": 4 * n, "gbps": 30.0, "gflops": 200.0,
           "best": best, "load": {"minibloom": 1.0}, "cold": {"minibloom": 1.0},
           "rss": {"minibloom": (4 * n, 4 * n)}, "rounds": 1}
    bench.report(res, ["minibloom"])
    out = capsys.readouterr().out
    assert f"batch-1 decode per token: {8.0 / bench.NEW * 1e3:.1f} ms = matrix products " \
           f"{6.4 / bench.NEW * 1e3:.1f} ms" in out
    assert "non-product 25.0 ms (20.0% of the step)" in out  # 1.6 s of 8 s, over 64 tokens
    assert f"batch-{bench.BATCH} decode per step of {bench.BATCH} tokens" in out
    del best["minibloom:products_decode1"], best["minibloom:products_decode8"]  # an older --json file
    bench.report(res, ["minibloom"])
    assert "non-product" not in capsys.readouterr().out


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_products_are_the_products_generate_runs(tiny, batch, monkeypatch):
    """The decode split's products alone are the very products (rows x weight shape) of ``generate``'s decoding."""
    eng = bench.MinibloomEngine(tiny)
    eng.product_inputs(bench.LONG)
    calls = collections.Counter()
    inner = fast.matmul_t

    def counted(x2, w):
        calls[(x2.shape[0], w.shape)] += 1
        return inner(x2, w)

    monkeypatch.setattr(fast, "matmul_t", counted)
    eng.generate(bench._ids(batch, bench.PROMPT, eng.vocab), bench.NEW)
    ran = dict(calls)
    calls.clear()
    eng.decode_products(batch)
    assert dict(calls) == ran
    assert ran[(batch, (256, 32))] == bench.NEW  # the head: one call per generated token, every row at once


def run_child(kind: str, engine: str, path: str) -> str:
    cmd, env = children.command(kind, engine, path)
    return subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env, timeout=120).stdout


def test_cold_child_generates_the_first_token(tiny):
    import minibloom

    out = run_child("cold", "minibloom", tiny)
    want = minibloom.load(tiny, progress=False).generate(np.arange(100, 116)[None, :], max_new_tokens=1)[0, -1]
    assert out.split() == ["TOKEN", str(int(want))]
    assert bench.cold_start("minibloom", tiny) > 0


def test_session_child_reports_its_peak_rss(tiny):
    a, b = bench.session_rss("minibloom", tiny)
    assert 10 << 20 < a <= b  # at least the interpreter and NumPy; the second peak includes the first


def test_children_run_from_their_file_with_this_minibloom():
    cmd, env = children.command("cold", "transformers", "/nowhere")
    assert cmd[1].endswith("children.py") and "-m" not in cmd  # no package import before the engine's own
    assert env["PYTHONPATH"].split(":")[0] == children.ROOT
    with pytest.raises(ValueError):
        children.command("warm", "minibloom", "/nowhere")
    with pytest.raises(ValueError):
        children.command("cold", "onnx", "/nowhere")
