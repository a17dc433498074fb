"""The generate / chat / info / download commands, on tiny checkpoints written in the test (no network, no torch)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minibloom
from minibloom.cli import main
from minibloom.chat import StopWatcher, chat_loop, fit_context, reply, stop_token_ids, with_stop_ids
from minibloom.formats.loading import default_model_path
import tiny_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_tokenizer.write_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", seed=3)


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- generate ---------------------------------------------------------------------------------------------------

def test_generate_greedy_prints_prompt_and_the_greedy_continuation(ckpt, capsys):
    rc, out, _ = run_cli(capsys, "generate", "ROMEO: hello", "--model", ckpt, "-n", "12", "--temperature", "0")
    assert rc == 0
    m = minibloom.load(ckpt)
    ids = m.tokenizer.encode("ROMEO: hello")
    ref = m.generate([ids], max_new_tokens=12)
    assert out == m.tokenizer.decode(ref[0], skip_special_tokens=True) + "\n"
    assert out.startswith("ROMEO: hello") and len(out) > len("ROMEO: hello\n")


def test_generate_sampling_is_reproducible_with_seed(ckpt, capsys):
    args = ("generate", "to be", "--model", ckpt, "-n", "20", "--temperature", "1.5", "--top-k", "0", "--no-echo")
    a = run_cli(capsys, *args, "--seed", "1")[1]
    b = run_cli(capsys, *args, "--seed", "1")[1]
    c = run_cli(capsys, *args, "--seed", "2")[1]
    assert a == b and a != c
    assert not a.startswith("to be")


def test_generate_streams_piece_by_piece(ckpt):
    from minibloom.cli import build_parser
    from minibloom.cli.generate import run

    class Recorder(io.StringIO):
        writes = 0

        def write(self, s):
            Recorder.writes += 1
            return super().write(s)

    args = build_parser().parse_args(["generate", "ROMEO:", "--model", ckpt, "-n", "10", "--greedy", "--stats"])
    out, err = Recorder(), io.StringIO()
    assert run(args, stdout=out, stderr=err) == 0
    assert Recorder.writes >= 5  # the text arrives as it is generated, not in one write at the end
    assert "tokens/s" in err.getvalue() and "prompt" in err.getvalue()


def test_generate_without_tokenizer_explains(tmp_path, capsys):
    d = tiny_tokenizer.write_checkpoint(tmp_path / "notok", tokenizer=False)
    rc, _, err = run_cli(capsys, "generate", "hi", "--model", d, "-n", "3")
    assert rc == 2 and "tokenizer.json" in err


@pytest.mark.parametrize("flags,what", [(("--temperature", "-1"), "--temperature"),
                                        (("--max-new-tokens", "-3"), "--max-new-tokens"),
                                        (("--top-p", "2"), "top_p")])
def test_generate_bad_flags(ckpt, capsys, flags, what):
    rc, _, err = run_cli(capsys, "generate", "hi", "--model", ckpt, *flags)
    assert rc == 2 and what in err


def test_generation_config_supplies_defaults(tmp_path, capsys):
    d = tiny_tokenizer.write_checkpoint(tmp_path / "gc", seed=4)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"do_sample": False, "max_new_tokens": 7}, f)
    rc, out, _ = run_cli(capsys, "generate", "ROMEO:", "--model", d, "--no-echo")
    m = minibloom.load(d)
    ref = m.generate([m.tokenizer.encode("ROMEO:")], max_new_tokens=7)
    assert out == m.tokenizer.decode(ref[0, -7:], skip_special_tokens=True) + "\n"


def test_console_script_runs_without_torch(ckpt):
    code = ("import sys; from minibloom.cli import main; "
            f"rc = main(['generate', 'ROMEO:', '--model', {ckpt!r}, '-n', '5', '--seed', '0']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'; "
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:")


@pytest.mark.skipif(not os.path.isfile(os.path.join(default_model_path(), "model.safetensors")),
                    reason="weights/default not trained yet")
def test_default_model_writes_english_offline():
    r = subprocess.run([sys.executable, "-m", "minibloom", "generate", "ROMEO:", "--max-new-tokens", "60",
                        "--seed", "0"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    words = [w.strip(".,;:!?'\"").lower() for w in r.stdout.split()]
    common = {"the", "and", "i", "to", "of", "you", "my", "a", "that", "is", "in", "not", "me", "it", "with", "be"}
    assert sum(w in common for w in words) >= 5, r.stdout


# ---- chat -------------------------------------------------------------------------------------------------------

def test_stop_watcher_holds_back_possible_stop_prefixes():
    w = StopWatcher(["\n\n", "ROMEO:"])
    assert w.feed("Good night") == ("Good night", False)
    assert w.feed("\n") == ("", False)  # maybe the start of "\n\n"
    assert w.feed("sweet RO") == ("\nsweet ", False)
    assert w.feed("MEO: hi") == ("", True)
    w = StopWatcher(["</s>"])
    assert w.feed("a</") == ("a", False)
    assert w.rest() == "</"


def test_chat_keeps_the_conversation(ckpt):
    m = minibloom.load(ckpt)
    opts = dict(max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=3)
    out = io.StringIO()
    msgs = chat_loop(m, "oasst", opts, io.StringIO("Hello there\n\nHow are you?\n/show\n/quit\nignored\n"), out)
    assert [x["role"] for x in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "Hello there" and msgs[2]["content"] == "How are you?"
    # the second reply was generated from the whole conversation: it equals greedy decoding of that prompt
    from minibloom.chat import render

    prompt = render(msgs[:3], "oasst")
    assert prompt.startswith("<|prompter|>Hello there</s><|assistant|>" + msgs[1]["content"] + "</s>")
    ids = m.tokenizer.encode(prompt)
    ref = m.generate([ids], max_new_tokens=6)[0, len(ids):]
    text = m.tokenizer.decode(ref, skip_special_tokens=True)
    for stop in ("</s>", "<|prompter|>", "<|assistant|>"):
        text = text.split(stop)[0]
    assert msgs[3]["content"] == text
    shown = out.getvalue().splitlines()
    assert shown[:4] == [msgs[1]["content"], "", msgs[3]["content"], ""]  # piped replies: a blank line after each
    assert "<|prompter|>How are you?</s>" in shown[4]  # /show prints the prompt with the history


def test_chat_reset(ckpt):
    m = minibloom.load(ckpt)
    opts = dict(max_new_tokens=3, do_sample=False, eos_token_id=2, pad_token_id=3)
    out = io.StringIO()
    msgs = chat_loop(m, "play", opts, io.StringIO("one\n/reset\ntwo\n"), out, system="A garden.")
    assert [x["content"] for x in msgs][:2] == ["A garden.", "two"]
    assert "(conversation cleared)" in out.getvalue()


def test_chat_reply_stops_at_template_stop_string(ckpt):
    m = minibloom.load(ckpt)
    ids = m.tokenizer.encode("ROMEO:\nhi\n\nJULIET:\n")
    free = m.tokenizer.decode(m.generate([ids], max_new_tokens=20, eos_token_id=[])[0, len(ids):],
                              skip_special_tokens=True)
    assert len(free) > 3
    stop = free[2:4]  # whatever the model writes at characters 2-3 becomes the stop string
    out = io.StringIO()
    text = reply(m, "ROMEO:\nhi\n\nJULIET:\n", dict(max_new_tokens=20, do_sample=False, eos_token_id=[],
                                                     pad_token_id=3), (stop,), out)
    assert text == free[:free.find(stop)] and out.getvalue() == text + "\n"


def test_special_stop_strings_stop_by_token_id(ckpt):
    from minibloom.chat import stop_strings

    tok = minibloom.load(ckpt).tokenizer
    assert stop_token_ids(tok, stop_strings("bloomz-sft-chat")) == [1, 2]  # "</s>", "<s>"
    assert stop_token_ids(tok, stop_strings("plain")) == []
    assert with_stop_ids({"eos_token_id": 2}, [1, 2])["eos_token_id"] == [1, 2]
    assert with_stop_ids({"eos_token_id": None}, [7])["eos_token_id"] == [7]


def test_fit_context_drops_oldest_turns():
    msgs = [{"role": "system", "content": "S"}] + [{"role": r, "content": "x" * 10} for r in ("user", "assistant",
                                                                                               "user")]
    kept = fit_context(msgs, lambda ms: "".join(m["content"] for m in ms), list, budget=12)
    assert kept == [msgs[0], msgs[3]]


def test_chat_command_via_stdin(ckpt):
    r = subprocess.run([sys.executable, "-m", "minibloom", "chat", "--model", ckpt, "--template", "play", "-n", "5",
                        "--seed", "0"], input="Hello\nAnd you?\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) >= 2


def test_chat_unknown_template(ckpt, capsys):
    rc, _, err = run_cli(capsys, "chat", "--model", ckpt, "--template", "nope")
    assert rc == 2 and "unknown chat template" in err


# ---- info and download ------------------------------------------------------------------------------------------

def test_info_counts_and_sizes_from_headers(ckpt, capsys):
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    n = sum(int(np.prod(t.shape)) for t in tensors.values())
    rc, out, _ = run_cli(capsys, "info", ckpt, "--json")
    facts = json.loads(out)
    assert rc == 0
    assert facts["n_params"] == n
    assert facts["memory_bytes"] == {"float32": 4 * n, "float64": 8 * n}
    assert facts["tensor_dtypes"] == {"F32": {"tensors": len(tensors), "bytes": 4 * n}}
    assert facts["disk_bytes"] == os.path.getsize(os.path.join(ckpt, "model.safetensors"))
    assert facts["config"]["n_layer"] == 2 and facts["config"]["vocab_rows"] == 320
    assert facts["tokenizer"]["vocab_size"] == 300 and facts["chat_template"] == "bloomz"
    rc, text, _ = run_cli(capsys, "info", ckpt)
    assert rc == 0 and f"{n:,}" in text and "float64" in text and "tokenizer" in text


def test_info_bf16_and_template_from_tokenizer_config(tmp_path, capsys):
    d = tiny_tokenizer.write_checkpoint(tmp_path / "m", bf16=True, chat_template="oasst", tokenizer=True)
    rc, out, _ = run_cli(capsys, "info", d, "--json")
    facts = json.loads(out)
    assert list(facts["tensor_dtypes"]) == ["BF16"] and facts["chat_template"] == "oasst"
    assert facts["memory_bytes"]["float32"] == 2 * facts["tensor_dtypes"]["BF16"]["bytes"]


def test_download_command(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    def fake(repo_id, **kw):
        calls.append(kw)
        return tiny_tokenizer.write_checkpoint(kw["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    rc, out, _ = run_cli(capsys, "download", "org/tiny", "--dir", str(tmp_path), "-q")
    assert rc == 0 and str(tmp_path / "org--tiny") in out
    assert "*.safetensors" in calls[0]["allow_patterns"] and "*.bin" not in calls[0]["allow_patterns"]


@pytest.mark.parametrize("cmd", ["generate", "chat", "info", "download"])
def test_help_texts_have_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in out and f"minibloom {cmd}" in out


def test_info_reads_gguf_headers(ckpt, tmp_path, capsys):
    pytest.importorskip("gguf")
    from minibloom.gguf import convert_hf_to_gguf

    path = str(tmp_path / "tiny-q8_0.gguf")
    convert_hf_to_gguf(ckpt, path, outtype="q8_0")
    rc, out, _ = run_cli(capsys, "info", path, "--json")
    facts = json.loads(out)
    ref = json.loads(run_cli(capsys, "info", ckpt, "--json")[1])
    assert rc == 0 and facts["format"] == "gguf"
    assert facts["n_params"] == ref["n_params"] and facts["config"] == {**ref["config"], "torch_dtype": None}
    assert "Q8_0" in facts["tensor_dtypes"] and facts["tokenizer"]["vocab_size"] == 300


def test_model_option_is_the_same_on_every_command(capsys):
    tiny = os.path.join(os.path.dirname(__file__), "golden", "tiny")
    assert main(["info", "-m", tiny, "--json"]) == 0
    by_option = json.loads(capsys.readouterr().out)
    assert main(["info", tiny, "--json"]) == 0  # the positional spelling stays
    assert json.loads(capsys.readouterr().out) == by_option
    with pytest.raises(SystemExit) as e:
        main(["info", tiny, "--model", "weights/other"])
    assert e.value.code == 2 and "given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["download"])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err
    for command in ("trace", "check", "verify", "generate", "chat", "info", "download"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--model M, -m M" in capsys.readouterr().out, command
