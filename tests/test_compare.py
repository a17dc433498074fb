"""``minibloom compare``: logit error, KL divergence (float64) and top-1 agreement between two models."""

from __future__ import annotations

import json
import math

import factory
import numpy as np
import pytest
import tiny_tokenizer

import minibloom
from minibloom.cli import main
from minibloom.oracle.compare import compare_models, kl_divergence, random_prompts
from minibloom.errors import MinibloomError

gguf = pytest.importorskip("gguf")
from minibloom.gguf import convert_hf_to_gguf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    factory.save(factory.make_model(seed=11, hidden=64, n_head=4, n_layer=2, vocab=300), d)
    tiny_tokenizer.write(d, vocab_size=280)
    q = convert_hf_to_gguf(d, d / "m-q4_0.gguf", "q4_0")
    return str(d), str(q)


def test_kl_of_known_distributions():
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = kl_divergence(np.log(p) + 3.0, np.log(q) - 1.0)  # logits: log-probs up to a constant
    assert got.dtype == np.float64 and abs(float(got) - want) < 1e-15
    assert kl_divergence(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.0, 3.0]]))[0] == 0.0


def test_report_matches_torch_on_a_quantized_pair(pair):
    torch, _ = factory._import_torch()
    a, b = minibloom.load(pair[0]), minibloom.load(pair[1])
    ids = random_prompts(a.vocab_size, 3, 16, seed=2)
    r = compare_models(a, b, ids)
    za = np.concatenate([a(row[None]) for row in ids]).astype(np.float64)  # one prompt at a time, as compare does
    zb = np.concatenate([b(row[None]) for row in ids]).astype(np.float64)
    lp, lq = torch.log_softmax(torch.from_numpy(za), -1), torch.log_softmax(torch.from_numpy(zb), -1)
    kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).numpy()
    assert r.positions == 48 and r.prompts == 3
    assert r.max_abs == np.abs(za - zb).max() and r.max_rel == pytest.approx(r.max_abs / np.abs(za).max())
    assert r.mean_abs == pytest.approx(np.abs(za - zb).mean(), rel=1e-12)
    assert r.kl_mean == pytest.approx(kl.mean(), rel=1e-9) and r.kl_max == pytest.approx(kl.max(), rel=1e-9)
    assert r.top1 == pytest.approx((za.argmax(-1) == zb.argmax(-1)).mean())
    assert 0 < r.kl_mean and 0 < r.max_rel < 0.3  # Q4_0 moves the logits, but not wildly


def test_same_model_gives_zero_and_vocab_mismatch_is_an_error(pair, tmp_path):
    a = minibloom.load(pair[0])
    r = compare_models(a, a, random_prompts(a.vocab_size, 2, 8))
    assert (r.max_abs, r.kl_max, r.top1) == (0.0, 0.0, 1.0)
    other = factory.save(factory.make_model(seed=1, hidden=64, n_head=4, n_layer=2, vocab=128), tmp_path)
    with pytest.raises(MinibloomError, match="vocab sizes differ"):
        compare_models(a, minibloom.load(other), random_prompts(128, 1, 4))


def test_cli_json_and_text_prompts(pair, capsys):
    assert main(["compare", pair[0], pair[1], "--json", "--prompts", "2", "--length", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["positions"] == 16 and r["kl_mean"] > 0 and 0 <= r["top1"] <= 1
    assert main(["compare", pair[0], pair[1], "--text", "ROMEO: But soft", "--text", "héllo 日本"]) == 0
    out = capsys.readouterr().out
    assert "KL(A||B) mean" in out and "top-1 agreement" in out and "2 prompts" in out


def test_cli_model_options_and_positionals_name_the_same_pair(pair, capsys):
    """--reference/-r and --model/-m (as on every command) or the two positionals: the same report."""
    spellings = [[pair[0], pair[1]], ["--reference", pair[0], "--model", pair[1]], ["-r", pair[0], "-m", pair[1]],
                 ["-m", pair[1], pair[0]]]
    reports = []
    for models in spellings:
        assert main(["compare", *models, "--json", "--prompts", "1", "--length", "6"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert all(r == reports[0] for r in reports)
    swapped = ["--reference", pair[1], "--model", pair[0], "--json", "--prompts", "1", "--length", "6"]
    assert main(["compare", *swapped]) == 0
    assert json.loads(capsys.readouterr().out) != reports[0]  # the roles matter (KL(A||B) is not symmetric)
    for bad in ([pair[0]], [pair[0], pair[1], pair[0]], ["-m", pair[1]]):
        assert main(["compare", *bad]) == 2
        assert "--reference A" in capsys.readouterr().err
