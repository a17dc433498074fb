"""minibloom.oracle / `minibloom check`: minibloom vs transformers per layer; failures, missing transformers and
quantized checkpoints are reported with the right exit status."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import minibloom
import minibloom.model as M
from minibloom.oracle import hf as oracle
from minibloom.cli import main
from minibloom.errors import MinibloomError
from minibloom.testing import FP32, FP64_VS_HF
from factory import make_model, save

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.mark.parametrize("cfg", [dict(seed=22, hidden=64, n_head=4, n_layer=2),
                                 dict(seed=23, hidden=96, n_head=12, n_layer=2, post_ln=True)])
def test_check_passes_on_random_checkpoints(tmp_path, cfg, record):
    path = save(make_model(**cfg), tmp_path / "m")
    result = oracle.check(path, attentions=True, log=lambda m: None)
    assert result.passed, result.table()
    assert result.attention_mask.sum() < result.attention_mask.size  # the default inputs include left padding
    r32, r64 = result.reports["float32"], result.reports["float64"]
    assert r32.rtol == FP32.rel and r64.rtol == FP64_VS_HF.rel
    n = cfg["n_layer"]
    assert [r.name for r in r64.rows] == (["embeddings"] + [x for i in range(n) for x in
                                          (f"block {i} attention", f"block {i}")][:-1] + [f"block {n - 1} + ln_f",
                                                                                           "logits"])
    record(f"check fp32 worst ({cfg['n_head']} heads)", max(r.max_rel for r in r32.rows))
    record(f"check fp64 worst ({cfg['n_head']} heads)", max(r.max_rel for r in r64.rows))
    # float32 errors are far above the float64 tolerance: the float64 column can tell them apart
    assert max(r.max_rel for r in r32.rows) > 100 * FP64_VS_HF.rel


def test_check_cli_prints_the_table(ckpt, capsys):
    assert main(["check", "--model", ckpt, "--ids", "1,2,3,4", "--ids", "5,6"]) == 0
    out = capsys.readouterr().out
    assert "float32 max rel" in out and "float64 max rel" in out
    assert f"float32: tolerance {FP32.rel:.0e} relative; PASS" in out
    assert "float64: tolerance 1e-10 relative; PASS" in out
    assert "inputs: 2 row(s) x 4 tokens, 2 left-padding positions" in out


def test_check_finds_a_broken_block(ckpt, monkeypatch, capsys):
    import dataclasses

    from minibloom import fast

    good, calls = fast.PRIMITIVES, []

    def residual_add(a, x):  # each block adds two residuals: the 3rd and 4th calls are block 1's
        calls.append(1)
        out = good.residual_add(a, x)
        return out * 1.001 if len(calls) in (3, 4) else out

    monkeypatch.setattr(fast, "PRIMITIVES", dataclasses.replace(good, residual_add=residual_add))
    assert main(["check", "--model", ckpt, "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert "first divergence: block 1" in out and "FAIL" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("embeddings", "block 0 "))]
    assert lines and all(ln.endswith("ok") for ln in lines)


def test_hf_float64_exact_patches_and_restores():
    mb = transformers.models.bloom.modeling_bloom
    before = mb.F, mb._get_alibi_slopes
    with oracle.hf_float64_exact():
        s = mb._get_alibi_slopes(12, torch.device("cpu"))
        assert s.dtype == torch.float64
        np.testing.assert_array_equal(s.numpy(), M.alibi_slopes(12, np.float64))
        x = torch.randn(3, 5, dtype=torch.float64)
        assert mb.F.softmax(x, dim=-1, dtype=torch.float32).dtype == torch.float64
    assert (mb.F, mb._get_alibi_slopes) == before
    assert mb._get_alibi_slopes(12, torch.device("cpu")).dtype == torch.float32  # shipped behaviour is back


def test_without_transformers_check_says_so(ckpt, monkeypatch, capsys):
    def missing():
        raise MinibloomError("check: needs torch and transformers to compare against (No module named "
                             "'transformers'); install them")

    monkeypatch.setattr(oracle, "_import_hf", missing)
    assert main(["check", "--model", ckpt]) == 2
    assert "transformers (and torch) are not installed" in capsys.readouterr().err


def test_quantized_checkpoints_are_refused(tmp_path, ckpt, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["check", "--model", str(gguf)]) == 2
    assert "GGUF file is not comparable" in capsys.readouterr().err
    bnb = tmp_path / "bnb"
    bnb.mkdir()
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (bnb / "config.json").write_text(json.dumps(cfg))
    assert main(["check", "--model", str(bnb)]) == 2
    assert "bitsandbytes-quantized checkpoint is not comparable" in capsys.readouterr().err


def test_hf_trace_is_a_valid_trace(ckpt, tmp_path):
    from minibloom.trace import diff_traces, load_trace, save_trace

    ids = np.array([[1, 2, 3, 4, 5]])
    p = save_trace(oracle.hf_trace(ckpt, ids, dtype="float64"), tmp_path / "hf.npz")
    t = load_trace(p)
    assert t["meta"]["implementation"].startswith("transformers") and len(t["hidden_states"]) == 4
    mine = minibloom.trace.trace(minibloom.load(ckpt, dtype="float64"), ids)
    assert diff_traces(mine, p).passed


@pytest.mark.slow
@pytest.mark.xdist_group("bloom560m")
def test_check_on_the_560m_shape(bloom560m_dir, record):
    """The full bloom-560m shape (24 layers, 16 heads, hidden 1024, vocab 250880; random weights, fp16 on disk),
    two left-padded rows: every layer and the logits within the float32 policy of transformers."""
    from factory import left_pad, random_ids

    ids, mask = left_pad([list(random_ids(250880, 24, seed=1)), list(random_ids(250880, 17, seed=2))])
    result = oracle.check(bloom560m_dir, ids, mask, dtypes=("float32",), log=lambda m: None)
    assert result.passed, result.table()
    rows = result.reports["float32"].rows
    assert len(rows) >= 26  # embeddings, 24 layers, logits
    record("560m check float32 worst", max(r.max_rel for r in rows))


@pytest.mark.slow
@pytest.mark.xdist_group("bloom560m")
def test_check_float64_on_the_560m_layers(bloom560m_layers_dir, record):
    """bloom-560m's 24 layers of hidden 1024 and 16 heads in float64: exact to the float64 policy at every layer."""
    ids = np.random.default_rng(1).integers(0, 4096, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    result = oracle.check(bloom560m_layers_dir, ids, mask, dtypes=("float64",), log=lambda m: None)
    assert result.passed, result.table()
    assert len(result.reports["float64"].rows) >= 25  # embeddings + 24 layers (+ logits)
    record("560m layers float64 worst", max(r.max_rel for r in result.reports["float64"].rows))
