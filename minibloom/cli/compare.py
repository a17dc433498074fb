"""``minibloom compare A B``: how far model B's logits are from model A's (max/mean error, KL, top-1 agreement)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="quantization report: logit error, KL divergence and top-1 agreement of B vs A",
                       description="Run models A (reference, e.g. the float32 checkpoint) and B (candidate, e.g. "
                                   "a GGUF Q4_0 file or a bitsandbytes 4-bit directory) on the same prompts and print "
                                   "max/mean logit error, KL(A||B) in float64 and top-1 agreement. A and B are "
                                   "anything minibloom.load reads (directory, .gguf, hub id) with the same vocab.")
    p.add_argument("a", metavar="A", help="reference model")
    p.add_argument("b", metavar="B", help="model to compare with A")
    p.add_argument("--text", action="append", metavar="TEXT",
                   help="a prompt, tokenized with A's tokenizer (repeat for several); default: random token ids")
    p.add_argument("--prompts", type=int, default=4, metavar="N", help="random prompts (default 4)")
    p.add_argument("--length", type=int, default=64, metavar="T", help="tokens per random prompt (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="compute dtype of both models")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bloom import load
    from ..oracle.compare import compare_models, random_prompts
    from ..errors import MinibloomError

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
