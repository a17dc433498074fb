"""``minibloom bench``: the performance benchmark ``minibloom.bench`` (minibloom vs transformers, same run)."""

from __future__ import annotations

import argparse

from ..errors import MinibloomError

EXAMPLES = """\
examples:
  minibloom bench                         build the random bloom-560m-shaped checkpoint once, measure everything
  minibloom bench --rounds 5 --json out.json
  minibloom bench --skip-transformers     minibloom and the machine's limits only

Builds a random float32 checkpoint of the exact bloom-560m shape (2.24 GB, in $TMPDIR/minibloom-bench unless --dir),
then measures minibloom and transformers alternately in the same run, best of several rounds: batch-1 and batch-8
greedy decode, a 512-token forward with all logits, time to first token after a 512-token prompt, cold start to the
first token, load time and peak RSS, next to a NumPy sgemv (bandwidth roofline) and sgemm (compute floor) measured
in the same rounds. Needs transformers and torch for the comparison; takes minutes and several GB of RAM (the checkpoint
is written once, then read by both engines).
Thread counts come from the environment (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS).
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark minibloom against transformers on a bloom-560m-shaped model",
        description="Measure decode speed, forward time, time to first token, cold start, load time and peak RSS "
                    "of minibloom and transformers in the same run.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where the random checkpoint is (built there if missing)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of in-process measurements (best kept)")
    p.add_argument("--cold-rounds", type=int, default=3, help="fresh-process cold starts per engine")
    p.add_argument("--skip-transformers", action="store_true", help="measure minibloom and the machine's limits only")
    p.add_argument("--json", default=None, help="also write the raw figures to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    if not (1 <= args.rounds <= 1000 and 1 <= args.cold_rounds <= 1000):
        raise MinibloomError("--rounds and --cold-rounds must be from 1 to 1000")
    if not args.skip_transformers:
        import importlib.util

        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:  # checked here: the measuring runs in worker processes, whose ImportError would be a traceback
            raise MinibloomError(f"bench: the comparison with transformers needs {' and '.join(missing)} "
                                 "(pip install 'minibloom[test]'), or pass --skip-transformers")
    from ..bench import main

    argv = ["--rounds", str(args.rounds), "--cold-rounds", str(args.cold_rounds)]
    if args.dir:
        argv += ["--dir", args.dir]
    if args.skip_transformers:
        argv.append("--skip-transformers")
    if args.json:
        argv += ["--json", args.json]
    return main(argv)
