"""``minibloom trace``: write one forward pass (ids, every hidden state, logits, optionally attention) to a .npz."""

from __future__ import annotations

import argparse

import numpy as np

from ..errors import MinibloomError
from ..tokenizer import left_pad


def add_input_args(p: argparse.ArgumentParser) -> None:
    """--ids / --text, shared by trace and check. Repeat either for a batch (rows are left-padded)."""
    p.add_argument("--ids", action="append", metavar="1,2,3",
                   help="comma-separated token ids; repeat for more rows (shorter rows are left-padded)")
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
        return [parse_ids(s) for s in args.ids]
    if args.text:
        rows = []
        for t in args.text:
            enc = model.encode(t)
            rows.append([int(i) for i in getattr(enc, "ids", enc)])
            if not rows[-1]:
                raise MinibloomError(f"--text: {t!r} encodes to no tokens")
        return rows
    return None


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="write every hidden state and the logits of one forward pass to a .npz",
                       description="Run one forward pass and save input ids, attention mask, the n_layer + 1 hidden "
                                   "states (transformers' output_hidden_states convention), the logits and "
                                   "optionally the attention probabilities, for `minibloom diff`. The .npz format "
                                   "is documented in minibloom/trace.py.")
    p.add_argument("--model", help="checkpoint directory, .safetensors, .gguf or hub id (default: weights/default)")
    add_input_args(p)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float64 is the oracle mode (default: float32)")
    p.add_argument("--attentions", action="store_true", help="also save each block's attention probabilities")
    p.add_argument("--out", required=True, help="output .npz path")
    p.set_defaults(func=run)


def run(args) -> int:
    import minibloom
    from ..trace import save_trace, trace

    model = minibloom.load(args.model, dtype=args.dtype)
    rows = rows_from_args(args, model)
    if rows is None:
        raise MinibloomError("trace: give the input with --ids 1,2,3 or --text '...'")
    ids, mask = left_pad(rows, pad_id=int(getattr(model.config, "pad_token_id", None) or 0) % model.vocab_size)
    tr = trace(model, ids, mask, attentions=args.attentions)
    path = save_trace(tr, args.out)
    print(f"wrote {path}: {ids.shape[0]} row(s) x {ids.shape[1]} tokens, {len(tr['hidden_states'])} hidden states, "
          f"logits {list(tr['logits'].shape)}, {args.dtype}")
    return 0
