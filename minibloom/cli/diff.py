"""``minibloom diff A.npz B.npz``: per-layer errors of trace A against reference trace B; exit 1 on a mismatch."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("diff", help="compare two traces layer by layer; exit 1 at the first layer that differs",
                       description="Compare trace A (the implementation under test) with trace B (the reference) "
                                   "layer by layer, over real (unpadded) positions. A layer passes when "
                                   "max|A - B| <= atol + rtol * max|B|. Exit status: 0 all layers agree, 1 a "
                                   "mismatch (the first divergent layer is named), 2 the traces cannot be compared.")
    p.add_argument("a", metavar="A.npz", help="trace under test")
    p.add_argument("b", metavar="B.npz", help="reference trace")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance (default: minibloom.testing's policy for the candidate's meta kind / "
                        "dtype, sized for the model from B's hidden states or B's meta n_layer / hidden_size; A's "
                        "meta must agree with that size)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance added to rtol * max|B| (default 0)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the verdict line")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..oracle.trace import diff_traces

    report = diff_traces(args.a, args.b, rtol=args.rtol, atol=args.atol)
    print(report.table().splitlines()[-1] if args.quiet else report.table())
    return 0 if report.passed else 1
