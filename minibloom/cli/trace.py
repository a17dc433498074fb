"""``minibloom trace``: write one forward pass (ids, every hidden state, logits, optionally attention and the
gradients of the loss) to a .npz."""

from __future__ import annotations

import argparse
import os
import re
import textwrap

import numpy as np

from ..errors import MinibloomError
from ..tokenizer import PADDING_SIDES, pad_rows, padding_side
from . import add_model_option


def add_input_args(p: argparse.ArgumentParser) -> None:
    """--ids / --text, shared by trace and check. Repeat either for a batch (rows are left-padded)."""
    p.add_argument("--ids", action="append", metavar="1,2,3",
                   help="comma-separated token ids; repeat for more rows (shorter rows are left-padded by default)")
    p.add_argument("--text", action="append", help="text to tokenize with the model's tokenizer; repeat for more rows")


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise MinibloomError(f"--ids: expected comma-separated integers like 1,2,3, got {text!r}") from None
    if not ids:
        raise MinibloomError("--ids: empty")
    return ids


def rows_from_args(args, model) -> list[list[int]] | None:
    """Token-id rows from --ids / --text (None when neither was given)."""
    if args.ids and args.text:
        raise MinibloomError("give either --ids or --text, not both")
    if args.ids:
        rows = [parse_ids(s) for s in args.ids]
        bad = next((i for r in rows for i in r if not 0 <= i < model.vocab_size), None)
        if bad is not None:
            raise MinibloomError(f"--ids: {bad} is not a token id of this model (0 .. {model.vocab_size - 1})")
        return rows
    if args.text:
        rows = []
        for t in args.text:
            enc = model.encode(t)
            rows.append([int(i) for i in getattr(enc, "ids", enc)])
            if not rows[-1]:
                raise MinibloomError(f"--text: {t!r} encodes to no tokens")
        return rows
    return None


def add_padding_args(p: argparse.ArgumentParser) -> None:
    """--padding / --mask: where a batch's pad tokens go."""
    p.add_argument("--padding", choices=PADDING_SIDES, default=None,
                   help="where shorter rows get their pad tokens: left (default, as BLOOM's tokenizer pads) or right "
                        "(pad ids after each row's last token, attention mask 0 there)")
    p.add_argument("--mask", metavar="FILE",
                   help="the attention mask [batch, seq] of 0/1: a .npy array, or a text file with one row of 0/1 "
                        "per line (e.g. '1 1 1 0 0'). With --ids every row must then be seq ids long (pad ids "
                        "included) and the mask says which are real; with --text each row's tokens fill its 1s")


DESCRIPTION = ("Run one forward pass and save input ids, attention mask, the n_layer + 1 hidden states (transformers' "
               "output_hidden_states convention), the logits and optionally the attention probabilities, for "
               "`minibloom diff`. The .npz format is documented in minibloom/trace.py. Lay out a batch the way the "
               "trace you compare with was made: --padding right for a right-padded one, --mask FILE for any other "
               "mask.")
EXAMPLES = """examples:
  minibloom trace --ids 5,6,7,8 --ids 9,10 --out ref.npz
  minibloom trace --ids 5,6,7,8 --ids 9,10 --padding right --dtype float64 --out ref.npz
  minibloom trace --ids 5,6,7,8 --ids 9,10,3,3 --mask mask.txt --out ref.npz   # mask.txt: '1 1 1 1' and '1 1 0 0'
"""


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="write every hidden state and the logits of one forward pass to a .npz",
                       description=textwrap.fill(DESCRIPTION, 100), epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p)
    add_input_args(p)
    add_padding_args(p)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float64 is the oracle mode (default: float32)")
    p.add_argument("--attentions", action="store_true", help="also save each block's attention probabilities")
    p.add_argument("--grads", action="store_true",
                   help="also save the causal-LM loss on the input ids (padding ignored) and the gradient of every "
                        "parameter (grad.NAME under transformers' names), for `minibloom diff` of a backward pass")
    p.add_argument("--out", required=True, help="output .npz path")
    p.set_defaults(func=run)


def _shape(a: np.ndarray) -> tuple[int, ...]:
    return tuple(int(n) for n in a.shape)


def _mask_values(a: np.ndarray, path: str) -> np.ndarray:
    """A mask array checked as [batch, seq] of 0/1 with a real token in every row -> int64."""
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise MinibloomError(f"--mask {path}: expected a [batch, seq] array, got shape {_shape(a)}")
    if a.size == 0:
        raise MinibloomError(f"--mask {path}: empty mask of shape {_shape(a)}")
    if a.dtype == bool:
        a = a.astype(np.int64)
    if a.dtype.kind not in "iuf":
        raise MinibloomError(f"--mask {path}: values must be 0 (padding) or 1 (token), got dtype {a.dtype}")
    bad = (a != 0) & (a != 1)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise MinibloomError(f"--mask {path}: values must be 0 (padding) or 1 (token), found {a[r, c].item()!r} "
                             f"at row {r}, position {c}")
    empty = np.flatnonzero(~a.astype(bool).any(axis=1))
    if empty.size:
        raise MinibloomError(f"--mask {path}: row {int(empty[0])} has no 1, so no real token")
    return a.astype(np.int64)


def _read_mask_text(path: str) -> np.ndarray:
    rows: list[list[int]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = [t for t in re.split(r"[,\s]+", line) if t]
            if len(parts) == 1 and len(parts[0]) > 1:
                parts = list(parts[0])  # "11100"
            try:
                values = [int(t) for t in parts]
            except ValueError:
                raise MinibloomError(f"--mask {path}: line {n}: expected 0/1 values like '1 1 0', "
                                     f"got {line!r}") from None
            if any(v not in (0, 1) for v in values):
                raise MinibloomError(f"--mask {path}: line {n}: values must be 0 (padding) or 1 (token), "
                                     f"got {line!r}")
            if rows and len(values) != len(rows[0]):
                raise MinibloomError(f"--mask {path}: line {n} has {len(values)} values, the first row "
                                     f"{len(rows[0])}; every row must be equally long")
            rows.append(values)
    if not rows:
        raise MinibloomError(f"--mask {path}: no rows (one line of 0/1 per row, e.g. '1 1 1 0')")
    return np.array(rows, np.int64)


def read_mask(path: str) -> np.ndarray:
    """The attention mask in ``path`` (a .npy array or a text file of 0/1 rows) as int64 [batch, seq]."""
    if not os.path.isfile(path):
        raise MinibloomError(f"--mask {path}: no such file")
    with open(path, "rb") as f:
        is_npy = f.read(6) == b"\x93NUMPY"
    if not is_npy:
        try:
            return _mask_values(_read_mask_text(path), path)
        except UnicodeDecodeError:
            raise MinibloomError(f"--mask {path}: neither a .npy array nor a text file of 0/1 rows") from None
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise MinibloomError(f"--mask {path}: not a readable .npy array ({e})") from None
    return _mask_values(a, path)


def place_rows(rows: list[list[int]], mask: np.ndarray, pad_id: int, full_rows: bool, path: str):
    """``(input_ids, attention_mask)`` for rows laid out by ``mask`` [B, T]. ``full_rows`` (--ids): every row is T
    ids, pads included, used as given; otherwise (--text) each row's tokens fill its mask's 1s and pads the rest."""
    B, T = (int(n) for n in mask.shape)
    if len(rows) != B:
        raise MinibloomError(f"--mask {path}: holds {B} row(s), but {len(rows)} input row(s) were given")
    ids = np.full((B, T), pad_id, np.int64)
    for i, r in enumerate(rows):
        real = int(mask[i].sum())
        if full_rows and len(r) != T:
            raise MinibloomError(f"--mask {path}: rows are {T} positions long, but --ids row {i} has {len(r)} ids; "
                                 f"with --mask give every row in full ({T} ids, pad ids included)")
        if not full_rows and len(r) != real:
            raise MinibloomError(f"--mask {path}: row {i} has {real} real position(s) (1s), but --text row {i} "
                                 f"encodes to {len(r)} token(s)")
        if full_rows:
            ids[i] = r
        else:
            ids[i, mask[i] != 0] = r
    return ids, mask


def inputs_from_args(args, model) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` from --ids / --text laid out by --padding or --mask."""
    rows = rows_from_args(args, model)
    if rows is None:
        raise MinibloomError("trace: give the input with --ids 1,2,3 or --text '...'")
    pad_id = int(getattr(model.config, "pad_token_id", None) or 0) % model.vocab_size
    if getattr(args, "mask", None) is None:
        return pad_rows(rows, pad_id, getattr(args, "padding", None) or "left")
    if args.padding is not None:
        raise MinibloomError("give --padding or --mask, not both (the mask already says where the pads are)")
    return place_rows(rows, read_mask(args.mask), pad_id, full_rows=bool(args.ids), path=args.mask)


def describe_layout(mask: np.ndarray) -> str:
    side = padding_side(mask)
    pads = int((mask == 0).sum())
    if side == "none":
        return "no padding"
    return f"{side}-padded, {pads} pad position(s)" if side != "mixed" else f"{pads} pad position(s) (mixed layout)"


def run(args) -> int:
    import minibloom
    from ..oracle.trace import save_trace, trace
    from . import output_path

    output_path(args.out, "--out")
    model = minibloom.load(args.model, dtype=args.dtype)
    ids, mask = inputs_from_args(args, model)
    tr = trace(model, ids, mask, attentions=args.attentions, grads=args.grads)
    path = save_trace(tr, args.out)
    grads = f", loss {tr['loss']:.6f} and {len(tr['grads'])} gradients" if args.grads else ""
    print(f"wrote {path}: {ids.shape[0]} row(s) x {ids.shape[1]} tokens ({describe_layout(mask)}), "
          f"{len(tr['hidden_states'])} hidden states, logits {list(tr['logits'].shape)}{grads}, {args.dtype}")
    return 0
