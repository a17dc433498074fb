"""Tokenizer wrapper: BLOOM conventions (no implicit BOS/EOS, left padding, special ids) and streaming decode."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minibloom.errors import MinibloomError
from minibloom.tokenizer import REPLACEMENT, StreamDecoder, load_tokenizer
import tiny_tokenizer

TEXTS = ["héllo 日本語 🙂", "ROMEO: But soft, what light?", "a\u00a0b  c\n\nnew", "Ωμέγα — ĳ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tiny_tokenizer.write(tmp_path_factory.mktemp("tok")))


def test_missing_tokenizer_json_gives_none(tmp_path):
    assert load_tokenizer(str(tmp_path)) is None


def test_broken_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MinibloomError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_special_ids_and_no_implicit_bos_eos(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    ids = tok.encode("fox")
    assert 1 not in ids and 2 not in ids
    assert tok.encode("fox</s>") == ids + [2]  # special tokens written in the text are matched literally
    assert tok.all_special_ids == [0, 1, 2, 3]


def test_bloom_pre_tokenizer_splits(tok):
    # the Split regex of BLOOM's tokenizer.json (as in bigscience/bloom's tokenizer.json): punctuation and whitespace runs are isolated
    pre = tok._tk.pre_tokenizer.pre_tokenize_str("Hello, world! (a|b) [x]")
    words = [tok._tk.decoder.decode([w]) for w, _ in pre]  # byte-level characters back to text
    assert words == ["Hello", ",", " world", "! (", "a", "|", "b", ")", " [x]"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_encode_pads_on_the_left(tok):
    ids, mask = tok.encode_batch(["a much longer line of text", "hi"])
    short = tok.encode("hi")
    assert ids.shape == mask.shape and ids.shape[1] == len(tok.encode("a much longer line of text"))
    assert list(ids[1, -len(short):]) == short and np.all(ids[1, :-len(short)] == 3)
    assert np.all(mask[1, -len(short):] == 1) and np.all(mask[1, :-len(short)] == 0) and np.all(mask[0] == 1)
    assert tok.encode(["hi", "fox"]) == [short, tok.encode("fox")]
    with pytest.raises(MinibloomError):
        tok.encode_batch(["", "x"])


def test_decode_batch_and_skip_special(tok):
    ids = tok.encode("fox</s>")
    assert tok.decode(ids) == "fox</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "fox"
    assert tok.decode(np.array([ids, ids])) == ["fox</s>", "fox</s>"]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decode_never_emits_half_characters(tok, text):
    ids = tok.encode(text)
    # the test only means something if some character really is split across tokens
    if any(ord(c) > 127 for c in text):
        assert any(REPLACEMENT in tok.decode(ids[:i]) for i in range(1, len(ids)))
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == text
    # every emitted piece ends on a character boundary of the final text: the prefix so far is a prefix of it
    so_far = ""
    for p in pieces:
        so_far += p
        assert text.startswith(so_far)


def test_stream_decode_skips_special_tokens(tok):
    dec = tok.stream_decoder()
    out = dec.extend(tok.encode("to be</s>")) + dec.flush()
    assert out == "to be"
    dec = tok.stream_decoder(skip_special_tokens=False)
    assert dec.extend(tok.encode("to be</s>")) + dec.flush() == "to be</s>"


def test_stream_decode_flushes_a_broken_tail(tok):
    ids = tok.encode("日")
    assert len(ids) > 1
    dec = tok.stream_decoder()
    assert dec.extend(ids[:-1]) == ""  # incomplete character: nothing yet
    tail = dec.flush()  # generation ended mid-character: the lossy tail comes out at the very end
    assert tail and set(tail) == {REPLACEMENT}


def test_special_token_names_from_tokenizer_config(tmp_path):
    d = tiny_tokenizer.write(tmp_path)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["eos_token"] = {"content": "<s>", "special": True}  # hub files sometimes use the object form
    cfg["chat_template"] = "{{ messages }}"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    tok = load_tokenizer(d)
    assert tok.eos_token_id == 1 and tok.chat_template == "{{ messages }}"
