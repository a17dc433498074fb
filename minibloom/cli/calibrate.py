"""``minibloom calibrate``: measure correct ports and planted port bugs per implementation kind; rebuild policies."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..oracle.calibrate import add_arguments

    p = sub.add_parser("calibrate", help="measure correct ports and a matrix of port bugs; rebuild the policies",
                       description="Run emulated correct ports of every implementation kind (float32, float16, "
                                   "int8, q8_0, nf4, ...) and a matrix of planted port bugs on random and trained "
                                   "checkpoints against minibloom's float64 logits; print the correct-port table and "
                                   "the bug matrix, and with --write rebuild minibloom/oracle/policies.json (the "
                                   "policies "
                                   "`diff`, `verify` and minibloom.testing apply). Needs a clone (weights/, data/); "
                                   "transformers' own runs join the population when torch is installed.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..oracle.calibrate import run as calibrate

    return calibrate(args)
