"""Hostile inputs, second wave (issue 27): Dask addresses, ``minibloom.evaluate``'s options, external logits and
candidates for ``kl``, ``verify`` / ``check_logits`` inputs, the first wave's leftovers (config numbers, bnb offsets,
huge safetensors headers, generate / forward sizes, dtypes, templates, pads, prompts, argv, GGUF shapes) and the
first-hour claims (in-process vs Dask bits, ``bench`` without the test extra, a converted GGUF's chat template).

Every case must end in a ``MinibloomError`` naming the argument / file / tensor, quickly: the cases that could hang or
allocate gigabytes run under ``bounds.bounded`` (a time and an address-space limit) or in a child process with a
timeout, so a regression fails instead of hanging the run."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from bounds import bounded

import minibloom
from minibloom import evaluate as E
from minibloom.cli import main
from minibloom.errors import MinibloomError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "weights", "default")
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nIt is the east, and I the sun."


@pytest.fixture(scope="module")
def m32():
    return minibloom.load()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from minibloom.formats.weights import write_random_checkpoint

    cfg = minibloom.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "m", cfg, 64, np.float32, progress=False)


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``minibloom ARGV`` in this process: (exit code, stdout, stderr); never a traceback."""
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "unexpected" not in err, err
    return rc, out, err


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if evaluate loads a model: the arguments must be refused before any work."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr("minibloom.evaluate.corpus.load", refuse)


# ---- 1. Dask addresses ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, match", [
    ("tcp://", "expected tcp://HOST:PORT"), ("http://x", "unknown scheme 'http'"), ("tcp://:8786", "HOST:PORT"),
    ("tcp://host:99999", "port '99999'"), ("tcp://host:port", "port 'port'"), ("", "expected an address"),
    (5, "expected an address"), ("inproc://", "no address"), ("tcp://a b:1", "HOST:PORT"),
])
def test_bad_scheduler_addresses_are_refused_naming_scheduler(no_loading, address, match):
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="--scheduler") as e:
        E.perplexity(None, TEXT, context=8, scheduler=address)
    assert match in str(e.value)


def test_good_scheduler_addresses_are_normalised():
    from minibloom.evaluate.distributed import check_scheduler

    assert check_scheduler("localhost:8786") == "tcp://localhost:8786"
    assert check_scheduler("tcp://10.0.0.1") == "tcp://10.0.0.1:8786"
    assert check_scheduler("tls://[::1]:9000") == "tls://[::1]:9000"


@pytest.mark.parametrize("argv, match", [
    (["--scheduler", "tcp://"], "--scheduler tcp://"), (["--scheduler", "http://x"], "unknown scheme"),
    (["--scheduler", "tcp://h:1", "--scheduler-timeout", "nan"], "--scheduler-timeout"),
    (["--scheduler", "tcp://h:1", "--scheduler-timeout", "0"], "--scheduler-timeout"),
])
def test_cli_scheduler_errors_are_one_line(capsys, tmp_path, argv, match):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    for command in ("perplexity", "kl"):
        extra = ["--candidate", DEFAULT] if command == "kl" else []
        rc, out, err = cli(capsys, command, str(f), "--context", "8", *extra, *argv)
        assert rc == 2 and out == "" and err.count("\n") == 1 and match in err, err


def test_an_unreachable_scheduler_says_what_it_waits_for_and_gives_up(capsys):
    pytest.importorskip("distributed")
    with bounded(seconds=30, megabytes=2048), \
            pytest.raises(MinibloomError, match=r"--scheduler tcp://127.0.0.1:1: cannot connect within 1 s"):
        E.perplexity(None, TEXT, context=8, scheduler="tcp://127.0.0.1:1", scheduler_timeout=1)
    err = capsys.readouterr().err
    assert "connecting to the Dask scheduler at tcp://127.0.0.1:1 (giving up after 1 s)" in err


# ---- 2. minibloom.evaluate's options ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"load_options": {"bogus": 1}}, "load_options: 'bogus' is not a minibloom.load keyword"),
    ({"load_options": {"dtype": "float64"}}, "load_options: 'dtype'"),
    ({"load_options": [("low_memory", True)]}, "load_options: expected a dict"),
    ({"client": "x"}, "client: expected a dask.distributed.Client"),
    ({"client": 5}, "client"),
    ({"dtype": "float16"}, "dtype"), ({"dtype": np.float32}, "dtype"),
    ({"progress": "yes"}, "progress"), ({"low_memory": "no"}, "low_memory"),
    ({"scheduler_timeout": -1}, "scheduler_timeout"), ({"scheduler_timeout": float("inf")}, "scheduler_timeout"),
    ({"workers": np.int64(0)}, "workers"), ({"workers": 10**30}, "workers"),
    ({"context": 10**30}, "context"), ({"stride": -1}, "stride"),
])
def test_evaluate_arguments_are_checked_before_any_work(no_loading, kwargs, match):
    for fn in (lambda **k: E.perplexity(None, TEXT, **k), lambda **k: E.kl(None, DEFAULT, TEXT, **k)):
        with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=re.escape(match)):
            fn(**{"context": 8, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    ({"candidate_dtype": "int8"}, "candidate_dtype"), ({"candidate": 3.5}, "candidate: expected"),
    ({"save_logits_to": "/nonexistent-dir/x.npz"}, "does not exist"), ({"save_logits_to": "x.npy"}, ".npz"),
    ({"save_logits_to": 7}, "save_logits"),
])
def test_kl_arguments_are_checked_before_any_work(no_loading, kwargs, match):
    kw = {"candidate": DEFAULT, **kwargs}
    with pytest.raises(MinibloomError, match=re.escape(match)):
        E.kl(None, kw.pop("candidate"), TEXT, context=8, **kw)


@pytest.mark.parametrize("text", [None, 5, {"a": 1}, b"bytes", object()])
def test_text_of_the_wrong_type_is_refused(no_loading, text):
    with pytest.raises(MinibloomError, match="text_or_ids"):
        E.perplexity(None, text, context=8)


# ---- 3. external logits and candidates for kl --------------------------------------------------------------------

def npz_with_header(path, shape, descr="<f4", payload=b"\0" * 64) -> str:
    """An .npz whose logits.npy member claims ``shape`` but holds ``payload`` only."""
    from numpy.lib import format as npy

    head = io.BytesIO()
    npy.write_array_header_1_0(head, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("logits.npy", head.getvalue() + payload)
    return str(path)


def test_an_npz_member_claiming_terabytes_is_refused_before_allocating(m32, tmp_path):
    path = npz_with_header(tmp_path / "huge.npz", (2**20, 2**20))
    with bounded(seconds=10, megabytes=256), pytest.raises(MinibloomError, match="huge.npz: member 'logits.npy'"):
        E.kl(m32, path, TEXT, context=8)


@pytest.mark.parametrize("content", [b"PK\x03\x04" + b"\xff" * 200, b"", b"not a zip at all"])
def test_a_broken_zip_is_refused(m32, tmp_path, content):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with bounded(seconds=10, megabytes=256), pytest.raises(MinibloomError, match="broken.npz"):
        E.kl(m32, str(path), TEXT, context=8)


def test_a_zip_whose_member_is_cut_short_is_refused(m32, tmp_path):
    np.savez(tmp_path / "ok.npz", logits=np.zeros((50, m32.vocab_size), np.float32))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(MinibloomError, match="cut.npz"):
        E.read_logits(tmp_path / "cut.npz")


def test_a_fifo_is_not_read_as_a_logits_file(m32, tmp_path):
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="not a regular file"):
        E.read_logits(fifo)


@pytest.fixture(scope="module")
def swapped(tmp_path_factory) -> tuple[str, tuple[int, int]]:
    """The default model with token ids 300 and 301 swapped in its tokenizer (same weights, same vocab size)."""
    d = tmp_path_factory.mktemp("swapped") / "m"
    shutil.copytree(DEFAULT, d)
    with open(d / "tokenizer.json", encoding="utf-8") as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[300]], vocab[by_id[301]] = 301, 300
    with open(d / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tj, f)
    return str(d), (300, 301)


def test_a_candidate_with_another_tokenizer_is_refused_naming_the_ids(m32, swapped):
    path, (a, b) = swapped
    with pytest.raises(MinibloomError, match=rf"candidate {re.escape(path)}: its tokenizer differs .* at 2 token "
                                             rf"id\(s\): {a} .*{b} "):
        E.kl(m32, path, TEXT, context=16)


def test_a_candidate_with_a_smaller_vocabulary_is_named(m32, tiny):
    with pytest.raises(MinibloomError, match=rf"candidate {re.escape(tiny)}: its vocabulary has 64 ids and the "
                                             rf"reference's .* {m32.vocab_size}"):
        E.kl(m32, tiny, TEXT, context=16)


def test_check_same_vocabulary_compares_every_id():
    E.check_same_vocabulary((3, ["a", "b", "c"]), (3, ["a", "b", "c"]), "r", "c")
    E.check_same_vocabulary((3, None), (3, ["x", "y", "z"]), "r", "c")  # no tokenizer: only the sizes compare
    with pytest.raises(MinibloomError, match=r"at 1 token id\(s\): 2 \('c' vs None\)"):
        E.check_same_vocabulary((3, ["a", "b", "c"]), (3, ["a", "b"]), "r", "c")
    with pytest.raises(MinibloomError, match=r"at 8 token id\(s\): 0 \('a' vs 'h'\).* and 3 more"):
        E.check_same_vocabulary((8, list("abcdefgh")), (8, list("hgfedcba")), "r", "c")


# ---- 4. verify / check_logits --------------------------------------------------------------------------------------

LOGITS = np.random.default_rng(0).standard_normal((1, 4, 8))
IDS = np.array([[1, 2, 3, 4]])


@pytest.mark.parametrize("kwargs, match", [
    ({"input_ids": [1, 2, 3]}, r"input_ids: shape \(1, 3\) does not match the logits' \[B, T\] \(1, 4\)"),
    ({"input_ids": [["a", "b", "c", "d"]]}, "input_ids: token ids must be integers"),
    ({"actual": [["a"]]}, "logits: dtype <U1"),
    ({"actual": LOGITS + 1j}, "logits: complex values"),
    ({"reference": LOGITS.astype(np.complex64)}, "reference: complex values"),
    ({"actual": [[1.0, 2.0], [3.0]]}, "logits: not an array of numbers"),
    ({"actual": object()}, "logits: dtype object"),
    ({"attention_mask": [[2, 1, 1, 1]]}, "attention_mask: values must be 0"),
    ({"attention_mask": [["x", "y", "z", "w"]]}, "attention_mask"),
    ({"actual": np.zeros((1, 4, 0)), "reference": np.zeros((1, 4, 0))}, "logits: shape"),
])
def test_check_logits_refuses_what_it_cannot_judge(kwargs, match):
    from minibloom.oracle.testing import check_logits

    kw = {"actual": LOGITS, "reference": LOGITS, **kwargs}
    with pytest.raises(MinibloomError, match=match):
        check_logits(kw.pop("actual"), kw.pop("reference"), **kw)


def test_check_logits_still_passes_real_input():
    from minibloom.oracle.testing import check_logits

    v = check_logits(LOGITS.astype(np.float32), LOGITS, input_ids=IDS[0], attention_mask=[1, 1, 1, 0], size=(2, 8))
    row, pos, _ = v.worst  # the worst logit is at a real position, and the verdict names the input token there
    assert v.passed and v.positions == 3 and pos < 3 and v.input_id == IDS[row, pos]


@pytest.mark.parametrize("trace, match", [
    ({"input_ids": IDS, "grads": {"lm_head.weight": np.zeros((8, 4))}}, "no logits to judge"),
    ({"input_ids": np.array([[1, 2, 3]]), "logits": LOGITS}, r"logits: shape \(1, 4, 8\) does not match input_ids"),
    ({"input_ids": np.array([["a", "b", "c", "d"]]), "logits": LOGITS}, "input_ids must be integers"),
    ({"input_ids": IDS, "logits": LOGITS + 1j}, "logits: an array of complex128"),
    ({"input_ids": IDS, "logits": [[[1.0], [2.0, 3.0]]]}, "logits: not an array"),
    ({"input_ids": IDS, "logits": LOGITS, "labels": np.array([[1, 2, 99, 3]])}, r"labels\[0, 2\] = 99 is not a token"),
    ({"input_ids": IDS, "logits": LOGITS, "labels": np.array([[1, -5, 2, 3]])}, r"labels\[0, 1\] = -5"),
    ({1: 2}, "string keys"),
])
def test_verify_refuses_what_it_cannot_judge(trace, match):
    from minibloom.oracle.trace import verify_trace

    with bounded(seconds=10, megabytes=512), pytest.raises(MinibloomError, match=match):
        verify_trace(trace, DEFAULT)


def test_labels_out_of_range_in_both_traces_are_refused_by_diff(tmp_path):
    from minibloom.oracle.trace import diff_traces, load_trace, save_trace

    tr = {"input_ids": IDS, "logits": LOGITS, "labels": np.array([[1, 2, 3, 50]]), "meta": {}}
    np.savez(tmp_path / "t.npz", input_ids=IDS, logits=LOGITS, labels=np.array([[1, 2, 3, 50]]))
    with pytest.raises(MinibloomError, match=r"labels\[0, 3\] = 50"):
        diff_traces(tr, tr)
    with pytest.raises(MinibloomError, match=r"t.npz: labels\[0, 3\] = 50"):
        load_trace(tmp_path / "t.npz")
    ok = {**tr, "labels": np.array([[1, 2, 3, -100]])}
    save_trace(ok, tmp_path / "ok.npz")
    assert diff_traces(str(tmp_path / "ok.npz"), ok).passed


# ---- 5. left from the first wave -----------------------------------------------------------------------------------

def config_with(src: str, dst, literal: str) -> str:
    """A copy of checkpoint ``src`` whose config.json has ``layer_norm_epsilon`` written as the JSON text
    ``literal``."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "config.json":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        text = f.read()
    text = re.sub(r'"layer_norm_epsilon":\s*[^,}]+', f'"layer_norm_epsilon": {literal}', text)
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(text)
    return str(dst)


@pytest.mark.parametrize("literal, match", [
    ("9" * 400, r"layer_norm_epsilon must be a number in \(0, 1\], got 9999"),
    ("NaN", "layer_norm_epsilon = NaN is not valid JSON"), ("Infinity", "layer_norm_epsilon = Infinity"),
    ("-Infinity", "layer_norm_epsilon = -Infinity"), ("1e999", "layer_norm_epsilon: a number out of range"),
    ("0", "layer_norm_epsilon must be"), ("-1e-5", "layer_norm_epsilon must be"), ("2", "layer_norm_epsilon must"),
    ('"1e-5"', "layer_norm_epsilon must be"), ("true", "layer_norm_epsilon must be"),
])
def test_epsilon_literals_are_refused_naming_the_key(capsys, tiny, tmp_path, literal, match):
    path = config_with(tiny, tmp_path / "m", literal)
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=match):
        minibloom.load(path)
    rc, out, err = cli(capsys, "info", path)
    assert rc == 2 and err.count("\n") == 1 and "layer_norm_epsilon" in err, err


def test_a_safetensors_header_listing_a_million_tensors_is_refused_at_once(tmp_path):
    from minibloom.formats.safetensors import MAX_TENSORS, parse_header

    entry = '"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
    text = ("{" + ", ".join(entry % i for i in range(10**6)) + "}").encode()
    raw = struct.pack("<Q", len(text)) + text
    with bounded(seconds=5, megabytes=512), pytest.raises(MinibloomError, match=f"more than {MAX_TENSORS} tensors"):
        parse_header(raw, len(raw), "forged.safetensors")
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(os.path.join(DEFAULT, "config.json"), d)
    (d / "model.safetensors").write_bytes(raw)
    with bounded(seconds=10, megabytes=512), pytest.raises(MinibloomError, match="model.safetensors: header lists"):
        minibloom.load(str(d))


@pytest.mark.parametrize("n", [np.int64(2**63 - 1), np.uint64(2**64 - 1), 2**200, np.int32(2**31 - 1)])
def test_generate_max_new_tokens_beyond_any_cache_is_refused(m32, n):
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=f"max_new_tokens={int(n)}: the KV"):
        m32.generate([1, 2], max_new_tokens=n)


@pytest.mark.parametrize("shape", [(10**6, 1), (1, 10**6), (10**4, 10**3)])
def test_a_forward_pass_beyond_memory_is_refused_at_once_naming_input_ids(m32, shape):
    ids = np.ones(shape, np.int64)
    with bounded(seconds=5, megabytes=512), pytest.raises(MinibloomError, match=r"input_ids: a batch of shape"):
        m32(ids)


def test_forward_bytes_grows_with_the_batch(m32):
    small, big = m32.forward_bytes(1, 8), m32.forward_bytes(10, 8)
    assert big >= 10 * small - 1 and m32.forward_bytes(1, 8, logits="last") < small
    assert np.asarray(m32(np.ones((2, 3), np.int64))).shape == (2, 3, m32.vocab_size)  # ordinary input still runs


@pytest.mark.parametrize("dtype", [{"names": ["a"], "formats": ["<f4"], "offsets": [-4], "itemsize": 4},
                                   "float16", object(), [("a", "<f4")], "x" * 10**5, np.int8])
def test_load_dtype_of_any_kind_is_a_minibloom_error(dtype):
    with pytest.raises(MinibloomError, match="dtype: .* is not supported"):
        minibloom.load(dtype=dtype)


def test_load_of_bytes_names_the_argument():
    with pytest.raises(MinibloomError, match="path_or_repo_id: expected a path"):
        minibloom.load(DEFAULT.encode())


@pytest.mark.parametrize("source", [[1, 2], None, 5, {"a": "b"}])
def test_render_template_of_a_non_string_is_refused(source):
    from minibloom.chat import render_template

    with pytest.raises(MinibloomError, match="a chat_template must be a string"):
        render_template(source, "tmpl", messages=[])


@pytest.mark.parametrize("pad", [10**30, 2**63, -1, 1.5, "3", True])
def test_encode_batch_with_a_bad_pad_is_refused(m32, pad):
    with pytest.raises(MinibloomError, match="pad_token_id"):
        m32.tokenizer.encode_batch(["a", "bb"], pad_token_id=pad)


@pytest.mark.parametrize("prompts, match", [
    ([[], [1, 2]], r"prompts\[0\]: an empty prompt"), (np.zeros((2, 0), np.int64), r"prompts\[0\]: an empty"),
    ([[1, 2], [1.5]], r"prompts\[1\]: expected a 1-D list of token ids"), ("ab", "prompts: expected"),
    ([[10**30]], r"prompts\[0\]"), ([[1, 99999]], r"prompts\[0\]: token id 99999 is out of range"), ([], "empty"),
])
def test_compare_refuses_bad_prompt_rows(m32, prompts, match):
    from minibloom.oracle.compare import compare_models

    with pytest.raises(MinibloomError, match=match):
        compare_models(m32, m32, prompts)
    with pytest.raises(MinibloomError, match="b: expected a loaded minibloom.Bloom"):
        compare_models(m32, "weights/default", [[1, 2]])


@pytest.mark.parametrize("argv, match", [
    (["generate", "hi", "-n", "1e9"], "--max-new-tokens"),
    (["generate", "hi", "-n", "1000000000000"], "max_new_tokens=1000000000000"),
    (["info", "/tmp/x\udcff"], "not valid UTF-8"),
    (["generate", "hi\udcff", "-n", "2"], "not valid UTF-8"),
])
def test_cli_arguments_are_one_line_errors(capsys, argv, match):
    rc, out, err = cli(capsys, *argv)
    lines = err.splitlines()  # argparse's own errors come after the usage lines
    assert rc == 2 and out == "" and "error:" in lines[-1] and match in lines[-1], err
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), err


def test_a_gguf_whose_token_embd_is_a_vector_is_refused_naming_it(tiny, tmp_path):
    gguf = pytest.importorskip("gguf")
    from minibloom.formats.gguf import convert_hf_to_gguf

    src = gguf.GGUFReader(convert_hf_to_gguf(tiny, tmp_path / "m.gguf", "f32"))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "bloom")
    for f in src.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(f.name, f.contents())
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    for t in src.tensors:
        a = np.array(t.data)
        w.add_tensor(t.name, a.reshape(-1) if t.name == "token_embd.weight" else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MinibloomError, match=r"bad.gguf: tensor 'token_embd.weight' has shape \[1024\]"):
        minibloom.load(str(tmp_path / "bad.gguf"))


# ---- 6a. in-process and Dask results are the same bits in float32 -------------------------------------------------

def test_every_window_runs_on_one_blas_thread_whatever_the_process_uses(m32, monkeypatch):
    from minibloom.backend import blas_threads, openblas_threads

    if openblas_threads() is None:
        pytest.skip("NumPy does not use OpenBLAS here")
    seen = []
    call = minibloom.Bloom.__call__

    def spy(self, *a, **k):
        seen.append(openblas_threads())
        return call(self, *a, **k)

    text = TEXT * 3
    with blas_threads(1):
        one = E.perplexity(m32, text, context=24, stride=10)
    monkeypatch.setattr(minibloom.Bloom, "__call__", spy)
    with blas_threads(3):  # the process asks for 3 threads: every window still runs on 1, the count comes back
        three = E.perplexity(m32, text, context=24, stride=10, dtype="float32")
        assert openblas_threads() == 3
    assert len(seen) == three["windows"] > 3 and set(seen) == {1}
    assert (three["nll"], three["perplexity"]) == (one["nll"], one["perplexity"])


@pytest.mark.xdist_group("dask")
def test_float32_in_process_with_several_blas_threads_is_the_workers_result(dask_client, m32):
    from minibloom.backend import blas_threads

    text = TEXT * 4
    with blas_threads(2):
        local = E.perplexity(m32, text, context=32, stride=12)
    spread = E.perplexity(DEFAULT, text, context=32, stride=12, client=dask_client)
    assert spread["workers"] == 2 and local["dtype"] == spread["dtype"] == "float32"
    assert (spread["nll"], spread["perplexity"], spread["tokens"]) == (local["nll"], local["perplexity"],
                                                                      local["tokens"])


def test_the_help_promises_what_holds(capsys):
    with pytest.raises(SystemExit):
        main(["perplexity", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one OpenBLAS thread" in text and "in float32 and float64" in text and "--scheduler-timeout" in text


# ---- 6b. every command from a plain pip install -------------------------------------------------------------------

def test_bench_without_torch_refuses_in_one_line_naming_the_extra(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "transformers")
                        else real(name, *a))
    rc, out, err = cli(capsys, "bench", "--rounds", "1")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "minibloom[test]" in err and "--skip-transformers" in err


def test_bench_reads_blas_threads_without_threadpoolctl(monkeypatch):
    from minibloom.backend import openblas_threads
    from minibloom.bench import _blas_threads_info

    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import threadpoolctl -> ImportError
    info = _blas_threads_info()
    assert isinstance(info, list) and info
    if openblas_threads() is not None:
        assert info == [{"internal_api": "openblas", "num_threads": openblas_threads(), "architecture": None}]


def test_a_bench_worker_that_fails_to_start_is_one_line(tmp_path):
    """The worker process of ``minibloom bench`` with transformers missing: one line on stderr, exit code 1."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "transformers.py").write_text("raise ImportError('transformers is not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), ROOT])}
    r = subprocess.run([sys.executable, "-m", "minibloom.bench", "--worker", "transformers", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "transformers worker: ImportError: transformers is not installed"


# ---- 6c. a converted GGUF keeps the model's own chat template -----------------------------------------------------

@pytest.mark.parametrize("name", ["play", "bloomz", "plain", "oasst", "bloomz-sft-chat"])
def test_each_registry_template_as_jinja_renders_the_same(name):
    pytest.importorskip("jinja2")
    from minibloom import chat
    from minibloom.chat_templates import JINJA

    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello\nyou"}, {"role": "user", "content": "Bye {{ x }}"}]
    for prompt in (True, False):
        assert chat.render_template(JINJA[name], "t", messages=msgs, add_generation_prompt=prompt) == \
            chat.render(msgs, name, prompt)
    assert chat.detect(None, type("T", (), {"chat_template": JINJA[name]})()) == name


def test_a_gguf_converted_from_the_default_model_keeps_its_play_template(tmp_path):
    pytest.importorskip("gguf")
    from minibloom import chat
    from minibloom.formats.gguf import convert_hf_to_gguf

    path = convert_hf_to_gguf(DEFAULT, tmp_path / "converted.gguf", "q8_0")
    model = minibloom.load(path)
    assert chat.detect(path, model.tokenizer) == "play"
    assert chat.render([{"role": "user", "content": "Hi"}], "tokenizer", tokenizer=model.tokenizer) == \
        "ROMEO:\nHi\n\nJULIET:\n"


# ---- 7. no crash of the process, whatever evaluate is given -------------------------------------------------------

JUNK = [None, True, -1, 2**70, float("nan"), "", "x" * 300, b"\xff", [], [[1]], {"a": 1}, object(), np.ones(3),
        np.float64(1.5)]
ARGS = ("context", "stride", "dtype", "low_memory", "load_options", "scheduler", "workers", "client", "progress",
        "scheduler_timeout")


@pytest.mark.parametrize("arg", ARGS)
def test_junk_in_any_evaluate_argument_is_a_minibloom_error_or_runs(no_loading, arg):
    """Child-free: every value is refused before a model would be loaded (``no_loading``) or is a valid default."""
    for value in JUNK:
        try:
            with bounded(seconds=5, megabytes=256):
                E.perplexity(None, TEXT, **{"context": 8, arg: value})
        except MinibloomError:
            continue
        except AssertionError as e:  # no_loading: the value was accepted as valid
            valid = value is None or (arg, repr(value)) in {("low_memory", "True"), ("progress", "True"),
                                                             ("scheduler_timeout", "np.float64(1.5)")}
            assert "a model was loaded" in str(e) and valid, (arg, value)


def test_the_battery_in_a_child_process_ends_cleanly(tmp_path):
    """A few of the worst cases in a fresh process with a 2 GiB address-space limit and a timeout: no signal, no
    traceback, exit 0 (each printed its MinibloomError)."""
    script = tmp_path / "battery.py"
    script.write_text(f"""
import resource, sys, numpy as np
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))
import minibloom
from minibloom import evaluate as E
m = minibloom.load()
cases = [lambda: m(np.ones((10**6, 1), np.int64)), lambda: m.generate([1], max_new_tokens=np.int64(2**63 - 1)),
         lambda: E.perplexity(m, "a b c d", context=4, load_options={{"bogus": 1}}),
         lambda: E.perplexity(None, "a b c d", context=4, client="x"),
         lambda: E.kl(m, {str(npz_with_header(tmp_path / 'h.npz', (2**20, 2**20)))!r}, "a b c d e", context=4)]
for case in cases:
    try:
        case()
        print("ACCEPTED")
    except minibloom.MinibloomError as e:
        print("REFUSED", str(e)[:80])
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.count("REFUSED") == 5, r.stdout


@pytest.mark.parametrize("args, match", [
    (("x", 4, 2), "n_tokens: must be an integer"), ((10**13, 4, 2), "n_tokens: must be from 0"),
    ((-1, 4, 2), "n_tokens"), ((10**9, 4, 1), "more than 16777216 windows"), ((10, 4, 2.0), "stride"),
])
def test_windows_of_junk_or_too_many_are_refused(args, match):
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match=match):
        E.windows(*args)


@pytest.mark.parametrize("path", [5, b"x.npz", None, ["a.npz"]])
def test_logits_file_functions_refuse_a_non_path(path):
    with pytest.raises(MinibloomError, match="logits file: expected a path"):
        E.read_logits(path)
    with pytest.raises(MinibloomError, match="save_logits"):
        E.save_logits(path, np.zeros((1, 2), np.float32), np.arange(2), E.windows(2, 2, 1))


@pytest.mark.parametrize("members, match", [
    ({"grad.lm_head.weight": np.zeros((4, 4))}, "no logits to judge"),
    ({"logits": np.zeros((1, 3, 8)) + 1j}, "logits: expected a float array, got dtype complex128"),
    ({"logits": np.zeros((1, 3, 8)), "labels": np.array([[1, 2, 500]])}, r"labels\[0, 2\] = 500"),
    ({"logits": np.zeros((1, 4, 8))}, r"logits: shape \(1, 4, 8\) does not match input_ids"),
])
def test_cli_verify_refuses_in_one_line(capsys, tmp_path, members, match):
    path = tmp_path / "cand.npz"
    np.savez(path, input_ids=np.array([[1, 2, 3]]), **members)
    rc, out, err = cli(capsys, "verify", str(path), "--model", DEFAULT)
    assert rc == 2 and out == "" and err.count("\n") == 1 and re.search(match, err), err
