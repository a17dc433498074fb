"""16-bit -> float32 widening: every candidate measured in one run, in GB/s of 16-bit input read.

    python benchmarks/widen.py [--mib 512] [--rounds 3]   # on a shared machine: under flock

Candidates: NumPy's ``astype`` (fresh memory, what ``bf16_to_f32`` and the old loader did), ``np.copyto`` into a
preallocated array, ``ml_dtypes``' bfloat16 cast (ml_dtypes has no binary16 type of its own: NumPy's is the only
one), and ``minibloom.formats.widen`` with its machine-code loops (``minibloom.formats.native``, where the CPU has
them) and with the NumPy passes they replace, on one thread and on all cores, into a preallocated array and into a
reused 1 MiB buffer (what a low-memory product does: the widened block stays in cache). A float32 copy and sum of
the same number of elements give the machine's memory rates for scale. Best of ``--rounds`` for each.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="MiB of 16-bit input")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    from minibloom.bench import best
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

    def numpy_passes(f):  # the same call with the machine-code loops switched off
        def run():
            kernels, native._kernels = native._kernels, {}
            try:
                f()
            finally:
                native._kernels = kernels
        return run

    rows = [
        ("float16", "numpy astype (fresh memory)", lambda: h.astype(np.float32)),
        ("float16", "numpy copyto (preallocated)", lambda: np.copyto(out, h)),
    ]
    ways = [("NumPy passes", numpy_passes)]
    if native.kernel("F16", np.float32) is not None:
        ways.append(("machine code", lambda f: f))
    else:
        print(f"no machine-code kernels here ({native.reason}): their rows are skipped")
    for code, kind, first in (("F16", "float16", ""), ("BF16", "bfloat16", " (shift)")):
        src = h if code == "F16" else b
        if code == "BF16":
            rows.append(("bfloat16", "shift via astype (fresh memory)",
                         lambda: (b.astype(np.uint32) << 16).view(np.float32)))
        for way, wrap in ways:
            rows += [
                (kind, f"widen{first}, {way}, 1 thread",
                 wrap(lambda c=code, s=src: W.widen_into(s, c, out, threads=1))),
                (kind, f"widen{first}, {way}, {W.THREADS} threads",
                 wrap(lambda c=code, s=src: W.widen_into(s, c, out))),
                (kind, f"widen{first}, {way}, reused 1 MiB buffer", wrap(into_buffer(code, src))),
            ]
    try:
        import ml_dtypes

        bf = b.view(ml_dtypes.bfloat16)
        rows.append(("bfloat16", f"ml_dtypes {ml_dtypes.__version__} copyto (preallocated)",
                     lambda: np.copyto(out, bf)))
    except ImportError:
        print("ml_dtypes not installed: its candidate is skipped")
    print(f"{n * 2 / 2**20:.0f} MiB of 16-bit input, {W.THREADS} threads, best of {args.rounds}")
    copy_s = best(lambda: np.copyto(out2, out), args.rounds, warm=True)
    sum_s = best(lambda: np.add.reduce(out), args.rounds, warm=True)
    print(f"{'memory':9s} {'float32 copy (read + write 4 B/elem)':45s} {n * 2 / copy_s / 1e9:6.2f} GB/s-equivalent")
    print(f"{'memory':9s} {'float32 sum (read 4 B/elem)':45s} {n * 2 / sum_s / 1e9:6.2f} GB/s-equivalent")
    base = {}
    for kind, name, f in rows:
        s = best(f, args.rounds, warm=True)
        base.setdefault(kind, s)
        print(f"{kind:9s} {name:54s} {n * 2 / s / 1e9:6.2f} GB/s  ({base[kind] / s:4.1f}x the first)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
