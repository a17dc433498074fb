"""Low-memory mode at scale: a random bloom-7b1-shaped float16 checkpoint (~14 GB) on a 24 GB machine.

    flock /tmp/minibloom-heavy.lock python benchmarks/lowmem_7b1.py --dir /tmp/minibloom-7b1 [--new 8] [--keep]
        [--max-memory 16GB]

Writes the checkpoint tensor by tensor (``minibloom.bench.ensure_checkpoint``; float32 it would be 28 GB, more than
RAM), reads it once so the page cache is warm, then, each in a fresh process so that peak RSS (VmHWM) belongs to that
run alone:

1. ``load(..., low_memory=True)`` in float32 (``--max-memory``: the budget; default: the default one) and greedy
   decode: a 16-token prompt, then ``--new`` tokens;
2. ``load(..., dtype="float64", low_memory=True)`` and one 512-token forward keeping all logits (the oracle mode),
   against its dgemm floor measured in the same process: the forward's matrix products (12 T C^2 per layer and
   T V C for the head, multiply-adds) at the rate of a large float64 matrix product on this machine.

Prints tokens/s, seconds, peak RSS and the ratios, and deletes the checkpoint unless ``--keep``. The low-memory maths
is the normal mode's (``tests/test_lowmem.py`` holds them equal on small checkpoints). With ``PYTHONPATH`` pointing
at another minibloom (one without ``max_memory``), leave ``--max-memory`` out: it measures that version.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import child


def decode(path: str, new: int, max_memory: str | None) -> dict:
    """Low-memory float32 load and greedy decode: a 16-token prompt, then ``new`` tokens."""
    import numpy as np

    import minibloom
    from minibloom.bench import peak_rss

    budget = {} if max_memory is None else {"max_memory": max_memory}
    t = time.perf_counter()
    m = minibloom.load(path, low_memory=True, progress=False, **budget)
    load_s = time.perf_counter() - t
    h = m.params["h"]
    ids = np.random.default_rng(0).integers(5, m.vocab_size, (1, 16))
    times = []
    out = m.generate(ids, max_new_tokens=new, eos_token_id=[], callback=lambda nxt: times.append(time.perf_counter()))
    return {"load_s": load_s, "first_token_s": times[0] - t - load_s, "tokens": out[0, 16:].tolist(),
            "decode_tok_s": (new - 1) / (times[-1] - times[0]) if new > 1 else None, "peak_rss": peak_rss(),
            "resident": getattr(h, "resident", 0), "layers": len(h)}  # resident: layers kept widened


def forward64(path: str, max_memory: str | None) -> dict:
    """Low-memory float64 load and one 512-token forward keeping all logits, with its dgemm floor."""
    import numpy as np

    import minibloom
    from minibloom.bench import peak_rss

    budget = {} if max_memory is None else {"max_memory": max_memory}
    m = minibloom.load(path, dtype="float64", low_memory=True, progress=False, **budget)
    ids = np.random.default_rng(1).integers(5, m.vocab_size, (1, 512))
    t = time.perf_counter()
    logits = m(ids)
    dt = time.perf_counter() - t
    c = m.config
    T, C, V, L = 512, c.hidden_size, m.vocab_size, c.n_layer
    flops = 2 * T * (12 * C * C * L + V * C)  # the forward's matrix products
    a = np.random.default_rng(2).standard_normal((T, 4 * C))
    b = np.random.default_rng(3).standard_normal((4 * C, C))
    best = float("inf")
    for _ in range(3):  # [T, 4C] @ [4C, C]: an MLP product, float64
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    rate = 2 * T * 4 * C * C / best
    return {"forward_s": dt, "shape": list(logits.shape), "dtype": str(logits.dtype),
            "finite": bool(np.isfinite(logits).all()), "peak_rss": peak_rss(), "dgemm_gflops": rate / 1e9,
            "floor_s": flops / rate}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minibloom-7b1"))
    ap.add_argument("--new", type=int, default=8, help="tokens to generate after the first")
    ap.add_argument("--max-memory", default=None, help="the low-memory budget (default: the default budget)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--skip-forward64", action="store_true")
    ap.add_argument("--shape", default="bloom-7b1", help="another shape from minibloom.bench.SHAPES (smoke tests)")
    args = ap.parse_args(argv)
    import numpy as np

    from minibloom.bench import SHAPES, ensure_checkpoint

    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir)) or ".").free
    if not os.path.isdir(args.dir) and free < 16e9:
        print(f"need ~15 GB free for the checkpoint, {free / 1e9:.1f} GB free", file=sys.stderr)
        return 1
    t = time.perf_counter()
    ensure_checkpoint(args.dir, args.shape, dtype=np.float16)
    with open(os.path.join(args.dir, "model.safetensors"), "rb") as f:  # warm the page cache
        while f.read(64 << 20):
            pass
    size = os.path.getsize(os.path.join(args.dir, "model.safetensors"))
    hidden, n_layer, n_head = SHAPES[args.shape]
    print(f"{args.shape} shape (hidden {hidden}, {n_layer} layers, {n_head} heads), float16 file {size / 1e9:.2f} GB "
          f"(ready in {time.perf_counter() - t:.0f} s); float32 would be {2 * size / 1e9:.1f} GB", flush=True)
    try:
        d = child.run(__file__, "decode", path=args.dir, new=args.new, max_memory=args.max_memory)
        print(f"low-memory float32 greedy decode ({d.get('resident', 0)} of {d.get('layers', n_layer)} layers "
              f"resident): load {d['load_s']:.2f} s, 16-token prompt -> first token {d['first_token_s']:.2f} s, then "
              f"{d['decode_tok_s'] or float('nan'):.3f} tok/s; peak RSS {d['peak_rss'] / 1e9:.2f} GB; tokens "
              f"{d['tokens']}", flush=True)
        if not args.skip_forward64:
            f = child.run(__file__, "forward64", path=args.dir, max_memory=args.max_memory)
            print(f"low-memory float64 512-token forward (all logits {f['shape']} {f['dtype']}, finite "
                  f"{f['finite']}): {f['forward_s']:.1f} s; dgemm floor {f['floor_s']:.1f} s (products at "
                  f"{f['dgemm_gflops']:.1f} GFLOP/s) -> {f['forward_s'] / f['floor_s']:.2f}x the floor; peak RSS "
                  f"{f['peak_rss'] / 1e9:.2f} GB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(0 if child.serve({"decode": decode, "forward64": forward64}) else main())
