"""16-bit -> float32 widening: every candidate measured in one run, in GB/s of 16-bit input read.

    python benchmarks/widen.py [--mib 256] [--rounds 5]   # on a shared machine: under flock

Candidates: NumPy's ``astype`` (fresh memory) and ``np.copyto`` into a preallocated array, ``ml_dtypes``' bfloat16
cast (ml_dtypes has no binary16 type of its own: NumPy's is the only one), and ``minibloom.formats.widen`` two ways:
with the optional C extension's kernels (``minibloom.formats.native``, where the extension is built and the CPU has
AVX2 + F16C) and with ``MINIBLOOM_NATIVE=off`` (the NumPy passes, the path of an install without the extension). Each
way runs on one thread and on all cores into a preallocated array, and into a reused 1 MiB buffer (what a low-memory
product does: the widened block stays in cache). A float32 copy and sum of the same number of elements give the
machine's memory rates for scale.

Every round times each candidate once, in turn, so that the two ways alternate (A, B, A, B, ...) and a neighbour's
load on a shared machine hits both alike; the best of ``--rounds`` is printed, then the C / NumPy ratio per row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def switched(off: bool, f):
    """``f`` run with ``MINIBLOOM_NATIVE`` off (the NumPy passes) or on (the C kernels); read at every call."""
    def run():
        old = os.environ.get("MINIBLOOM_NATIVE")
        os.environ["MINIBLOOM_NATIVE"] = "off" if off else "on"
        try:
            f()
        finally:
            if old is None:
                del os.environ["MINIBLOOM_NATIVE"]
            else:
                os.environ["MINIBLOOM_NATIVE"] = old
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB of 16-bit input")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    from minibloom.formats import native
    from minibloom.formats import widen as W

    n = args.mib * 2**20 // 2
    rng = np.random.default_rng(0)
    h = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float16)  # a weight-like spread
    b = h.view(np.uint16)  # as bfloat16 bit patterns
    out = np.zeros(n, np.float32)
    out2 = np.zeros(n, np.float32)
    chunk = W.CHUNK

    def into_buffer(code, src):
        def run():
            for lo in range(0, n, chunk):
                W._widen_range(src[lo:lo + chunk], code, W.scratch(min(chunk, n - lo), np.float32), None, 0, True)
        return run

    rows = [  # (kind, name, way or None, function)
        ("memory", "float32 copy (read + write 4 B/elem)", None, lambda: np.copyto(out2, out)),
        ("memory", "float32 sum (read 4 B/elem)", None, lambda: np.add.reduce(out)),
        ("float16", "numpy astype (fresh memory)", None, lambda: h.astype(np.float32)),
        ("float16", "numpy copyto (preallocated)", None, lambda: np.copyto(out, h)),
        ("bfloat16", "shift via astype (fresh memory)", None, lambda: (b.astype(np.uint32) << 16).view(np.float32)),
    ]
    ways = [("NumPy passes", True)]
    if native.kernel("F16", np.float32) is not None:
        ways.insert(0, ("C kernels", False))
    else:
        print(f"no C kernels here ({native.reason}): their rows are skipped")
    for code, kind in (("F16", "float16"), ("BF16", "bfloat16")):
        src = h if code == "F16" else b
        for way, off in ways:
            one, every = (lambda c=code, s=src: W.widen_into(s, c, out, threads=1)), (
                lambda c=code, s=src: W.widen_into(s, c, out))
            rows += [
                (kind, "widen, 1 thread", way, switched(off, one)),
                (kind, f"widen, {W.THREADS} threads", way, switched(off, every)),
                (kind, "widen, reused 1 MiB buffer", way, switched(off, into_buffer(code, src))),
            ]
    try:
        import ml_dtypes

        bf = b.view(ml_dtypes.bfloat16)
        rows.append(("bfloat16", f"ml_dtypes {ml_dtypes.__version__} copyto (preallocated)", None,
                     lambda: np.copyto(out, bf)))
    except ImportError:
        print("ml_dtypes not installed: its candidate is skipped")
    print(f"{n * 2 / 2**20:.0f} MiB of 16-bit input, {W.THREADS} threads, best of {args.rounds} interleaved rounds; "
          f"C kernels: {native.reason}")
    for _, _, _, f in rows:  # warm-up: page faults of fresh arrays, thread pools, the kernels' self-check
        f()
    best = [float("inf")] * len(rows)
    for _ in range(args.rounds):
        for i, (_, _, _, f) in enumerate(rows):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    rate = {}
    for (kind, name, way, _), s in zip(rows, best):
        label = name if way is None else f"{name}, {way}"
        unit = "GB/s-equivalent" if kind == "memory" else "GB/s"
        rate[kind, name, way] = n * 2 / s / 1e9
        print(f"{kind:9s} {label:58s} {n * 2 / s / 1e9:6.2f} {unit}", flush=True)
    if len(ways) == 2:
        for (kind, name, way), r in rate.items():
            if way == "C kernels":
                print(f"{kind:9s} {name:44s} C kernels / NumPy passes {r / rate[kind, name, 'NumPy passes']:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
