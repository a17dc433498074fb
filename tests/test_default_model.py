"""The shipped default model (weights/default, trained by `minibloom train`): it loads, matches transformers,
its tokenizer has BLOOM's structure, it writes English, and its held-out perplexity is what its model card says."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

import minibloom
from minibloom.testing import FP32, assert_rel_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "weights", "default")
CORPUS = os.path.join(ROOT, "data", "tinyshakespeare.txt")
ENGLISH = {"the", "and", "to", "of", "my", "i", "you", "is", "a", "in", "that", "not", "me", "it", "with", "be",
           "your", "his", "he", "this", "for", "thou", "thy", "her", "what", "so", "have", "will", "shall", "but"}


@pytest.fixture(scope="module")
def model():
    return minibloom.load(DEFAULT)


@pytest.fixture(scope="module")
def metrics():
    with open(os.path.join(DEFAULT, "metrics.json")) as f:
        return json.load(f)


def ids_of(model, text: str) -> list[int]:
    enc = model.encode(text)
    return list(getattr(enc, "ids", enc))


def tokenizer_size(model) -> int:
    """Entries of the tokenizer (special tokens included): the ids it can ever produce are below this."""
    tok = model.tokenizer
    return tok.vocab_size if isinstance(getattr(tok, "vocab_size", None), int) else tok.get_vocab_size()


def greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding over minibloom's full forward pass (no cache, no generate)."""
    ids = list(prompt_ids)
    for _ in range(n):
        logits = model(np.asarray([ids]))
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[len(prompt_ids):]


# ---- files and loading ------------------------------------------------------------------------------------------

def test_files_present_and_small():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "metrics.json", "README.md"):
        assert os.path.isfile(os.path.join(DEFAULT, name)), name
    size = os.path.getsize(os.path.join(DEFAULT, "model.safetensors"))
    assert size < 10 * 2**20, f"model.safetensors is {size} bytes: the default model must stay a few MB"
    from minibloom.formats.safetensors import SafetensorsFile

    with SafetensorsFile(os.path.join(DEFAULT, "model.safetensors")) as f:
        dtypes = {f.info(n).dtype for n in f.names}
    assert dtypes == {"F16"}, dtypes


def test_loads_by_default(monkeypatch):
    monkeypatch.delenv("MINIBLOOM_WEIGHTS", raising=False)
    m = minibloom.load(None)
    assert os.path.samefile(m.path, DEFAULT)
    assert m.tokenizer is not None
    monkeypatch.chdir(ROOT)
    m2 = minibloom.load("weights/default")
    ids = np.asarray([ids_of(m, "ROMEO:\nWhat light")])
    np.testing.assert_array_equal(m(ids), m2(ids))


def test_config_and_padded_vocab(model, metrics):
    cfg = model.config
    assert (cfg.n_layer, cfg.hidden_size, cfg.n_head) == (metrics["n_layer"], metrics["hidden_size"], metrics["n_head"])
    assert model.vocab_size % 128 == 0 and model.vocab_size >= tokenizer_size(model)
    assert model.n_params == metrics["n_params"]
    with open(os.path.join(DEFAULT, "generation_config.json")) as f:
        gen = json.load(f)
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == (2, 3, 1)
    with open(os.path.join(DEFAULT, "tokenizer_config.json")) as f:
        tc = json.load(f)
    assert tc["padding_side"] == "left" and tc["eos_token"] == "</s>" and tc["pad_token"] == "<pad>"


# ---- tokenizer ----------------------------------------------------------------------------------------------------

def test_tokenizer_has_bloom_structure():
    with open(os.path.join(DEFAULT, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    assert tj["normalizer"] is None
    pre = tj["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    split, byte_level = pre["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"] == {"Regex": " ?[^(\\s|[.,!?…。，、।۔،])]+"}
    assert split["behavior"] == "Isolated" and split["invert"] is False
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False
    assert byte_level["use_regex"] is False
    assert tj["decoder"]["type"] == "ByteLevel"
    assert tj["model"]["type"] == "BPE"
    assert [(t["id"], t["content"], t["special"]) for t in tj["added_tokens"]] == [
        (0, "<unk>", True), (1, "<s>", True), (2, "</s>", True), (3, "<pad>", True)]


@pytest.mark.parametrize("text", ["ROMEO:\nBut, soft! what light through yonder window breaks?\n",
                                  "  odd  spacing\ttabs\n\n", "Ünïcödé — 漢字 🙂 (a|b) [x]", "x\x1cy\x00"])
def test_tokenizer_round_trips(model, text):
    ids = ids_of(model, text)
    assert all(4 <= i < tokenizer_size(model) for i in ids)  # no unk, no special tokens, no padded rows
    assert model.decode(ids) == text


def test_special_tokens(model):
    assert ids_of(model, "</s>") == [2]
    assert ids_of(model, "<unk><s></s><pad>") == [0, 1, 2, 3]
    ids = ids_of(model, "Farewell.</s>")
    assert ids[-1] == 2 and 1 not in ids  # no BOS added, the EOS comes from the text only
    assert ids_of(model, "Farewell.") == ids[:-1]


def test_bloom_pre_tokenization():
    """The Split regex isolates punctuation runs and keeps one leading space on words (as BLOOM's tokenizer.json does)."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(os.path.join(DEFAULT, "tokenizer.json"))
    pre = tk.pre_tokenizer.pre_tokenize_str("Hello, world! (a|b) [x]")
    bl = {" ": "Ġ"}  # ByteLevel shows a space as Ġ
    expected = ["Hello", ",", " world", "! (", "a", "|", "b", ")", " [x]"]
    assert [p for p, _ in pre] == ["".join(bl.get(c, c) for c in e) for e in expected]


# ---- numerics -----------------------------------------------------------------------------------------------------

def test_logits_match_transformers(model, record):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.BloomForCausalLM.from_pretrained(DEFAULT, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    text = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;"
    ids = np.asarray([ids_of(model, text)] * 2)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # second row: left padding
    ids[1, :5] = 3
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    got = model(ids, mask)
    assert got.dtype == np.float32 and got.shape == ref.shape == (2, ids.shape[1], model.vocab_size)
    record("default fp32 rel err", assert_rel_close(got[0], ref[0], FP32, "default model logits"))
    record("default fp32 rel err (padded)", assert_rel_close(got[1, 5:], ref[1, 5:], FP32, "padded row logits"))


def test_greedy_continuation_is_english(model):
    """Greedy decoding of a model this small loops on a few words; they are English ones, in verse layout."""
    out = model.decode(greedy(model, ids_of(model, "ROMEO:\n"), 40))
    print(repr(out))
    assert len(out) >= 60, out
    plain = sum(c.isascii() and (c.isalpha() or c in " \n,.;:!?'-") for c in out)
    assert plain / len(out) > 0.9, out
    words = set(re.findall(r"[a-z]+", out.lower()))
    assert len(words & ENGLISH) >= 2 and out.count("\n") >= 3, out


def test_sampled_text_is_english(model):
    """With its generation config (temperature 0.8, top-k 40), the model writes varied English."""
    for seed in range(3):
        out = model.decode(model.generate(ids_of(model, "ROMEO:\n"), max_new_tokens=60, do_sample=True,
                                          temperature=0.8, top_k=40, seed=seed)[0])
        words = set(re.findall(r"[a-z]+", out.lower()))
        assert len(words & ENGLISH) >= 5, out


def test_held_out_perplexity(metrics, record):
    """Recompute held-out loss on ~1500 tokens with float64 NumPy and compare with the model card."""
    m64 = minibloom.load(DEFAULT, dtype="float64")
    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()
    val = text[int(len(text) * 0.9):]  # the held-out split, as minibloom train makes it
    ids = np.asarray(ids_of(m64, val))
    ctx = metrics["ctx"]
    starts = np.linspace(0, len(ids) - ctx - 1, 6).astype(int)  # 6 windows spread over the split: 6 * ctx tokens
    windows = np.stack([ids[s:s + ctx + 1] for s in starts])
    logits = m64(windows[:, :-1]).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1)[..., 0]
    loss = float(nll.mean())
    chars = sum(len(m64.decode(w[1:].tolist())) for w in windows)
    bpc = float(nll.sum()) / math.log(2) / chars
    record("held-out loss (nats/token)", loss)
    record("held-out bits/char", bpc)
    # uniform over the tokenizer would be log(V) ~ 7.6 nats: the model must be far better, and agree with its card
    assert loss < 0.7 * math.log(tokenizer_size(m64))
    assert 1 / 1.5 < math.exp(loss) / metrics["val_ppl"] < 1.5, (loss, metrics["val_loss"])
    assert 1 / 1.2 < bpc / metrics["val_bpc"] < 1.2, (bpc, metrics["val_bpc"])
    with open(os.path.join(DEFAULT, "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert f"{metrics['val_ppl']:.2f}" in card and f"{metrics['val_bpc']:.4f}" in card
