"""Right padding end to end: ``pad_rows`` / ``padding_side``, the forward pass on right-padded rows (fast and teaching
path, float64: the real positions equal the row run alone), ``minibloom trace --padding / --mask``, and the words
``diff`` uses when two traces cannot be compared (``minibloom.trace.explain_input_mismatch``)."""

from __future__ import annotations

import copy
import os
import re

import numpy as np
import pytest

import minibloom
from minibloom import fast
from minibloom import model as M
from minibloom.cli import main
from minibloom.errors import MinibloomError
from minibloom.tokenizer import left_pad, pad_rows, padding_side, right_pad
from minibloom.trace import diff_traces, explain_input_mismatch, load_trace, save_trace, trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "weights", "default")
TINY = os.path.join(ROOT, "tests", "golden", "tiny")  # vocab 128, no pad_token_id (minibloom trace pads with 0)
ROWS = [[5, 6, 7, 8], [9, 10]]
LEFT_IDS, LEFT_MASK = [[5, 6, 7, 8], [3, 3, 9, 10]], [[1, 1, 1, 1], [0, 0, 1, 1]]
RIGHT_IDS, RIGHT_MASK = [[5, 6, 7, 8], [9, 10, 3, 3]], [[1, 1, 1, 1], [1, 1, 0, 0]]
REL = 1e-12  # float64: a padded row's real positions vs the row alone (only the summation order may differ)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---- pad_rows / padding_side --------------------------------------------------------------------------------------
def test_pad_rows_left_and_right_layouts():
    ids, mask = right_pad(ROWS, 3)
    assert ids.tolist() == RIGHT_IDS and mask.tolist() == RIGHT_MASK
    assert ids.dtype == mask.dtype == np.int64
    ids, mask = pad_rows(ROWS, 3, "left")
    assert ids.tolist() == LEFT_IDS and mask.tolist() == LEFT_MASK
    assert [a.tolist() for a in left_pad(ROWS, 3)] == [LEFT_IDS, LEFT_MASK]  # the old name still pads on the left


@pytest.mark.parametrize("rows, side, message", [
    (ROWS, "middle", "'left' or 'right'"),
    ([], "right", "no rows"),
])
def test_pad_rows_bad_arguments(rows, side, message):
    with pytest.raises(MinibloomError, match=message):
        pad_rows(rows, 3, side)


@pytest.mark.parametrize("mask, side", [
    (LEFT_MASK, "left"),
    (RIGHT_MASK, "right"),
    ([[1, 1, 1], [1, 1, 1]], "none"),
    ([1, 1, 0], "right"),  # one row, 1-D
    ([[1, 1, 0], [0, 1, 1]], "mixed"),  # rows padded on different sides
    ([[1, 0, 1]], "mixed"),  # a hole
    ([[0, 1, 0]], "mixed"),  # pads on both sides
    ([[0, 0, 0]], "mixed"),  # no real token
])
def test_padding_side(mask, side):
    assert padding_side(np.array(mask)) == side


def test_tokenizer_encode_batch_right_padding():
    tok = minibloom.load(DEFAULT).tokenizer
    texts = ["ROMEO: What light", "But"]
    rows = tok.encode(texts)
    assert len(rows[0]) > len(rows[1])
    ids, mask = tok.encode_batch(texts, padding_side="right")
    n = len(rows[1])
    assert ids[1, :n].tolist() == rows[1] and (ids[1, n:] == tok.pad_token_id).all()
    assert mask[1].tolist() == [1] * n + [0] * (ids.shape[1] - n) and mask[0].all()
    left, _ = tok.encode_batch(texts)  # default unchanged: BLOOM pads on the left
    assert left[1, -n:].tolist() == rows[1]


# ---- the forward pass on right-padded rows ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_model(tiny_checkpoint):
    return minibloom.load(tiny_checkpoint, dtype="float64")


@pytest.fixture(scope="module")
def default_model():
    return minibloom.load(DEFAULT, dtype="float64")


def fast_path(m, ids, mask):
    return M.forward_outputs(m.params, ids, mask, m.config, hidden_states=True, primitives=fast.PRIMITIVES)


def public_api(m, ids, mask):
    return m.forward(ids, mask, output_hidden_states=True)  # NumPy backend: the NumPy primitives


def teaching_path(m, ids, mask):
    return M.forward_outputs(m.params, ids, mask, m.config, hidden_states=True)


def padded_rows(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(4, vocab, n).tolist() for n in (11, 4, 1, 8)]


@pytest.mark.parametrize("path, blocks", [(fast_path, "default"), (fast_path, "small"), (public_api, "default"),
                                          (teaching_path, "default")], ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("which", ["random", "default"])
def test_right_padded_rows_equal_each_row_alone_float64(request, monkeypatch, path, which, blocks, record):
    """Real positions of right-padded rows = the row run alone (what the cumulative-mask positions and the causal
    mask promise for any mask), with the NumPy primitives, through the public API, and with the reference ones."""
    if blocks == "small":  # the NumPy attention cut into one-query blocks, so block edges meet the padding
        monkeypatch.setattr(fast, "SCORE_BLOCK_ELEMS", 64)
    m = request.getfixturevalue(f"{which}_model")
    rows = padded_rows(m.vocab_size)
    ids, mask = right_pad(rows, pad_id=3)
    assert padding_side(mask) == "right"
    out = path(m, ids, mask)
    assert out.logits.dtype == np.float64
    worst = 0.0
    for i, r in enumerate(rows):
        alone = path(m, np.array([r]), np.ones((1, len(r)), np.int64))
        n = len(r)
        for j, (h, h1) in enumerate(zip(out.hidden_states, alone.hidden_states)):
            e = rel_err(h[i, :n], h1[0])
            assert e <= REL, f"row {i}, hidden state {j}: rel err {e:.2e}"
        e = rel_err(out.logits[i, :n], alone.logits[0])
        assert e <= REL, f"row {i} ({n} tokens): logits rel err {e:.2e} vs the row alone"
        worst = max(worst, e)
    record(f"right-padded vs alone ({which}, {path.__name__})", worst)


@pytest.mark.parametrize("which", ["random", "default"])
def test_left_and_right_padding_agree_on_real_positions(request, which):
    m = request.getfixturevalue(f"{which}_model")
    rows = padded_rows(m.vocab_size)
    (li, lm), (ri, rm) = left_pad(rows, 3), right_pad(rows, 3)
    lo, ro = m(li, lm), m(ri, rm)
    for i, r in enumerate(rows):
        n = len(r)
        assert rel_err(ro[i, :n], lo[i, -n:]) <= REL, f"row {i}"


def test_trace_keeps_a_right_padded_mask(default_model):
    ids, mask = right_pad(ROWS, 3)
    tr = trace(default_model, ids, mask)
    assert tr["attention_mask"].tolist() == RIGHT_MASK and tr["input_ids"].tolist() == RIGHT_IDS
    alone = default_model(np.array([ROWS[1]]))
    assert rel_err(tr["logits"][1, :2], alone[0]) <= REL


# ---- minibloom trace --padding / --mask ---------------------------------------------------------------------------
def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ids_args(rows):
    return [x for r in rows for x in ("--ids", ",".join(map(str, r)))]


def test_cli_trace_padding_right(tmp_path, capsys, default_model):
    out_path = tmp_path / "r.npz"
    rc, out, _ = run_cli(capsys, "trace", "--model", DEFAULT, *ids_args(ROWS), "--padding", "right",
                         "--dtype", "float64", "--out", out_path)
    assert rc == 0 and "right-padded" in out
    tr = load_trace(out_path)
    assert tr["input_ids"].tolist() == RIGHT_IDS  # weights/default's pad_token_id is 3
    assert tr["attention_mask"].tolist() == RIGHT_MASK
    for i, r in enumerate(ROWS):  # the real positions are the row run alone
        assert rel_err(tr["logits"][i, :len(r)], default_model(np.array([r]))[0]) <= REL


def test_cli_trace_default_is_still_left_padding(tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "trace", "--model", DEFAULT, *ids_args(ROWS), "--out", tmp_path / "l.npz")
    assert rc == 0 and "left-padded" in out
    tr = load_trace(tmp_path / "l.npz")
    assert tr["input_ids"].tolist() == LEFT_IDS and tr["attention_mask"].tolist() == LEFT_MASK


MASK_TEXT = "# one row per line\n1 1 0 1 0\n1,1,1,1,1\n\n00110\n"
MASK = [[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
FULL_ROWS = [[5, 6, 3, 7, 3], [9, 10, 11, 12, 13], [3, 3, 20, 21, 3]]


@pytest.mark.parametrize("kind", ["txt", "npy", "npy-bool"])
def test_cli_trace_mask_file_with_ids(tmp_path, capsys, default_model, kind):
    path = tmp_path / f"mask.{kind}"
    if kind == "txt":
        path.write_text(MASK_TEXT)
    else:
        with open(path, "wb") as f:  # any name: the .npy magic decides
            np.save(f, np.array(MASK, bool if kind == "npy-bool" else np.int32))
    rc, out, _ = run_cli(capsys, "trace", "--model", DEFAULT, *ids_args(FULL_ROWS), "--mask", path,
                         "--dtype", "float64", "--out", tmp_path / "m.npz")
    assert rc == 0, out
    tr = load_trace(tmp_path / "m.npz")
    assert tr["input_ids"].tolist() == FULL_ROWS and tr["attention_mask"].tolist() == MASK
    # any mask: the real tokens of a row with a hole / pads on both sides give the logits of those tokens alone
    for i in range(3):
        real = np.array(MASK[i], bool)
        alone = default_model(np.array(FULL_ROWS[i])[real][None])[0]
        assert rel_err(tr["logits"][i][real], alone) <= REL, f"row {i}"


def test_cli_trace_mask_file_with_text(tmp_path, capsys):
    tok = minibloom.load(DEFAULT).tokenizer
    texts = ["ROMEO: What light", "But"]
    rows = tok.encode(texts)
    T = len(rows[0]) + 1
    mask = np.zeros((2, T), np.int64)
    mask[0, :-1] = 1  # right-padded by one
    mask[1, 1:1 + len(rows[1])] = 1  # pads on both sides
    np.save(tmp_path / "mask.npy", mask)
    rc, _, err = run_cli(capsys, "trace", "--model", DEFAULT, "--text", texts[0], "--text", texts[1],
                         "--mask", tmp_path / "mask.npy", "--out", tmp_path / "t.npz")
    assert rc == 0, err
    tr = load_trace(tmp_path / "t.npz")
    assert tr["attention_mask"].tolist() == mask.tolist()
    assert tr["input_ids"][0, :-1].tolist() == rows[0] and tr["input_ids"][0, -1] == 3
    assert tr["input_ids"][1][mask[1] == 1].tolist() == rows[1] and (tr["input_ids"][1][mask[1] == 0] == 3).all()


@pytest.mark.parametrize("content, rows, message", [
    ("1 1 2\n1 1 1\n", FULL_ROWS, r"line 1: values must be 0 \(padding\) or 1"),
    ("1 1 x\n", FULL_ROWS, "line 1: expected 0/1 values"),
    ("1 1 1\n1 1\n", FULL_ROWS, "line 2 has 2 values, the first row 3"),
    ("# nothing\n", FULL_ROWS, "no rows"),
    ("1 1 1 1 1\n0 0 0 0 0\n1 1 1 1 1\n", FULL_ROWS, "row 1 has no 1"),
    ("1 1 1 1 1\n1 1 1 1 1\n", FULL_ROWS, r"holds 2 row\(s\), but 3 input row\(s\)"),
    ("1 1 1 1\n1 1 1 1\n1 1 1 1\n", FULL_ROWS, "rows are 4 positions long, but --ids row 0 has 5 ids"),
    (np.array([[1, 0.5, 1, 1, 1]] * 3), FULL_ROWS, r"found 0.5 at row 0, position 1"),
    (np.ones((3, 5, 1)), FULL_ROWS, r"\[batch, seq\] array, got shape \(3, 5, 1\)"),
    (np.array([["1", "0"]]), FULL_ROWS, "dtype <U1"),
])
def test_cli_trace_bad_mask_files_are_named(tmp_path, capsys, content, rows, message):
    path = tmp_path / "bad_mask"
    if isinstance(content, str):
        path.write_text(content)
    else:
        with open(path, "wb") as f:
            np.save(f, content)
    rc, _, err = run_cli(capsys, "trace", "--model", DEFAULT, *ids_args(rows), "--mask", path,
                         "--out", tmp_path / "x.npz")
    assert rc == 2
    assert f"--mask {path}:" in err and re.search(message, err), err
    assert not (tmp_path / "x.npz").exists()


def test_cli_trace_mask_errors_without_a_file(tmp_path, capsys):
    missing = tmp_path / "nope.npy"
    rc, _, err = run_cli(capsys, "trace", "--model", DEFAULT, "--ids", "1,2", "--mask", missing, "--out",
                         tmp_path / "x.npz")
    assert rc == 2 and f"--mask {missing}: no such file" in err
    (tmp_path / "m.txt").write_text("1 1\n")
    rc, _, err = run_cli(capsys, "trace", "--model", DEFAULT, "--ids", "1,2", "--mask", tmp_path / "m.txt",
                         "--padding", "right", "--out", tmp_path / "x.npz")
    assert rc == 2 and "--padding or --mask, not both" in err
    n = len(minibloom.load(DEFAULT).tokenizer.encode("But"))
    (tmp_path / "m1.txt").write_text(" ".join(["1"] * (n + 1)))  # one real position too many for the text
    rc, _, err = run_cli(capsys, "trace", "--model", DEFAULT, "--text", "But", "--mask", tmp_path / "m1.txt",
                         "--out", tmp_path / "x.npz")
    assert rc == 2 and f"row 0 has {n + 1} real position(s) (1s), but --text row 0 encodes to {n} token(s)" in err
    with pytest.raises(SystemExit):  # argparse refuses other sides
        main(["trace", "--ids", "1,2", "--padding", "middle", "--out", str(tmp_path / "x.npz")])


# ---- why two traces cannot be compared ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return minibloom.load(TINY, dtype="float64")


def tr(ids, mask):
    return {"input_ids": np.array(ids, np.int64), "attention_mask": np.array(mask, np.int64)}


NAMES = ("mine.npz", "ref.npz")


def explain(a, b):
    msg = explain_input_mismatch(a, b, NAMES)
    assert msg is None or ("int64" not in msg and "np." not in msg.replace("np.save", "")), msg  # plain ints
    return msg


def test_explain_right_vs_left_padding():
    msg = explain(tr(RIGHT_IDS, RIGHT_MASK), tr(LEFT_IDS, LEFT_MASK))
    assert msg.startswith("mine.npz is right-padded, ref.npz is left-padded")
    assert "same real tokens" in msg and "`minibloom trace --padding right`" in msg
    msg = explain(tr(LEFT_IDS, LEFT_MASK), tr(RIGHT_IDS, RIGHT_MASK))
    assert msg.startswith("mine.npz is left-padded, ref.npz is right-padded") and "--padding left" in msg


def test_explain_other_layouts_point_to_mask_files():
    ids, mask = right_pad(ROWS, 3)
    ids, mask = np.pad(ids, ((0, 0), (0, 3)), constant_values=3), np.pad(mask, ((0, 0), (0, 3)))  # fixed length 7
    msg = explain(tr(ids, mask), tr(LEFT_IDS, LEFT_MASK))
    assert "mine.npz is 2 row(s) x 7 positions, right-padded, ref.npz is 2 row(s) x 4 positions, left-padded" in msg
    assert "--mask mask.npy" in msg and "--padding" not in msg
    msg = explain(tr([[5, 6, 7]], [[1, 1, 1]]), tr([[3, 5, 6, 7]], [[0, 1, 1, 1]]))
    assert "not padded" in msg and "without padding" in msg


def test_explain_same_ids_different_mask_names_the_rows():
    mask = np.array(LEFT_MASK)
    mask[1, 1] = 1
    msg = explain(tr(LEFT_IDS, mask), tr(LEFT_IDS, LEFT_MASK))
    assert "same input_ids but a different attention_mask" in msg
    assert "row(s) 1 differ (row 1: 3 real token(s) in mine.npz, 2 in ref.npz)" in msg
    msg = explain(tr(LEFT_IDS, np.ones((2, 4))), tr(LEFT_IDS, LEFT_MASK))
    assert "mine.npz has no padding at all" in msg


@pytest.mark.parametrize("a, what", [
    (left_pad(ROWS + [[11]], 3), "(batch 3 vs 2)"),
    (left_pad([[5, 6, 7, 8, 9], [9, 10]], 3), "(seq 5 vs 4)"),
    (left_pad([[5, 6, 7, 8, 9], [9, 10], [1]], 3), "(batch 3 vs 2, seq 5 vs 4)"),
])
def test_explain_different_shapes(a, what):
    msg = explain(tr(*a), tr(LEFT_IDS, LEFT_MASK))
    assert f"different input_ids of different shapes {what}" in msg
    B, T = a[0].shape
    assert f"mine.npz is {B} row(s) x {T} positions, left-padded, ref.npz is 2 row(s) x 4 positions" in msg


def test_explain_different_ids_names_row_position_and_both_ids():
    ids = np.array(LEFT_IDS)
    ids[1, 3] = 77
    msg = explain(tr(ids, LEFT_MASK), tr(LEFT_IDS, LEFT_MASK))
    assert "different input_ids: row 1, position 3 holds token 77 in mine.npz but 10 in ref.npz" in msg
    # different ids in a different layout: the row, its real token, both columns and both ids
    msg = explain(tr(*right_pad([[5, 6, 7, 8], [9, 11]], 3)), tr(LEFT_IDS, LEFT_MASK))
    assert "(mine.npz is right-padded, ref.npz is left-padded)" in msg
    assert "row 1 differs first at its real token 1 (position 1 in mine.npz, 3 in ref.npz): 11 in mine.npz, " \
           "10 in ref.npz" in msg


def test_explain_accepts_identical_inputs_and_other_pad_ids():
    assert explain(tr(LEFT_IDS, LEFT_MASK), tr(LEFT_IDS, LEFT_MASK)) is None
    zero_pads = left_pad(ROWS, 0)  # e.g. a port that pads with <unk>: pads never reach a real position
    assert explain(tr(*zero_pads), tr(LEFT_IDS, LEFT_MASK)) is None


def test_diff_of_right_vs_left_padded_traces_explains_and_the_fix_works(tmp_path, capsys, tiny):
    """End to end: a right-padded candidate against a left-padded reference cannot be compared (exit 2, the fix in
    the message); the reference remade with `minibloom trace --padding right` compares and passes (exit 0)."""
    cand = trace(tiny, *right_pad(ROWS, 0))
    cand["logits"] = cand["logits"].astype(np.float32)  # "another implementation": float32 logits only
    cand["hidden_states"] = [h.astype(np.float32) for h in cand["hidden_states"]]
    cand["meta"] = {"dtype": "float32", "implementation": "my port"}
    mine = save_trace(cand, tmp_path / "mine.npz")
    rc, _, _ = run_cli(capsys, "trace", "--model", TINY, *ids_args(ROWS), "--dtype", "float64",
                       "--out", tmp_path / "left.npz")
    assert rc == 0
    rc, _, err = run_cli(capsys, "diff", mine, tmp_path / "left.npz")
    assert rc == 2
    assert f"{mine} is right-padded, {tmp_path / 'left.npz'} is left-padded" in err
    assert "`minibloom trace --padding right`" in err
    rc, out, err = run_cli(capsys, "trace", "--model", TINY, *ids_args(ROWS), "--padding", "right",
                           "--dtype", "float64", "--out", tmp_path / "right.npz")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "diff", mine, tmp_path / "right.npz")
    assert rc == 0, out + err


def test_diff_traces_raises_the_explanation(tiny):
    a, b = trace(tiny, *right_pad(ROWS, 0)), trace(tiny, *left_pad(ROWS, 0))
    with pytest.raises(MinibloomError, match=r"^A is right-padded, B is left-padded: .*--padding right"):
        diff_traces(a, b)
    c = copy.deepcopy(b)
    c["input_ids"][1, :2] = 5  # other pad ids: still comparable, and equal
    assert diff_traces(c, b).passed


def test_trace_help_shows_padding_and_mask(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trace", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--padding {left,right}" in out and "--mask FILE" in out
    assert "examples:" in out and "minibloom trace --ids 5,6,7,8 --ids 9,10 --padding right" in out
