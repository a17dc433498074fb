"""``minibloom compare --reference A --model B`` (or ``minibloom compare A B``): how far model B's logits are from
model A's (max/mean error, KL, top-1 agreement)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="quantization report: logit error, KL divergence and top-1 agreement of B vs A",
                       description="Run models A (reference, e.g. the float32 checkpoint) and B (candidate, e.g. "
                                   "a GGUF Q4_0 file or a bitsandbytes 4-bit directory) on the same prompts and print "
                                   "max/mean logit error, KL(A||B) in float64 and top-1 agreement. A and B are "
                                   "anything minibloom.load reads (directory, .gguf, hub id) with the same vocab.")
    p.add_argument("--reference", "-r", metavar="A", default=None, help="the reference model A")
    p.add_argument("--model", "-m", metavar="B", default=None, help="the model B compared with A")
    p.add_argument("models", metavar="A B", nargs="*", default=[],
                   help="the reference and the compared model as positionals (the older spelling)")
    p.add_argument("--text", action="append", metavar="TEXT",
                   help="a prompt, tokenized with A's tokenizer (repeat for several); default: random token ids")
    p.add_argument("--prompts", type=int, default=4, metavar="N", help="random prompts (default 4)")
    p.add_argument("--length", type=int, default=64, metavar="T", help="tokens per random prompt (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute dtype of both models")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def models(args) -> tuple[str, str]:
    """(reference, compared) from ``--reference``/``--model`` and the positionals, which fill whichever is unset."""
    from ..errors import MinibloomError

    pos = list(args.models)
    ref = args.reference if args.reference is not None else (pos.pop(0) if pos else None)
    cand = args.model if args.model is not None else (pos.pop(0) if pos else None)
    if pos:
        raise MinibloomError(f"compare: too many models ({', '.join(repr(p) for p in args.models)}); give the "
                             "reference with --reference A and the compared model with --model B")
    if ref is None or cand is None:
        raise MinibloomError("compare: give the reference with --reference A and the compared model with --model B "
                             "(or both as positionals: minibloom compare A B)")
    return ref, cand


def run(args) -> int:
    from ..bloom import load
    from ..errors import MinibloomError
    from ..oracle.compare import compare_models, random_prompts

    args.a, args.b = models(args)
    a = load(args.a, dtype=args.dtype)
    b = load(args.b, dtype=args.dtype)
    if args.text:
        if a.tokenizer is None:
            raise MinibloomError(f"--text: {args.a} has no tokenizer; leave --text out to use random token ids")
        prompts = [a.tokenizer.encode(t) for t in args.text]
        if any(len(p) == 0 for p in prompts):
            raise MinibloomError("--text: a prompt encodes to no tokens")
    else:
        prompts = random_prompts(a.vocab_size, args.prompts, args.length, args.seed)
    report = compare_models(a, b, prompts)
    print(report.to_json() if args.json else report.table())
    return 0
