"""``minibloom check``: minibloom vs transformers on one checkpoint, per layer, in float32 and float64."""

from __future__ import annotations

from ..errors import MinibloomError
from ..tokenizer import left_pad
from .trace import add_input_args, rows_from_args
from . import add_model_option


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="compare minibloom with transformers layer by layer (needs torch+transformers)",
                       description="Run minibloom and transformers on the same checkpoint and inputs and print the "
                                   "per-layer agreement in float32 and in float64 (transformers' float32 softmax "
                                   "and ALiBi slopes patched to float64). Exit 0 when every layer is within "
                                   "tolerance, 1 otherwise, 2 when transformers is missing or the checkpoint is "
                                   "quantized (GGUF, bitsandbytes), which transformers cannot run the same way.")
    add_model_option(p)
    add_input_args(p)
    p.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    p.add_argument("--attentions", action="store_true", help="also compare attention probabilities")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids used without --ids/--text")
    p.add_argument("--seq", type=int, default=16, help="length of the random ids (default 16)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..oracle import hf as oracle

    if not oracle.hf_available():
        raise MinibloomError("check: transformers (and torch) are not installed, so there is nothing to compare "
                             "against; `pip install 'minibloom[test]'` or use `minibloom diff` on saved traces")
    directory = oracle.comparable_checkpoint(args.model)
    ids = mask = None
    if args.ids or args.text:
        from ..tokenizer import load_tokenizer

        rows = rows_from_args(args, _Encoder(load_tokenizer(directory), directory))
        ids, mask = left_pad(rows, pad_id=0)
    elif args.seq < 1:
        raise MinibloomError(f"--seq: must be >= 1, got {args.seq}")
    else:
        import os

        from ..config import BloomConfig

        vocab = BloomConfig.from_json(os.path.join(directory, "config.json")).vocab_size
        ids, mask = oracle.default_inputs(vocab, seq=args.seq, pad=min(5, args.seq - 1), seed=args.seed)
    dtypes = ("float32", "float64") if args.dtype == "both" else (args.dtype,)
    result = oracle.check(directory, ids, mask, dtypes=dtypes, attentions=args.attentions)
    print(result.table())
    return 0 if result.passed else 1


class _Encoder:
    """Just enough of ``Bloom`` for ``rows_from_args``: ``encode`` with the checkpoint's tokenizer and the config's
    ``vocab_size``, without loading the weights."""

    def __init__(self, tokenizer, directory: str):
        import os

        from ..config import BloomConfig

        self.tokenizer, self.directory = tokenizer, directory
        self.vocab_size = BloomConfig.from_json(os.path.join(directory, "config.json")).vocab_size

    def encode(self, text: str):
        if self.tokenizer is None:
            raise MinibloomError(f"{self.directory}: this model has no tokenizer.json; pass --ids instead")
        return self.tokenizer.encode(text)
