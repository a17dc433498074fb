"""Normal-mode loading of 16-bit checkpoints: random bloom-3b-shaped float16 and bfloat16 files (~6 GB each).

    flock /tmp/minibloom-heavy.lock python benchmarks/load_3b.py [--dir /tmp/minibloom-3b] [--new 16] [--keep]

For each dtype it writes the checkpoint once (``minibloom.bench.ensure_checkpoint``), reads it so the page cache is
warm, then in a fresh process: measures the memory bandwidth (a float32 matrix-vector product over a 1 GB matrix,
the best of a second of back-to-back calls) and how fast the kernel hands out fresh memory (the page faults of
1 GiB), times ``minibloom.load(path)`` (float32: the 16-bit weights widened into RAM) and batch-1 greedy decoding
(a 16-token prompt, then ``--new`` tokens), and prints the decode rate against its roofline: the bandwidth over the
bytes of weights one token reads (every float32 weight once). Deletes the checkpoints unless ``--keep``. With
``PYTHONPATH`` pointing at another minibloom it measures that version.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import child


def load_and_decode(path: str, new: int) -> dict:
    """This machine's sgemv bandwidth and fresh-memory rate, then the load and ``new`` greedy tokens."""
    import numpy as np

    import minibloom
    from minibloom.backend import empty_private
    from minibloom.bench import peak_rss

    W = np.random.default_rng(0).standard_normal((1 << 18, 1024), dtype=np.float32)  # 1 GiB
    x = np.ones(1024, np.float32)
    best, t_end = float("inf"), time.perf_counter() + 1.0
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        W @ x
        best = min(best, time.perf_counter() - t)
    bandwidth = W.nbytes / best
    del W
    fresh = empty_private((1 << 28,), np.float32)  # 1 GiB the kernel has not handed out yet
    t = time.perf_counter()
    fresh.reshape(-1, 1024)[:, 0] = 0
    fresh_rate = fresh.nbytes / (time.perf_counter() - t)
    del fresh
    t = time.perf_counter()
    m = minibloom.load(path, progress=False)
    load_s = time.perf_counter() - t
    p = m.params
    weights = sum(a.nbytes for a in [p["word_embeddings"]["weight"]] + [w for layer in p["h"] for w in (
        layer["self_attention"]["query_key_value"]["weight"], layer["self_attention"]["dense"]["weight"],
        layer["mlp"]["dense_h_to_4h"]["weight"], layer["mlp"]["dense_4h_to_h"]["weight"])])
    ids = np.random.default_rng(0).integers(5, m.vocab_size, (1, 16))
    m.generate(ids, max_new_tokens=2, eos_token_id=[])  # warm-up
    times = []
    m.generate(ids, max_new_tokens=new + 1, eos_token_id=[], callback=lambda nxt: times.append(time.perf_counter()))
    return {"load_s": load_s, "decode_tok_s": new / (times[-1] - times[0]), "bandwidth": bandwidth,
            "weight_bytes": weights, "peak_rss": peak_rss(), "fresh_rate": fresh_rate}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minibloom-3b"))
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--shape", default="bloom-3b", help="another shape from minibloom.bench.SHAPES (smoke tests)")
    args = ap.parse_args(argv)
    import numpy as np

    from minibloom.bench import ensure_checkpoint

    try:
        for dtype in args.dtypes:
            path = os.path.join(args.dir, dtype)
            t = time.perf_counter()
            ensure_checkpoint(path, args.shape, dtype=np.float16 if dtype == "float16" else dtype)
            size = os.path.getsize(os.path.join(path, "model.safetensors"))
            with open(os.path.join(path, "model.safetensors"), "rb") as f:  # warm the page cache
                while f.read(64 << 20):
                    pass
            print(f"{args.shape} {dtype}: file {size / 1e9:.2f} GB (ready in {time.perf_counter() - t:.0f} s)",
                  flush=True)
            d = child.run(__file__, "load_and_decode", path=path, new=args.new)
            roof = d["bandwidth"] / d["weight_bytes"]
            print(f"  load {d['load_s']:.2f} s ({size / d['load_s'] / 1e9:.2f} GB/s of {dtype}); decode "
                  f"{d['decode_tok_s']:.2f} tok/s = {d['decode_tok_s'] / roof:.1%} of the roofline {roof:.2f} tok/s "
                  f"({d['weight_bytes'] / 1e9:.2f} GB of float32 weights per token at {d['bandwidth'] / 1e9:.1f} "
                  f"GB/s); peak RSS {d['peak_rss'] / 1e9:.2f} GB", flush=True)
            print(f"  fresh memory (page faults, one thread) {d['fresh_rate'] / 1e9:.2f} GB/s: handing out the "
                  f"{d['weight_bytes'] / 1e9:.1f} GB of float32 weights alone takes "
                  f"{d['weight_bytes'] / d['fresh_rate']:.1f} s at that rate", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(0 if child.serve({"load_and_decode": load_and_decode}) else main())
