"""Hostile inputs, second wave (issue 27, part A): training, its data and output folder, a resumed trainer state,
the low-memory budget and the 16-bit widening refuse bad input with a MinibloomError naming it, before any work.

By root cause: the text reader opens only regular files (a FIFO, /dev/zero, a directory, a socket), bounded and
UTF-8; train's options and output folder are checked before the first step; ``--out`` onto an earlier (sharded) run
replaces it whole; a resumed state is checked as strictly as a checkpoint and a diverging run stops cleanly, its JSON
always valid; ``max_memory`` is parsed with bounded digits and ``widen`` never reads past its source. A case that
could hang or kill the process runs in a child process with a time and memory bound, so a regression fails instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from bounds import bounded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minibloom
from minibloom import training as T
from minibloom.bloom import hf_names
from minibloom.cli import main
from minibloom.errors import MinibloomError
from minibloom.formats import native
from minibloom.formats.lowmem import parse_memory
from minibloom.formats.safetensors import SafetensorsFile, save_file
from minibloom.formats.weights import write_checkpoint
from minibloom.formats.widen import widen
from minibloom.textfile import read_text
from minibloom.training.optim import AdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(batch=4, ctx=32, hidden=32, layers=1, heads=4, vocab=300, vocab_rows=384, warmup=1, progress=False)


def child(code: str, seconds: float = 60, megabytes: int = 4096, env: dict | None = None
          ) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python (this checkout's minibloom) under a time and address-space bound: a hang is a
    TimeoutExpired and a crash a negative return code, never a stuck or dead test run."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (megabytes * 2**20, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=seconds,
                          preexec_fn=limit, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0 and r.returncode > 0, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert all(w in r.stderr for w in words), r.stderr[-2000:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(T.read_text(None)[:20000], encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> str:
    """A finished two-step run (with its checkpoint-1) to resume and to damage (tests copy it first)."""
    out = str(tmp_path_factory.mktemp("run") / "run")
    T.train(corpus, out=out, steps=2, save_every=1, **TINY)
    return out


@pytest.fixture
def fifo(tmp_path) -> str:
    path = str(tmp_path / "fifo")
    os.mkfifo(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# 1. The text reader opens only regular files, bounded, UTF-8


def test_a_fifo_as_data_is_refused_not_waited_on(fifo, tmp_path):
    r = child(f"from minibloom.cli import main; raise SystemExit(main(['train', '--data', {fifo!r}, '--out', "
              f"{str(tmp_path / 'o')!r}, '--no-progress']))", seconds=60)
    one_line_error(r, fifo, "FIFO")
    r = child(f"from minibloom.textfile import read_text\ntry: read_text({fifo!r})\n"
              "except ValueError as e: print(type(e).__name__, e)", seconds=30)
    assert r.returncode == 0 and r.stdout.startswith("MinibloomError") and "FIFO" in r.stdout


@pytest.mark.parametrize("kind", ["devzero", "directory", "socket"])
def test_read_text_refuses_what_is_not_a_regular_file(tmp_path, kind):
    if kind == "devzero":
        path = "/dev/zero"
    elif kind == "directory":
        path = str(tmp_path)
    else:
        path = str(tmp_path / "sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="give a regular file") as e:
        read_text(path)
    assert path in str(e.value)


def test_read_text_names_a_non_utf8_file_and_the_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("naïve text".encode("latin-1"))
    with pytest.raises(MinibloomError, match=r"latin1.txt: not UTF-8 text \(byte 0xef at offset 2\)"):
        read_text(path)
    with pytest.raises(MinibloomError, match="data: .*latin1.txt: not UTF-8"):
        T.train(str(path), **TINY, steps=1)


def test_read_text_has_a_size_bound_checked_before_reading(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("x" * 1000)
    with pytest.raises(MinibloomError, match="big.txt: 1000 bytes, more than the 999 read whole at most"):
        read_text(path, max_bytes=999)
    assert read_text(path, max_bytes=1000) == "x" * 1000


@pytest.mark.parametrize("value", [5, None, b"\xff\xfe", "", "a\x00b"])
def test_read_text_refuses_what_is_not_a_path(value):
    with pytest.raises(MinibloomError):
        read_text(value)


def test_a_fifo_as_chat_data_or_tokenizer_is_refused(fifo, tmp_path, corpus):
    with bounded(seconds=10, megabytes=512):
        with pytest.raises(MinibloomError, match="FIFO"):
            T.train(fifo, chat_template="play", **TINY, steps=1)
        with pytest.raises(MinibloomError, match="tokenizer: .*FIFO"):
            T.train(corpus, tokenizer=fifo, **TINY, steps=1)
    (tmp_path / "notes.txt").write_text("{}")
    with pytest.raises(MinibloomError, match="tokenizer: .*notes.txt: give a checkpoint folder or its tokenizer.json"):
        T.train(corpus, tokenizer=str(tmp_path / "notes.txt"), **TINY, steps=1)


def test_a_fifo_in_place_of_a_safetensors_or_json_file_is_refused(fifo):
    from minibloom.jsonfile import read_json

    with bounded(seconds=5, megabytes=256):
        with pytest.raises(MinibloomError, match="FIFO"):
            SafetensorsFile(fifo)
        with pytest.raises(MinibloomError, match="FIFO"):
            read_json(fifo)


# ---------------------------------------------------------------------------------------------------------------
# 2. Checked before the work


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to train (or build a tokenizer) fails the test: the refusal must come first."""
    def trained(*a, **k):
        raise AssertionError("the run started before the bad argument was refused")

    monkeypatch.setattr("minibloom.training.loop.train_step", trained)  # where train() looks them up
    monkeypatch.setattr("minibloom.training.loop.train_bpe", trained)


@pytest.mark.parametrize("change, match", [
    ({"seed": -1}, "seed: must be an integer in"), ({"seed": 2**64}, "seed"), ({"seed": 1.5}, "seed"),
    ({"vocab": 1}, "vocab: 1 entries cannot hold the byte-level alphabet"), ({"vocab": 259}, "vocab: 259"),
    ({"lr": float("nan")}, "lr: must be a finite number"), ({"lr": "0.1"}, "lr"), ({"lr": -1.0}, "lr"),
    ({"steps": 10**12}, "steps: must be an integer in"), ({"steps": True}, "steps"), ({"batch": 0}, "batch"),
    ({"batch": 2**40}, "batch"), ({"ctx": 1}, "ctx"), ({"ctx": 10**9}, "ctx"), ({"hidden": 2**20}, "hidden"),
    ({"layers": 10**6}, "layers"), ({"betas": (0.9,)}, "betas: must be a pair"), ({"betas": ("a", "b")}, "betas"),
    ({"betas": (0.9, 1.0)}, "betas"), ({"min_lr_ratio": "x"}, "min_lr_ratio"), ({"val_fraction": None}, "val_frac"),
    ({"eps": float("inf")}, "eps"), ({"dtype": ["float32"]}, "dtype"), ({"post_ln": "yes"}, "post_ln"),
    ({"hidden": 4096, "layers": 4096, "heads": 32}, "more than the"), ({"bogus": 1}, "unknown option 'bogus'"),
])
def test_train_options_are_checked_before_any_work(corpus, no_training, change, match):
    with bounded(seconds=10, megabytes=512), pytest.raises(MinibloomError, match=match):
        T.train(corpus, **{**TINY, "steps": 1, **change})


@pytest.mark.parametrize("change", [{"batch": 65536, "ctx": 65536}, {"hidden": 8192, "layers": 16, "heads": 64},
                                    {"vocab_rows": 2**24, "hidden": 1024}])
def test_a_run_that_cannot_fit_in_memory_is_refused_before_allocating(corpus, no_training, change):
    with bounded(seconds=10, megabytes=512), pytest.raises(MinibloomError, match="a training step needs at least"):
        T.train(corpus, **{**TINY, "steps": 1, **change})


def test_running_out_of_memory_mid_run_is_a_minibloom_error(corpus, monkeypatch):
    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr("minibloom.training.loop.train_step", no_memory)
    with pytest.raises(MinibloomError, match="out of memory: lower batch or ctx"):
        T.train(corpus, **TINY, steps=1)


@pytest.mark.parametrize("argument, match", [
    ({"save_dtype": "int8"}, "save_dtype"), ({"chat_template": "nonesuch"}, "unknown chat template"),
    ({"chat_template": ["play"]}, "chat_template"), ({"backend": 3}, "backend"), ({"progress": "no"}, "progress"),
    ({"config": {"steps": 1}}, "config: expected a TrainConfig"), ({"data": 3}, "data: expected a path"),
    ({"model": 3.5}, "model: expected a path"), ({"log": "stderr"}, "log"),
])
def test_train_arguments_are_checked_before_any_work(corpus, no_training, argument, match):
    kw = {"data": corpus, **TINY, "steps": 1, **argument}
    with bounded(seconds=10, megabytes=512), pytest.raises(MinibloomError, match=match):
        T.train(kw.pop("data"), **kw)


def test_out_onto_a_file_or_an_impossible_parent_is_refused_at_the_start(corpus, tmp_path, no_training):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MinibloomError, match="out: .*file exists and is not a directory"):
        T.train(corpus, out=str(tmp_path / "file"), **TINY, steps=1)
    with pytest.raises(MinibloomError, match="out: .*cannot create the directory .*file/sub"):
        T.train(corpus, out=str(tmp_path / "file" / "sub" / "run"), **TINY, steps=1)
    with pytest.raises(MinibloomError, match="out: .*cannot write in /proc"):
        T.train(corpus, out="/proc/run", **TINY, steps=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(MinibloomError, match="already holds 'notes.txt', which is no part of a checkpoint"):
        T.train(corpus, out=str(tmp_path / "mine"), **TINY, steps=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "seed: must be an integer in [0, "), (["--vocab", "1"], "vocab: 1 entries"),
    (["--out", "/proc/minibloom-none/run"], "cannot create the directory"),
    (["--lr", "inf"], "lr: must be a finite number"),
])
def test_cli_train_refuses_bad_options_in_one_line(corpus, tmp_path, capsys, argv, message):
    argv = ["train", "--data", corpus, "--out", str(tmp_path / "o"), "--no-progress", *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------------------------------------------------------
# 3. --out onto an earlier run replaces it whole


def shard_into(directory, seed: int = 7) -> dict:
    """A sharded checkpoint of another (hidden 32) model in ``directory``: index + two shards + config.json."""
    cfg = minibloom.BloomConfig(vocab_size=384, hidden_size=32, n_layer=1, n_head=4)
    from minibloom.formats.weights import random_params

    params = random_params(cfg, 384, np.random.default_rng(seed))
    write_checkpoint(directory, cfg, params, "float32")
    os.remove(os.path.join(directory, "model.safetensors"))
    flat = {k: np.asarray(v, np.float32) for k, v in hf_names(params).items()}
    names = sorted(flat)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: flat[k] for k in keys}, os.path.join(directory, shard))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: s for s, keys in shards.items() for k in keys}}, f)
    return flat


def test_out_onto_an_earlier_sharded_run_replaces_it_whole(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old = shard_into(str(out))
    (out / "checkpoint-9").mkdir()  # a stale checkpoint of the earlier run
    assert minibloom.load(str(out)).params["ln_f"]["weight"].tolist() == old["transformer.ln_f.weight"].tolist()
    res = T.train(corpus, out=str(out), steps=1, **TINY)
    assert sorted(os.listdir(out)) == sorted(["config.json", "generation_config.json", "metrics.json", "README.md",
                                              "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                              T.STATE_JSON, T.STATE_TENSORS])
    loaded, trained = hf_names(minibloom.load(str(out)).params), hf_names(res.model.params)
    assert all(np.array_equal(loaded[k], trained[k]) for k in trained)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".run.")]  # no temporary folder left
    os.mkdir(tmp_path / "plain")
    assert os.stat(out).st_mode == os.stat(tmp_path / "plain").st_mode  # not a private temporary folder's mode


def test_write_checkpoint_onto_a_sharded_checkpoint_leaves_no_stale_index(tmp_path):
    shard_into(str(tmp_path))
    cfg = minibloom.BloomConfig(vocab_size=384, hidden_size=32, n_layer=1, n_head=4)
    from minibloom.formats.weights import random_params

    new = random_params(cfg, 384, np.random.default_rng(99))
    write_checkpoint(tmp_path, cfg, new, "float64")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    got = hf_names(minibloom.load(str(tmp_path), dtype="float64").params)
    assert all(np.array_equal(got[k], v) for k, v in hf_names(new).items())


def test_resuming_into_its_own_folder_keeps_the_runs_checkpoints(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    T.train(resume=str(out / "checkpoint-1"), out=str(out), steps=3, progress=False)
    assert (out / "checkpoint-1" / T.STATE_JSON).is_file()
    assert json.loads((out / T.STATE_JSON).read_text())["step"] == 3


# ---------------------------------------------------------------------------------------------------------------
# 4. Resume trusts nothing; a diverging run stops; JSON is JSON


def damaged(run: str, tmp_path, edit) -> str:
    path = tmp_path / "ckpt"
    shutil.copytree(run, path)
    meta = json.loads((path / T.STATE_JSON).read_text())
    edit(meta)
    (path / T.STATE_JSON).write_text(json.dumps(meta))
    return str(path)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(step=-5), r"step -5 is outside \[0, 2\]"),
    (lambda m: m.update(step=10**12), "step 1000000000000 is outside"),
    (lambda m: m.update(optimizer_step=10**12), "optimizer_step must be an integer in"),
    (lambda m: m["rng"]["state"].update(state=2**200), "data-order state is not readable"),
    (lambda m: m["rng"]["state"].update(inc="x"), "data-order state"),
    (lambda m: m["rng"].update(bit_generator="MT19937"), "expected a PCG64 state"),
    (lambda m: m["rng"].update(has_uint32=7), "has_uint32"),
    (lambda m: m["config"].update(betas=[0.9]), "betas: must be a pair"),
    (lambda m: m["config"].update(betas=["a", "b"]), "betas: must be a number"),
    (lambda m: m["config"].update(lr="fast"), "lr: must be a finite number"),
    (lambda m: m["config"].update(eps=-1), "eps"),
    (lambda m: m["config"].update(ctx=2**40), "ctx"),
    (lambda m: m["config"].update(seed=-3), "seed"),
    (lambda m: m.update(data=["x"]), "data must be a string"),
    (lambda m: m.update(data="/nonexistent/text.txt"), "its data: /nonexistent/text.txt: no such file"),
    (lambda m: m.update(chat_template="nonesuch"), "unknown chat template"),
    (lambda m: m.update(config=[1]), "not a trainer state"),
])
def test_a_hostile_trainer_state_is_refused_before_any_work(run, tmp_path, no_training, edit, match):
    path = damaged(run, tmp_path, edit)
    with bounded(seconds=20, megabytes=1024), pytest.raises(MinibloomError, match=match):
        T.train(resume=path, progress=False)


def test_a_trainer_state_whose_data_is_a_fifo_is_refused_not_waited_on(run, tmp_path, fifo):
    path = damaged(run, tmp_path, lambda m: m.update(data=fifo))
    r = child(f"import minibloom.training as T\ntry: T.train(resume={path!r}, progress=False)\n"
              "except ValueError as e: print(type(e).__name__, e)", seconds=60)
    assert r.returncode == 0 and r.stdout.startswith("MinibloomError") and "FIFO" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("poison, match", [
    (lambda a: a.__setitem__((0,), np.nan), "holds NaN or inf"),
    (lambda a: a.__setitem__((0,), np.inf), "holds NaN or inf"),
    ("negative", "negative second moment"),
    ("shape", "shaped"), ("dtype", "dtype float16"), ("extra", "not a moment"),
])
def test_optimizer_moments_are_checked_like_weights(run, tmp_path, no_training, poison, match):
    path = tmp_path / "ckpt"
    shutil.copytree(run, path)
    with SafetensorsFile(path / T.STATE_TENSORS) as f:
        tensors = {n: np.array(f.get(n)) for n in f.names}
    name = "m.transformer.ln_f.weight"
    if poison == "negative":
        name = "v.transformer.ln_f.weight"
        tensors[name][0] = -1.0
    elif poison == "shape":
        tensors[name] = tensors[name][:-1]
    elif poison == "dtype":
        tensors[name] = tensors[name].astype(np.float16)
    elif poison == "extra":
        tensors["m.transformer.nonesuch"] = np.zeros(3, np.float32)
    else:
        poison(tensors[name])
    save_file(tensors, str(path / T.STATE_TENSORS))
    with pytest.raises(MinibloomError, match=match):
        T.train(resume=str(path), progress=False)


@pytest.mark.parametrize("kw, match", [
    ({"lr": float("nan")}, "lr"), ({"betas": [0.9]}, "betas: must be a pair"), ({"betas": ("a", "b")}, "betas"),
    ({"eps": -1.0}, "eps"), ({"weight_decay": float("inf")}, "weight_decay"), ({"params": [1]}, "params"),
])
def test_adamw_refuses_bad_hyperparameters(kw, match):
    with pytest.raises(MinibloomError, match=match):
        AdamW(**{"params": {"w": np.ones(2)}, **kw})


def test_adamw_load_state_dict_refuses_a_huge_or_negative_step():
    opt = AdamW({"w": np.ones(2)})
    good = {"m.w": np.zeros(2), "v.w": np.zeros(2)}
    for step in (-5, 10**12, 1.0, True, "3"):
        with pytest.raises(MinibloomError, match="step count"):
            opt.load_state_dict({"step": step, **good})
    opt.load_state_dict({"step": 3, **good})
    assert opt.step_count == 3


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_good_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    with np.errstate(all="ignore"), pytest.raises(MinibloomError, match="diverged|not finite|the loss is") as e:
        T.train(corpus, out=str(out), steps=30, save_every=1, **{**TINY, "lr": 1e6, "grad_clip": 0.0})
    assert "OverflowError" not in repr(e.value)
    assert not (out / "model.safetensors").exists()  # nothing of the diverged run is saved
    kept = sorted(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert kept and str(out / f"checkpoint-{kept[-1]}") in str(e.value)
    model = minibloom.load(str(out / f"checkpoint-{kept[-1]}"))  # loads: every weight finite
    assert all(np.isfinite(v).all() for v in hf_names(model.params).values())


def test_a_run_whose_finite_loss_explodes_is_stopped_as_diverged(corpus, tmp_path):
    """lr 1e6 for three steps: the held-out loss stays finite but is ~1e16 nats/token, far over a uniform guess's
    log(vocab); the run stops as diverged and saves nothing, rather than writing a model with perplexity inf."""
    out = tmp_path / "run"
    with np.errstate(all="ignore"), pytest.raises(MinibloomError, match=r"over 10x a uniform guess"):
        T.train(corpus, out=str(out), steps=3, lr=1e6, batch=2, ctx=16, hidden=32, layers=1, heads=4, vocab=300,
                progress=False)
    assert not (out / "model.safetensors").exists()


def test_the_perplexity_of_a_huge_loss_is_inf_not_an_overflow():
    assert T.perplexity_of(1e6) == math.inf and T.perplexity_of(2.0) == pytest.approx(math.exp(2.0))
    assert math.isnan(T.perplexity_of(float("nan")))
    assert json.dumps(T.json_safe({"a": [float("nan"), np.float32("inf"), 1.5]}), allow_nan=False) == \
        '{"a": [null, null, 1.5]}'


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_cli_json_output_and_metrics_are_strict_json(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--data", corpus, "--out", str(out), "--steps", "1", "--layers", "1", "--hidden", "32",
                 "--heads", "4", "--ctx", "32", "--batch", "4", "--vocab", "300", "--vocab-rows", "384", "--json",
                 "--no-progress"]) == 0
    figures = strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["steps"] == 1 and math.isfinite(figures["val_loss"])
    assert strict_json((out / "metrics.json").read_text())["val_tokens"] == figures["val_tokens"]
    strict_json((out / T.STATE_JSON).read_text())


CONVERSATION = {"messages": [{"role": "user", "content": "Good morrow."},
                             {"role": "assistant", "content": "Good morrow, sir."}]}


def test_one_conversation_is_refused_for_an_empty_validation_set(tmp_path, no_training):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    with pytest.raises(MinibloomError, match="one.jsonl: 1 conversation; the validation set would be empty"):
        T.train(str(path), chat_template="play", **TINY, steps=1)


def test_conversations_whose_replies_are_all_empty_are_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    empty = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
    path.write_text("\n".join(json.dumps(empty) for _ in range(4)) + "\n")
    with pytest.raises(MinibloomError, match="empty.jsonl: the training conversations have no assistant reply"):
        T.train(str(path), chat_template="play", **{**TINY, "ctx": 64}, steps=1)


def test_held_out_text_too_short_is_refused_before_training(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text(T.read_text(None)[:6000])
    with pytest.raises(MinibloomError, match="held-out text .* validation set would be empty"):
        T.train(str(path), **TINY, steps=1, val_fraction=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 5. Low memory and widening


@pytest.mark.parametrize("value", ["9" * 400 + "GB", "9" * 400, "1." + "9" * 400 + "GB", 10**400, 2**61, "2EB",
                                   "-1GB", -1, 1.5e9, True, None, b"1GB"])
def test_max_memory_is_parsed_with_bounds(value):
    with bounded(seconds=5, megabytes=256), pytest.raises(MinibloomError, match="max_memory"):
        parse_memory(value)


def test_max_memory_through_load_is_a_minibloom_error():
    with pytest.raises(MinibloomError, match="max_memory"):
        minibloom.load(os.path.join(ROOT, "tests", "golden", "tiny"), max_memory="9" * 400 + "GB")
    assert parse_memory("1.5 GB") == 1_500_000_000 and parse_memory("2GiB") == 2 * 2**30


GUARD_PAGE = """
import ctypes, mmap, sys
import numpy as np
from minibloom.formats import native
from minibloom.formats.widen import widen
if {numpy!r}:
    native.kernel = lambda code, dtype: None
P = mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * P, prot=mmap.PROT_READ | mmap.PROT_WRITE)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(base + P, P, 0) == 0  # PROT_NONE: reading the second page is a SIGSEGV
raw = np.frombuffer(buf, np.uint8, count=P)
rng = np.random.default_rng(0)
for nbytes in (P, 64, 34, 32, 2):
    src = raw[P - nbytes:]  # ends exactly at the unreadable page
    src[...] = rng.integers(0, 256, nbytes, dtype=np.uint8) & 0x3F  # finite binary16 / bfloat16 patterns
    for code in ("F16", "BF16"):
        for dtype in (np.float32, np.float64):
            want = (src.view(np.float16).astype(dtype) if code == "F16"
                    else (src.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(dtype))
            for view in (src, src.view(np.uint16)):
                got = widen(view, code, dtype)
                assert np.array_equal(got, want), (nbytes, code, dtype, view.dtype)
print("ok")
"""


@pytest.mark.parametrize("path", ["native", "numpy"])
def test_widen_never_reads_past_its_source(path):
    r = child(GUARD_PAGE.format(numpy=path == "numpy"), seconds=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int32, np.complex64, np.bool_, object])
def test_widen_refuses_a_source_that_is_not_16_bit(dtype):
    with pytest.raises(MinibloomError, match="is not a 16-bit type"):
        widen(np.zeros(32, dtype), "F16", np.float32)


@pytest.mark.parametrize("args, match", [
    ((np.zeros(31, np.uint8), "F16", np.float32), "even length"), ((np.zeros(4, np.uint16), "F8", np.float32), "F8"),
    (([1, 2], "F16", np.float32), "NumPy array"), ((np.zeros(4, np.uint16), "F16", np.int8), "float32 or float64"),
    ((np.zeros(4, np.uint16), "F16", "nonesuch"), "not a dtype"),
    ((np.zeros(4, np.uint16), "F16", ","), "not a dtype"),  # NumPy's own parser raises SyntaxError for this one
    ((np.zeros(4, np.uint16), ["F16"], np.float32), "F16"),
])
def test_widen_refuses_bad_arguments(args, match):
    with pytest.raises(MinibloomError, match=match):
        widen(*args)


@pytest.mark.parametrize("kw, match", [({"threads": "x"}, "threads"), ({"threads": 0}, "threads"),
                                       ({"where": 5}, "where"), ({"offset": -1}, "offset")])
def test_widen_into_refuses_bad_options(kw, match):
    from minibloom.formats.widen import widen_into

    with pytest.raises(MinibloomError, match=match):
        widen_into(np.zeros(8, np.uint16), "F16", np.zeros(8, np.float32), **kw)


@pytest.mark.parametrize("value", ["0", "off", "OFF", "false", "False", "no", "No", " off "])
def test_minibloom_native_off_in_every_spelling(monkeypatch, value):
    monkeypatch.setattr(native, "_kernels", None)
    monkeypatch.setenv("MINIBLOOM_NATIVE", value)
    assert native.kernel("F16", np.float32) is None and "MINIBLOOM_NATIVE" in native.reason


def test_an_unknown_minibloom_native_value_warns_naming_the_variable(monkeypatch):
    monkeypatch.setattr(native, "_kernels", None)
    monkeypatch.setenv("MINIBLOOM_NATIVE", "maybe")
    with pytest.warns(RuntimeWarning, match="MINIBLOOM_NATIVE='maybe'"):
        native.kernel("F16", np.float32)
    assert "MINIBLOOM_NATIVE" not in native.reason  # the default (on where the CPU allows) applies


# ---------------------------------------------------------------------------------------------------------------
# 6. Whatever they are given, the public functions answer with a MinibloomError or a result


JUNK = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**200, max_value=2**200),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=8),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FIELDS = [f for f in T.TrainConfig.__dataclass_fields__]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(FIELDS), value=JUNK)
def test_fuzz_train_config_fields(name, value):
    cfg = T.TrainConfig(**{name: value})
    try:
        cfg.check()
    except MinibloomError:
        return
    got = getattr(cfg, name)
    # it was a usable value (an integer for a float field comes back as that float)
    assert got == value or name in ("betas",) or isinstance(value, bool) or (isinstance(value, int) and
                                                                             got == float(value))


@settings(max_examples=150, deadline=None)
@given(value=JUNK)
def test_fuzz_max_memory_and_adamw(value):
    for fn in (parse_memory, lambda v: AdamW({"w": np.ones(2)}, lr=v), lambda v: AdamW({"w": np.ones(2)}, betas=v),
               lambda v: T.check_rng_state(v, "state"), lambda v: widen(np.zeros(16, np.uint16), "F16", v)):
        try:
            fn(value)
        except MinibloomError:
            pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["step", "optimizer_step", "rng", "config", "data", "chat_template"]), value=JUNK)
def test_fuzz_trainer_state_fields(run, tmp_path_factory, key, value):
    path = tmp_path_factory.mktemp("fuzz") / "ckpt"
    os.makedirs(path)
    meta = json.loads(open(os.path.join(run, T.STATE_JSON)).read())
    meta[key] = value
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError):
        return  # not JSON at all
    (path / T.STATE_JSON).write_text(text)
    try:
        T.read_state(str(path))
    except MinibloomError:
        pass


@pytest.mark.parametrize("call, match", [
    (lambda: T.split_text(b"abc", 0.1), "text must be a str"), (lambda: T.split_text("abc", "x"), "val_fraction"),
    (lambda: T.train_bpe("abc", 1), "vocab"), (lambda: T.train_bpe(None, 300), "text must be a str"),
    (lambda: T.encode(None, 5), "text must be a str"), (lambda: T.eval_windows(np.arange(9), 0), "ctx"),
    (lambda: T.eval_windows("abc", 2), "ids"), (lambda: T.eval_windows(np.arange(9), 2, limit=-1), "limit"),
    (lambda: T.random_windows(np.arange(9), 2, 10**6, np.random.default_rng(0)), "ctx"),
    (lambda: T.evaluate("model", np.arange(9), 4), "model must be a minibloom.Bloom"),
    (lambda: T.lr_at(-1, 1e-3, 1, 10), "step"), (lambda: T.lr_at(0, float("nan"), 1, 10), "lr"),
    (lambda: T.lr_at(0, 1e-3, 1, 10, 5.0), "min_lr_ratio"), (lambda: T.clip_grad_norm({}, "1"), "max_norm"),
])
def test_training_helpers_refuse_bad_arguments(call, match):
    with pytest.raises(MinibloomError, match=match):
        call()


def test_native_kernels_outlive_a_reload(monkeypatch):
    """Kernels from an earlier load keep working after the kernels are loaded again: loading twice used to free the
    machine-code page, and a kernel kept from before then crashed the process (now they are the C extension's)."""
    first = native.kernel("F16", np.float32)
    if first is None:
        pytest.skip(f"no C kernels here: {native.reason}")
    monkeypatch.setattr(native, "_kernels", None)
    assert native.kernel("F16", np.float32) is not None  # loaded again
    import gc

    gc.collect()
    src = np.arange(32, dtype=np.float16).view(np.uint16)
    out = np.empty(32, np.float32)
    assert first(src, out) is False
    np.testing.assert_array_equal(out, np.arange(32, dtype=np.float32))
