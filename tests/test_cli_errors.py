"""The CLI as a user expects it: every mistake is one line naming what is wrong, nothing is printed before an
argument is known good, an unknown flag shows the subcommand's usage, and no input gives a Python traceback."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

import minibloom
from minibloom.chat import chat_loop
from minibloom.cli import main
from minibloom.formats.loading import default_model_path


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


@pytest.mark.parametrize("argv, match", [
    (["generate", "ROMEO:", "--seed", "-1"], "seed"),
    (["generate", "ROMEO:", "--top-p", "1.5"], "top_p"),
    (["generate", "ROMEO:", "--top-k", "-3"], "top_k"),
    (["generate", "ROMEO:", "--repetition-penalty", "0"], "repetition_penalty"),
    (["generate", "ROMEO:", "-n", "1000000000000"], "max_new_tokens=1000000000000: the KV cache"),
    (["trace", "--ids", "99999999999999999999999", "--out", "x.npz"], "99999999999999999999999"),
    (["compare", "-r", "weights/default", "-m", "weights/default", "--seed", "-1"], "seed"),
])
def test_bad_arguments_fail_before_anything_is_printed(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, *[a.replace("weights/default", default_model_path())
                                 for a in argv])
    assert rc == 2 and out == "", (out, err)
    assert err.count("\n") == 1 and "error:" in err and match in err, err


@pytest.mark.parametrize("where", ["missing/dir/ref.npz", "."])
def test_trace_out_into_a_missing_directory_or_onto_a_directory(capsys, tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "trace", "--ids", "1,2,3", "--out", where)
    assert rc == 2 and out == ""
    assert ("does not exist" if "/" in where else "is a directory") in err


def test_an_unknown_flag_shows_the_subcommands_usage(capsys):
    rc, out, err = run(capsys, "generate", "--tmperature", "1", "hi")
    assert rc == 2 and "usage: minibloom generate" in err and "unrecognized arguments: --tmperature" in err


def test_a_missing_local_path_is_reported_as_missing_not_as_a_hub_id(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "generate", "hi", "--model", "./nonexistent")
    assert rc == 2 and "no such file or directory" in err and "download" not in err


def test_an_unexpected_error_is_one_line_with_a_bug_hint_and_debug_shows_the_traceback(capsys, monkeypatch):
    import minibloom.cli.info as info

    def boom(args):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(info, "run", boom)

    def patched_build():
        p = build_parser_orig()
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict) and "info" in action.choices:
                action.choices["info"].set_defaults(func=boom)
        return p

    import minibloom.cli as cli

    build_parser_orig = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", patched_build)
    rc, out, err = run(capsys, "info")
    assert rc == 1 and "unexpected ZeroDivisionError: planted" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "info"])


def test_stats_say_one_token_not_one_tokens(capsys):
    rc, out, err = run(capsys, "generate", "ROMEO:", "-n", "1", "--greedy", "--stats")
    assert rc == 0 and "1 new token," in err and "1 new tokens" not in err
    # one new token means no decode step: no rate is shown rather than "nan tokens/s"
    assert "no decode steps" in err and "nan" not in err


def test_info_counts_a_tiny_model_exactly(capsys):
    rc, out, err = run(capsys, "info", "--model", os.path.join(os.path.dirname(__file__), "golden", "tiny"))
    assert rc == 0 and "0.0M" not in out and "parameters" in out
    # the exact count, summed by the reference safetensors library rather than by minibloom
    st = pytest.importorskip("safetensors.numpy")
    tensors = st.load_file(os.path.join(os.path.dirname(__file__), "golden", "tiny", "model.safetensors"))
    assert f"{sum(int(v.size) for v in tensors.values()):,}" in out, out


def cli(*argv, stdin: bytes = b"", env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minibloom", *argv], input=stdin, capture_output=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_non_utf8_argument_and_stdin_are_one_line_errors():
    r = cli("generate", os.fsdecode(b"\xff\xfe"))
    assert r.returncode == 2 and b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr
    r = cli("generate", "-", stdin=b"\xff\xfe hello")
    assert r.returncode == 2 and b"stdin: not UTF-8" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "expected a JSON object"), ('{"top_k": Infinity}', "Infinity"),
    ('{"max_new_tokens": 1000000000000}', "max_new_tokens"), ('{"temperature": "hot"}', "temperature"),
])
def test_a_bad_generation_config_is_one_line(capsys, tmp_path, content, match):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(default_model_path(), d)
    (d / "generation_config.json").write_text(content)
    rc, out, err = run(capsys, "generate", "ROMEO:", "--model", str(d))
    assert rc == 2 and out == "" and "generation_config.json" in err and match in err, err


def test_gguf_converter_checks_its_output_path_first(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minibloom.gguf", default_model_path(),
                        str(tmp_path / "missing" / "out.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


# ---- chat ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return minibloom.load()


OPTS = dict(max_new_tokens=4, do_sample=False, eos_token_id=[], pad_token_id=3)


def test_unknown_chat_commands_are_reported_not_sent_to_the_model(model):
    out = io.StringIO()
    msgs = chat_loop(model, "play", OPTS, io.StringIO("/foo\n/quit\n"), out)
    assert msgs == [] and "unknown command /foo" in out.getvalue()


def test_ctrl_c_during_a_reply_keeps_the_conversation(model, monkeypatch):
    import minibloom.generate as G

    real = G.stream

    def interrupted(*a, **k):
        steps = real(*a, **k)

        def gen():
            yield next(steps)
            raise KeyboardInterrupt

        return gen()

    monkeypatch.setattr(G, "stream", interrupted)
    out = io.StringIO()
    msgs = chat_loop(model, "play", OPTS, io.StringIO("Good morrow\nAnd you?\n"), out)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]  # the chat went on
    assert out.getvalue().count("[stopped]") == 2


def test_a_template_that_cannot_render_fails_before_the_first_input(model):
    class Tok:
        def __getattr__(self, name):
            return getattr(model.tokenizer, name)

        chat_template = "{{ 1/0 }}"

    class M:
        def __getattr__(self, name):
            return getattr(model, name)

        tokenizer = Tok()

    stdin = io.StringIO("hello\n")
    with pytest.raises(minibloom.MinibloomError, match="template 'tokenizer'"):
        chat_loop(M(), "tokenizer", OPTS, stdin, io.StringIO())
    assert stdin.tell() == 0  # nothing was read


def test_help_lists_the_debug_option(capsys):
    rc, out, err = run(capsys, "--help")
    assert rc == 0 and "--debug" in out and err == ""
