"""Corpus evaluation (minibloom.evaluate, ``minibloom perplexity`` / ``minibloom kl``) against computations written
here: transformers' perplexity-guide loop over the model's logits (NumPy, and transformers' own loss), KL from
hand-written softmaxes; and the same results, to the last bit, on a real Dask LocalCluster of 2 worker processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import minibloom
from minibloom import evaluate as E
from minibloom.cli import main
from minibloom.formats.weights import flatten, tree_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "weights", "default")
CORPUS = os.path.join(ROOT, "data", "tinyshakespeare.txt")


@pytest.fixture(scope="module")
def text() -> str:
    """~1200 characters (~430 tokens) of the default model's held-out split."""
    with open(CORPUS, encoding="utf-8") as f:
        corpus = f.read()
    start = int(len(corpus) * 0.9)
    return corpus[start:start + 1200]


@pytest.fixture(scope="module")
def text_file(text, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("eval") / "held_out.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def m32():
    return minibloom.load()


@pytest.fixture(scope="module")
def m64():
    return minibloom.load(dtype="float64")


def perturbed_params(model, seed: int = 5, scale: float = 0.05) -> dict:
    rng = np.random.default_rng(seed)
    return tree_map(lambda a: (a * (1 + scale * rng.standard_normal(a.shape))).astype(a.dtype), model.params)


@pytest.fixture(scope="module")
def cand32(m32):
    """The default model with every parameter scaled by 1 + N(0, 0.05): a candidate some distance away."""
    return minibloom.Bloom(m32.config, perturbed_params(m32), "float32", tokenizer=m32.tokenizer, path="perturbed")


@pytest.fixture(scope="module")
def cand_dir(cand32, tmp_path_factory) -> str:
    """The perturbed candidate as a checkpoint directory (for the Dask workers and the CLI)."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("cand") / "perturbed"
    d.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in flatten(cand32.params).items()}, str(d / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEFAULT, name), d / name)
    return str(d)


# ---- the independent computation: transformers' guide, written out ----------------------------------------------

def log_softmax(z) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def guide_rows(logits_of, ids, max_length: int, stride: int):
    """transformers' perplexity guide loop (labels -100 but for the last trg_len of each window, then the model's
    shift by one), returning what its loss averages over: the logits rows [n, V] and their labels [n], in order."""
    rows, labels, prev_end_loc, seq_len = [], [], 0, len(ids)
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = np.asarray(ids[begin_loc:end_loc])
        target_ids = input_ids.copy()
        target_ids[:-trg_len] = -100
        shift_logits, shift_labels = logits_of(input_ids)[:-1], target_ids[1:]
        keep = shift_labels != -100
        rows.append(shift_logits[keep])
        labels.append(shift_labels[keep])
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return np.concatenate(rows), np.concatenate(labels)


def guide_nll(model, ids, context, stride) -> tuple[float, int]:
    z, y = guide_rows(lambda x: model(x[None])[0], ids, context, stride)
    nll = -log_softmax(z)[np.arange(len(y)), y]
    return float(nll.sum()), len(y)


def rel(a, b) -> float:
    return abs(a - b) / abs(b)


# ---- windows -------------------------------------------------------------------------------------------------------

def test_windows_are_the_guides():
    W = E.Window
    assert E.windows(10, 4, 2) == [W(0, 4, 1), W(2, 6, 4), W(4, 8, 6), W(6, 10, 8)]
    assert E.windows(9, 4, 4) == [W(0, 4, 1), W(4, 8, 5), W(8, 9, 9)]  # the last one scores nothing
    assert E.windows(3, 8, 4) == [W(0, 3, 1)]
    assert E.windows(7, 4, 3) == [W(0, 4, 1), W(3, 7, 4)]


@st.composite
def window_args(draw) -> tuple[int, int]:
    """(context, stride) as check_window_args accepts them: 2 <= context, 1 <= stride <= context."""
    context = draw(st.integers(2, 80))
    return context, draw(st.one_of(st.just(context), st.just(1), st.integers(1, context)))


@given(n=st.integers(2, 200), window=window_args())
@example(n=2, window=(2, 1))  # the smallest text and window
@example(n=3, window=(4, 1))  # a text shorter than the context
@example(n=17, window=(8, 3))
@example(n=64, window=(8, 8))  # no overlap, the last window ending at the text's end
@example(n=65, window=(8, 7))  # one token past a whole number of strides
@example(n=65, window=(16, 16))
@example(n=17, window=(5, 2))
def test_each_token_is_scored_at_most_once_with_context_before_it(n, window):
    context, stride = window
    ws = E.windows(n, context, stride)
    scored = np.zeros(n, int)
    for w in ws:
        assert w.end - w.begin <= context and w.begin < w.first <= w.end
        scored[w.first:w.end] += 1
    assert scored[0] == 0 and scored.max() == 1 and ws[-1].end == n
    begins = [w.begin for w in ws]
    assert begins == list(range(0, stride * len(ws), stride))
    # what transformers' loss averages over: every token but the first, or (no overlap) all but each window's first
    assert scored.sum() == (n - 1 if stride < context else n - len(ws))


# ---- perplexity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("context, stride", [(64, 32), (64, 64), (48, 5), (1000, 200)],
                         ids=["overlap", "no-overlap", "small-stride", "text-shorter-than-context"])
def test_perplexity_is_the_guides_exact_sum(m32, m64, text, context, stride):
    for model in (m64, m32):
        ids = np.asarray(model.encode(text))
        nll, n = guide_nll(model, ids, context, stride)
        got = E.perplexity(model, text, context=context, stride=stride)
        assert got["tokens"] == n == (len(ids) - 1 if stride < context or context > len(ids) else
                                      len(ids) - got["windows"])
        assert rel(got["nll"], nll) < 1e-12
        assert rel(got["perplexity"], math.exp(nll / n)) < 1e-12
        assert got["input_tokens"] == len(ids) and got["dtype"] == model.dtype
        assert (got["context"], got["stride"], got["workers"]) == (context, stride, 0)
        assert got["windows"] == len(range(0, len(ids), stride)[:math.ceil(max(len(ids) - context, 0) / stride) + 1])


def test_perplexity_matches_transformers_loss_times_its_label_count(text):
    """transformers' own loop, with the model's loss over each window's labels times the number of labels it really
    averages over; float32 both sides."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.BloomForCausalLM.from_pretrained(DEFAULT, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    m = minibloom.load()
    ids = torch.tensor([m.encode(text)])
    max_length, stride, seq_len = 64, 24, ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        count = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * count
        n_tokens += count
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    got = E.perplexity(m, text, context=max_length, stride=stride)
    assert got["tokens"] == n_tokens == seq_len - 1
    assert rel(got["nll"], nll_sum) < 1e-5
    assert rel(got["perplexity"], math.exp(nll_sum / n_tokens)) < 1e-5


def test_token_ids_text_and_default_model_give_the_same_result(m32, text):
    ids = m32.encode(text)
    a = E.perplexity(m32, text, context=64, stride=32)
    b = E.perplexity(None, ids, context=64, stride=32)
    c = E.perplexity(DEFAULT, np.asarray([ids]), context=64, stride=32)
    assert a["nll"] == b["nll"] == c["nll"] and a["tokens"] == b["tokens"] == c["tokens"]


# ---- KL ------------------------------------------------------------------------------------------------------------

def test_kl_of_a_model_with_itself_is_zero(m32, text):
    r = E.kl(m32, m32, text, context=64, stride=32)
    assert r["kl_mean"] == r["kl_max"] == 0.0 and r["top1"] == 1.0
    assert r["perplexity"] == r["perplexity_candidate"] and r["ln_ppl_ratio"] == 0.0
    assert r["perplexity"] == E.perplexity(m32, text, context=64, stride=32)["perplexity"]


def independent_kl(ref, cand, ids, context, stride) -> dict:
    zr, y = guide_rows(lambda x: ref(x[None])[0], ids, context, stride)
    zc, _ = guide_rows(lambda x: cand(x[None])[0], ids, context, stride)
    lp, lq = log_softmax(zr), log_softmax(zc)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    at = np.arange(len(y))
    return {"kl": kl, "top1": np.mean(zr.argmax(-1) == zc.argmax(-1)), "nll_ref": -lp[at, y].sum(),
            "nll_cand": -lq[at, y].sum(), "dp": np.exp(lq[at, y]) - np.exp(lp[at, y]), "rows": zr}


def check_kl(r: dict, want: dict, tol: float = 1e-9) -> None:
    kl = want["kl"]
    assert r["tokens"] == len(kl)
    assert 1e-4 < r["kl_mean"] and rel(r["kl_mean"], kl.mean()) < tol and rel(r["kl_max"], kl.max()) < tol
    assert rel(r["kl_median"], np.median(kl)) < tol and rel(r["kl_min"], kl.min()) < tol
    for q in ("99.9", "99.0", "95.0", "90.0", "10.0", "5.0", "1.0"):
        assert rel(r["kl_percentiles"][q], np.percentile(kl, float(q))) < tol, q
    assert abs(r["kl_mean_stderr"] - kl.std(ddof=1) / math.sqrt(len(kl))) < tol * kl.mean()
    assert r["top1"] == want["top1"] and 0.5 < r["top1"] < 1
    assert rel(r["nll"], want["nll_ref"]) < 1e-12 and rel(r["nll_candidate"], want["nll_cand"]) < 1e-12
    assert rel(r["ln_ppl_ratio"], (want["nll_cand"] - want["nll_ref"]) / len(kl)) < 1e-9
    assert abs(r["delta_p"]["mean"] - want["dp"].mean()) < 1e-12


def test_kl_against_a_perturbed_candidate(m32, cand32, text):
    ids = np.asarray(m32.encode(text))
    r = E.kl(m32, cand32, text, context=64, stride=24)
    check_kl(r, independent_kl(m32, cand32, ids, 64, 24))
    assert r["candidate"] == "perturbed"


def test_kl_with_an_external_engines_logits(m32, cand32, text, tmp_path):
    """The candidate as a .npy of logits rows made by 'another engine' (here the candidate model, windows from the
    guide loop written in this test), and as the .npz --save-logits writes."""
    ids = np.asarray(m32.encode(text))
    want = independent_kl(m32, cand32, ids, 64, 24)
    zc, _ = guide_rows(lambda x: cand32(x[None])[0], ids, 64, 24)
    np.save(tmp_path / "engine.npy", zc)
    from_file = E.kl(m32, str(tmp_path / "engine.npy"), text, context=64, stride=24)
    check_kl(from_file, want)
    in_memory = E.kl(m32, cand32, text, context=64, stride=24)
    assert {k: v for k, v in from_file.items() if k not in ("seconds", "candidate", "candidate_dtype")} == \
        {k: v for k, v in in_memory.items() if k not in ("seconds", "candidate", "candidate_dtype")}
    np.testing.assert_array_equal(
        E.kl(m32, zc.astype(np.float64), ids, context=64, stride=24)["kl_percentiles"]["99.0"],
        from_file["kl_percentiles"]["99.0"])

    # --save-logits: the reference's rows, the ids, the windows; read back as a candidate, KL 0
    saved = tmp_path / "ref.npz"
    r = E.kl(m32, None, text, context=64, stride=24, save_logits_to=saved)
    assert "kl_mean" not in r and r["saved_logits"] == str(saved)
    with np.load(saved) as z:
        np.testing.assert_array_equal(z["logits"], want["rows"])
        np.testing.assert_array_equal(z["input_ids"], ids)
        assert [tuple(w) for w in z["windows"]] == [(w.begin, w.end, w.first) for w in E.windows(len(ids), 64, 24)]
    back = E.kl(m32, str(saved), text, context=64, stride=24)
    assert back["kl_max"] == 0.0 and back["top1"] == 1.0


@pytest.mark.parametrize("make, match", [
    (lambda z, ids: (z[:-1], {}), "rows of logits"),
    (lambda z, ids: (z[:, :100], {}), "vocab"),
    (lambda z, ids: (z, {"windows": np.zeros((3, 3), np.int64)}), "windows"),
    (lambda z, ids: (z, {"input_ids": ids[::-1].copy()}), "input_ids"),
    (lambda z, ids: (np.where(np.arange(len(z))[:, None] == 3, np.nan, z), {}), "NaN"),
    (lambda z, ids: (z.astype(np.int32), {}), "float array"),
])
def test_bad_logits_files_are_errors(m32, text, tmp_path, make, match):
    ids = np.asarray(m32.encode(text))
    z, _ = guide_rows(lambda x: m32(x[None])[0], ids, 64, 32)
    logits, extra = make(z, ids)
    np.savez(tmp_path / "bad.npz", logits=logits, **extra)
    with pytest.raises(minibloom.MinibloomError, match=match):
        E.kl(m32, str(tmp_path / "bad.npz"), text, context=64, stride=32)


# ---- bad arguments -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"context": 1}, "context"), ({"context": 0}, "context"), ({"context": E.MAX_CONTEXT + 1}, "context"),
    ({"context": 8, "stride": 0}, "stride"), ({"context": 8, "stride": 9}, "stride"), ({"context": 8.0}, "context"),
    ({"workers": 0}, "workers"), ({"workers": 2, "scheduler": "tcp://localhost:1"}, "one of them"),
    ({"dtype": "float64"}, "dtype"), ({"low_memory": True}, "low_memory"),
])
def test_bad_arguments_are_minibloom_errors(m32, kwargs, match):
    with pytest.raises(minibloom.MinibloomError, match=match):
        E.perplexity(m32, "ROMEO: hello there", **kwargs)


def test_too_short_text_and_bad_ids_are_errors(m32):
    with pytest.raises(minibloom.MinibloomError, match="at least 2"):
        E.perplexity(m32, [5], context=8)
    with pytest.raises(minibloom.MinibloomError, match="out of range"):
        E.perplexity(m32, [5, m32.vocab_size], context=8)
    with pytest.raises(minibloom.MinibloomError, match="1-D"):
        E.perplexity(m32, [[1, 2], [3, 4]], context=8)
    with pytest.raises(minibloom.MinibloomError, match="candidate"):
        E.kl(m32, None, [1, 2, 3], context=8)
    with pytest.raises(minibloom.MinibloomError, match=r"\.npz"):
        E.kl(m32, None, [1, 2, 3], context=8, save_logits_to="x.npy")


def test_a_window_too_big_for_memory_is_refused(m32, monkeypatch):
    monkeypatch.setattr("minibloom.evaluate.corpus.memory_bytes", lambda: 1 << 20)
    with pytest.raises(minibloom.MinibloomError, match="smaller context"):
        E.perplexity(m32, list(range(300)), context=256)


# ---- the command line ----------------------------------------------------------------------------------------------

def cli(*argv) -> subprocess.CompletedProcess:
    """``python -m minibloom`` of this checkout, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "minibloom", *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_cli_perplexity_json_is_the_last_line_of_stdout(m32, text, text_file):
    r = cli("perplexity", text_file, "--context", "64", "--stride", "32", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    want = E.perplexity(m32, text, context=64, stride=32)
    assert {k: got[k] for k in ("perplexity", "tokens", "nll", "windows")} == \
        {k: want[k] for k in ("perplexity", "tokens", "nll", "windows")}
    assert got["context"] == 64 and got["stride"] == 32 and got["model"] and got["seconds"] >= 0
    assert "window" in r.stderr  # the progress bar


def test_cli_human_summaries(capsys, m32, text, text_file, cand_dir):
    assert main(["perplexity", text_file, "--context", "64", "--stride", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    ppl = E.perplexity(m32, text, context=64, stride=32)["perplexity"]
    assert f"perplexity  {ppl:.6f}" in out and "this process" in out
    assert main(["kl", text_file, "--candidate", cand_dir, "--context", "64", "--stride", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    r = E.kl(m32, cand_dir, text, context=64, stride=32)
    for row in ("mean KL", f"{r['kl_mean']:.6e}", "99.9% KL", "median KL", "same top p", f"{100 * r['top1']:.3f}"):
        assert row in out, row


def test_cli_kl_json_and_save_logits(capsys, text_file, tmp_path):
    saved = str(tmp_path / "ref.npz")
    assert main(["kl", text_file, "--context", "64", "--dtype", "float64", "--save-logits", saved, "--json",
                 "--no-progress"]) == 0
    ref = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert ref["saved_logits"] == saved and "kl_mean" not in ref
    assert main(["kl", text_file, "--context", "64", "--dtype", "float64", "--candidate", saved, "--json",
                 "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got["kl_max"] == 0.0 and got["top1"] == 1.0 and got["perplexity"] == ref["perplexity"]


@pytest.mark.parametrize("argv, match", [
    (["perplexity", "{file}", "--context", "1"], "context"),
    (["perplexity", "{file}", "--context", "8", "--stride", "9"], "stride"),
    (["perplexity", "{file}", "--context", "8", "--stride", "0"], "stride"),
    (["perplexity", "{file}", "--context", str(E.MAX_CONTEXT + 1)], "context"),
    (["perplexity", "{dir}/missing.txt"], "no such file"),
    (["perplexity", "{dir}"], "is a directory"),
    (["perplexity", "{dir}/binary.txt"], "not UTF-8"),
    (["perplexity", "{dir}/empty.txt"], "empty"),
    (["perplexity", "{file}", "--workers", "0"], "workers"),
    (["perplexity", "{file}", "--workers", "2", "--scheduler", "tcp://localhost:1"], "one of them"),
    (["kl", "{file}"], "--candidate"),
    (["kl", "{file}", "--candidate", "{dir}/none.npy"], "no such logits file"),
    (["kl", "{file}", "--save-logits", "{dir}/x.npy"], ".npz"),
    (["kl", "{file}", "--candidate", "{dir}/none.npz", "--candidate-dtype", "float64"], "logits file"),
])
def test_cli_errors_are_one_line(capsys, tmp_path, text_file, argv, match):
    (tmp_path / "binary.txt").write_bytes(b"ROMEO \xff\xfe")
    (tmp_path / "empty.txt").write_text("")
    argv = [a.format(file=text_file, dir=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and f"minibloom {argv[0]}: error:" in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_import_minibloom_does_not_import_dask():
    code = ("import sys, minibloom, minibloom.evaluate, minibloom.evaluate.distributed, minibloom.cli.kl; "
            "assert not {'dask', 'distributed'} & set(sys.modules), sorted(m for m in sys.modules if 'dask' in m)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr


def test_without_dask_the_error_says_what_to_install(m32, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(minibloom.MinibloomError, match=r"pip install minibloom\[dask\]"):
        E.perplexity(None, [1, 2, 3, 4], context=4, workers=1)


# ---- Dask: a real LocalCluster of 2 worker processes -------------------------------------------------------------

dask = pytest.mark.xdist_group("dask")


@dask
def test_the_workers_run_this_checkout(dask_client):
    assert len(dask_client.scheduler_info()["workers"]) == 2
    files = dask_client.run(lambda: __import__("minibloom").__file__)
    assert set(files.values()) == {minibloom.__file__}


@dask
@pytest.mark.parametrize("dtype, context, stride", [("float32", 64, 24), ("float64", 48, 48)])
def test_dask_perplexity_is_bitwise_the_single_process_one(dask_client, text, dtype, context, stride):
    from minibloom.evaluate.distributed import cached_models

    local = E.perplexity(None, text, context=context, stride=stride, dtype=dtype)
    spread = E.perplexity(None, text, context=context, stride=stride, dtype=dtype, client=dask_client)
    assert spread["workers"] == 2 and spread["windows"] == local["windows"] > 4
    for key in ("perplexity", "nll", "tokens", "input_tokens"):
        assert spread[key] == local[key], key
    again = E.perplexity(DEFAULT, text, context=context, stride=stride, dtype=dtype, client=dask_client)
    assert again["nll"] == local["nll"]
    for loaded in dask_client.run(cached_models).values():  # each worker loaded each model at most once
        assert set(loaded.values()) <= {1}


@dask
def test_dask_kl_is_bitwise_the_single_process_one(dask_client, m32, cand_dir, text, tmp_path):
    local = E.kl(DEFAULT, cand_dir, text, context=64, stride=24)
    spread = E.kl(DEFAULT, cand_dir, text, context=64, stride=24, client=dask_client)
    ignore = ("seconds", "workers")
    assert {k: v for k, v in spread.items() if k not in ignore} == {k: v for k, v in local.items() if k not in ignore}
    assert local["kl_mean"] > 1e-4 and spread["workers"] == 2
    # an external engine's logits file, sliced window by window to the workers; and the reference's, saved by them
    saved = str(tmp_path / "ref.npz")
    E.kl(DEFAULT, None, text, context=64, stride=24, save_logits_to=saved, client=dask_client)
    with np.load(saved) as z:
        ids = np.asarray(m32.encode(text))
        np.testing.assert_array_equal(z["logits"], guide_rows(lambda x: m32(x[None])[0], ids, 64, 24)[0])
    back = E.kl(cand_dir, saved, text, context=64, stride=24, client=dask_client)
    want = E.kl(cand_dir, DEFAULT, text, context=64, stride=24)
    assert back["kl_mean"] == want["kl_mean"] and back["top1"] == want["top1"]


@dask
def test_dask_needs_a_path_and_reports_worker_errors(dask_client, m32, tmp_path):
    with pytest.raises(minibloom.MinibloomError, match="pass its path"):
        E.perplexity(m32, [1, 2, 3], context=4, client=dask_client)
    with pytest.raises(minibloom.MinibloomError, match="missing"):
        E.perplexity(str(tmp_path / "missing"), [1, 2, 3], context=4, client=dask_client)


@dask
def test_cli_workers_2_gives_the_single_process_result(m32, text, text_file):
    r = cli("perplexity", text_file, "--context", "64", "--stride", "24", "--workers", "2", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    want = E.perplexity(m32, text, context=64, stride=24)
    assert got["workers"] == 2 and (got["perplexity"], got["nll"], got["tokens"]) == \
        (want["perplexity"], want["nll"], want["tokens"])


def test_the_measurement_script_parses_its_command_line():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "eval_dask.py"), "--help"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
