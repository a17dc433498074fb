"""Training: AdamW against torch.optim.AdamW, the schedule and clipping, a run against torch end to end, exact
resume, checkpoints transformers loads, gradient accumulation, fine-tuning on assistant turns, the CLI."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import minibloom
from minibloom import backward as G
from minibloom import training as T
from minibloom.bloom import hf_names
from minibloom.cli import main
from minibloom.paths import default_model_path
from minibloom.oracle.testing import rel_error
from minibloom.training.optim import AdamW, clip_grad_norm, global_norm, lr_at

TINY = dict(batch=4, ctx=32, hidden=32, layers=2, heads=4, vocab=300, vocab_rows=384, warmup=3, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A few KB of the bundled corpus: enough for tiny runs, quick to tokenize."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(T.read_text(None)[:30000], encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# The optimizer, the schedule, clipping


def test_adamw_equals_torch_after_ten_steps(record):
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(0)
    shapes = {"w": (5, 4), "b": (4,), "ln": (6,), "m": (3, 3)}
    params = {k: r.normal(size=s) for k, s in shapes.items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = AdamW(params, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert opt.decay == {"w", "m"}
    topt = torch.optim.AdamW([{"params": [tparams["w"], tparams["m"]], "weight_decay": 0.1},
                              {"params": [tparams["b"], tparams["ln"]], "weight_decay": 0.0}],
                             lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(10):
        grads = {k: r.normal(size=s) * 10.0 ** r.integers(-3, 2) for k, s in shapes.items()}
        lr = lr_at(step, 3e-3, 3, 10)
        clip_grad_norm(grads, 1.0)
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k])  # the clipped gradients: clipping is checked on its own below
        for g in topt.param_groups:
            g["lr"] = lr
        topt.step()
        opt.step(grads, lr)
    worst = record("AdamW param rel err, 10 steps", max(rel_error(params[k], tparams[k].detach().numpy())
                                                        for k in params))
    assert worst <= 1e-13


def test_clip_grad_norm_equals_torch():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(1)
    grads = {"a": r.normal(size=(4, 3)), "b": r.normal(size=5)}
    t = [torch.tensor(g.copy(), requires_grad=True) for g in grads.values()]
    for p, g in zip(t, grads.values()):
        p.grad = torch.tensor(g.copy())
    norm = clip_grad_norm(grads, 0.5)
    tnorm = torch.nn.utils.clip_grad_norm_(t, 0.5)
    assert norm == pytest.approx(float(tnorm), rel=1e-14)
    for p, g in zip(t, grads.values()):
        assert rel_error(g, p.grad.numpy()) < 1e-14
    assert global_norm(grads) == pytest.approx(0.5, rel=1e-5)


def test_warmup_then_cosine():
    assert lr_at(0, 1.0, 4, 20) == 0.25 and lr_at(3, 1.0, 4, 20) == 1.0  # linear warm-up
    assert lr_at(4, 1.0, 4, 20, 0.1) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(12, 1.0, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the mean
    assert lr_at(20, 1.0, 4, 20, 0.1) == pytest.approx(0.1) == lr_at(99, 1.0, 4, 20, 0.1)


# ---------------------------------------------------------------------------------------------------------------
# A whole run against torch


def test_ten_training_steps_equal_torch_in_float64(tiny_checkpoint, record):
    """The same checkpoint, batch and recipe in minibloom and in transformers + torch.optim.AdamW (float64, patched
    like the forward oracle): parameters after 10 steps agree to 1e-10."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from minibloom.oracle.hf import hf_float64_exact

    model = minibloom.load(tiny_checkpoint, dtype="float64")
    hf = transformers.BloomForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float64,
                                                       attn_implementation="eager").eval()
    r = np.random.default_rng(2)
    ids = r.integers(0, model.vocab_size, (3, 10))
    mask = np.ones_like(ids)
    mask[2, :3] = 0
    labels = np.where(mask == 1, ids, -100)
    opt = AdamW(hf_names(model.params), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    named = dict(hf.named_parameters())
    decay = [p for n, p in named.items() if p.ndim >= 2]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95))
    tl = torch.as_tensor(labels)
    for step in range(10):
        lr = lr_at(step, 1e-2, 3, 10)
        T.train_step(model, opt, [(ids, mask, labels)], lr, grad_clip=1.0)
        with hf_float64_exact():
            logits = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     tl[:, 1:].reshape(-1), ignore_index=-100)
        topt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        for g in topt.param_groups:
            g["lr"] = lr
        topt.step()
    mine = hf_names(model.params)
    worst = record("param rel err after 10 steps",
                   max(rel_error(mine[n], p.detach().numpy()) for n, p in named.items()))
    assert worst <= 1e-10
    assert rel_error(mine["transformer.ln_f.bias"], minibloom.load(tiny_checkpoint).params["ln_f"]["bias"]) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Runs, checkpoints, resume


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_resume_continues_bit_for_bit(corpus, tmp_path, dtype):
    full = T.train(corpus, out=str(tmp_path / "a"), steps=8, save_every=4, dtype=dtype, **TINY)
    assert os.path.isfile(tmp_path / "a" / "checkpoint-4" / "trainer_state.safetensors")
    resumed = T.train(resume=str(tmp_path / "a" / "checkpoint-4"), out=str(tmp_path / "b"), progress=False)
    a, b = hf_names(full.model.params), hf_names(resumed.model.params)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in full.history[4:]] == [h["loss"] for h in resumed.history]
    assert full.history[0]["loss"] > full.history[-1]["loss"]  # it learns


def test_checkpoints_load_in_transformers_unchanged(corpus, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    res = T.train(corpus, out=str(tmp_path / "m"), steps=3, **TINY)
    hf = transformers.BloomForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    ids = np.array([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    assert rel_error(res.model(ids), ref) < 1e-5
    loaded = minibloom.load(str(tmp_path / "m"))
    assert loaded.tokenizer.encode("ROMEO:") == res.model.tokenizer.encode("ROMEO:")
    assert [loaded.tokenizer.token_to_id(s) for s in T.SPECIAL_TOKENS] == [0, 1, 2, 3]


def test_gradient_accumulation_averages_the_micro_batches(tiny_checkpoint):
    model = minibloom.load(tiny_checkpoint, dtype="float64")
    r = np.random.default_rng(3)
    x = r.integers(0, model.vocab_size, (4, 8))
    one = [(x, np.ones_like(x), x)]
    two = [(x[:2], np.ones_like(x[:2]), x[:2]), (x[2:], np.ones_like(x[2:]), x[2:])]

    class Capture:  # an optimizer that keeps the gradient it is given
        def step(self, grads, lr):
            self.grads = grads

    got = {}
    for name, batches in (("one", one), ("two", two)):
        opt = Capture()
        loss, _, tokens = T.train_step(model, opt, batches, 1e-2, grad_clip=0.0)
        got[name] = loss, tokens, opt.grads
    assert got["one"][0] == pytest.approx(got["two"][0], rel=1e-13)  # equal windows: mean of means = mean
    assert got["one"][1] == got["two"][1] == 32
    assert all(rel_error(got["two"][2][k], v) < 1e-12 for k, v in got["one"][2].items())


def test_a_new_tokenizer_has_blooms_special_tokens(corpus):
    tok = T.train_bpe(T.read_text(corpus), 300)
    assert [tok.token_to_id(s) for s in T.SPECIAL_TOKENS] == [0, 1, 2, 3] and tok.vocab_size == 300
    assert tok.decode(tok.encode("Thou art — naïve!")) == "Thou art — naïve!"  # every byte encodes


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning


DIALOGUE = [
    {"messages": [{"role": "user", "content": "Good morrow."}, {"role": "assistant", "content": "Good morrow, sir."}]},
    {"messages": [{"role": "user", "content": "What news?"}, {"role": "assistant", "content": "None, my lord."}]},
    {"messages": [{"role": "system", "content": "A play."}, {"role": "user", "content": "Art thou well?"},
                  {"role": "assistant", "content": "Well enough."}]},
]


@pytest.fixture
def dialogue(tmp_path) -> str:
    path = tmp_path / "dialogue.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in DIALOGUE * 3) + "\n", encoding="utf-8")
    return str(path)


def test_only_assistant_replies_are_labelled():
    tok = minibloom.load().tokenizer
    ids, labels = T.conversation_tokens(tok, DIALOGUE[0]["messages"], "play")
    scored = tok.decode([int(i) for i, lab in zip(ids, labels) if lab != G.IGNORE_INDEX])
    assert scored == "Good morrow, sir.\n\n"  # the reply and its end of turn; not the user's turn, not "JULIET:\n"
    assert tok.decode([int(i) for i in ids]) == "ROMEO:\nGood morrow.\n\nJULIET:\nGood morrow, sir.\n\n"


def test_fine_tuning_lowers_the_assistant_loss(dialogue, tmp_path):
    res = T.train(dialogue, model=default_model_path(), chat_template="play",
                  out=str(tmp_path / "chat"), steps=6, batch=4, ctx=64, lr=1e-3, warmup=1, val_fraction=0.3,
                  progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert math.isfinite(res.metrics["val_loss"])
    assert minibloom.load(str(tmp_path / "chat")).config.n_layer == 4


def test_fine_tuning_a_quantized_gguf_dequantizes_it(dialogue, tmp_path):
    pytest.importorskip("gguf")
    from minibloom.formats.gguf.writer import convert_hf_to_gguf

    path = str(tmp_path / "default-q8_0.gguf")
    convert_hf_to_gguf(default_model_path(), path, "q8_0")
    res = T.train(dialogue, model=path, chat_template="play", steps=2, batch=2, ctx=64, lr=1e-3, warmup=1,
                  progress=False)
    assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)


# ---------------------------------------------------------------------------------------------------------------
# The command line


def test_cli_trains_and_reports(corpus, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["train", "--data", corpus, "--out", out, "--steps", "3", "--layers", "1", "--hidden", "32",
                 "--heads", "4", "--ctx", "32", "--batch", "4", "--vocab", "300", "--vocab-rows", "384",
                 "--save-dtype", "float16", "--json", "--no-progress"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["steps"] == 3 and figures["val_ppl"] > 1 and "val_ppl_as_saved" in figures
    assert minibloom.load(out).params["ln_f"]["weight"].dtype == np.float32  # stored float16, computed float32


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps: must be an integer in [1, "),
    (["--batch", "4", "--accumulate", "3"], "accumulate: 3 does not divide batch 4"),
    (["--hidden", "30", "--heads", "4"], "hidden: 30 is not divisible by heads 4"),
    (["--data", "/nonexistent.txt"], "no such file"),
    (["--vocab", "500", "--vocab-rows", "384"], "vocab_rows"),
    (["--lr", "nan"], "lr: must be a finite number"),
    (["--resume", "/tmp"], "not a checkpoint minibloom train wrote"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    assert main(["train", "--out", str(tmp_path / "x"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, message", [
    (lambda meta: meta.update(rng={"bit_generator": "nonsense"}), "data-order state"),
    (lambda meta: meta["config"].update(steps="many"), "steps: must be an integer"),
    (lambda meta: meta["config"].update(unknown_field=1), "saved training config"),
    (lambda meta: meta.update(optimizer_step=-1), "optimizer_step"),
    (lambda meta: meta.update(step="x"), "not a trainer state"),
])
def test_a_damaged_trainer_state_is_a_clear_error(corpus, tmp_path, damage, message):
    T.train(corpus, out=str(tmp_path / "a"), steps=2, **TINY)
    path = tmp_path / "a" / T.STATE_JSON
    meta = json.loads(path.read_text())
    damage(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(minibloom.MinibloomError, match=message):
        T.train(resume=str(tmp_path / "a"), progress=False)


def test_optimizer_state_of_another_model_is_refused(corpus, tmp_path):
    T.train(corpus, out=str(tmp_path / "a"), steps=2, **TINY)
    T.train(corpus, out=str(tmp_path / "b"), steps=2, **{**TINY, "hidden": 64})
    os.replace(tmp_path / "b" / T.STATE_TENSORS, tmp_path / "a" / T.STATE_TENSORS)
    with pytest.raises(minibloom.MinibloomError, match="optimizer state m.transformer"):
        T.train(resume=str(tmp_path / "a"), progress=False)
