"""``minibloom calibrate``: measure correct ports and planted port bugs per implementation kind; rebuild policies."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..oracle.calibrate import add_arguments

    p = sub.add_parser("calibrate", help="measure correct ports and a matrix of port bugs; rebuild the policies",
                       description="Run emulated correct ports of every implementation kind (float32, float16, "
                                   "int8, int4, q8_0, nf4, ...) and a matrix of planted port bugs on random and "
                                   "trained checkpoints against minibloom's float64 logits, on two paths: statistical "
                                   "(each kind against its reference) and same-weights (float compute on quantized "
                                   "weights against float64 on those weights); print the correct-port table and both "
                                   "bug matrices, and with --write rebuild minibloom/oracle/policies.json (the "
                                   "policies `diff`, `verify` and minibloom.testing apply). Needs a clone (weights/, "
                                   "data/); transformers' own runs join the population when torch is installed. "
                                   "Run time: about 3 minutes on 2 idle cores for the default (3 seeds; measured "
                                   "2 min 47 s wall, 323 s CPU), several times longer while other jobs share the "
                                   "cores; --quick runs one seed, --wide adds a slow 24 x 512 checkpoint.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..oracle.calibrate import run as calibrate

    return calibrate(args)
