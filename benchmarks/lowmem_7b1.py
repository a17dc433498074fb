"""Low-memory mode at scale: a random bloom-7b1-shaped float16 checkpoint (~14 GB) on a 24 GB machine.

    python benchmarks/lowmem_7b1.py --dir /tmp/minibloom-7b1 [--new 4] [--keep]

Writes the checkpoint tensor by tensor (``minibloom.bench.ensure_checkpoint``; float32 it would be 28 GB, more than
RAM),
then, each in a fresh process so that peak RSS (VmHWM) belongs to that run alone:

1. ``load(..., low_memory=True)`` in float32 and greedy decode: a 16-token prompt and ``--new`` tokens;
2. ``load(..., dtype="float64", low_memory=True)`` and one 512-token forward keeping all logits (the oracle mode).

Prints tokens/s, seconds and peak RSS of each, and deletes the checkpoint unless ``--keep``. The low-memory maths is
the normal mode's (``tests/test_lowmem.py`` holds them equal on small checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

DECODE = """
import json, sys, time, numpy as np
from minibloom.bench import peak_rss
import minibloom
t = time.perf_counter()
m = minibloom.load({path!r}, low_memory=True, progress=False)
load_s = time.perf_counter() - t
ids = np.random.default_rng(0).integers(5, m.vocab_size, (1, 16))
times = []
out = m.generate(ids, max_new_tokens={new}, eos_token_id=[], callback=lambda nxt: times.append(time.perf_counter()))
t0 = times[0]
print(json.dumps({{"load_s": load_s, "first_token_s": t0 - t - load_s, "tokens": out[0, 16:].tolist(),
                  "decode_tok_s": ({new} - 1) / (times[-1] - t0) if {new} > 1 else None, "peak_rss": peak_rss()}}))
"""

FORWARD64 = """
import json, sys, time, numpy as np
from minibloom.bench import peak_rss
import minibloom
m = minibloom.load({path!r}, dtype="float64", low_memory=True, progress=False)
ids = np.random.default_rng(1).integers(5, m.vocab_size, (1, 512))
t = time.perf_counter()
logits = m(ids)
dt = time.perf_counter() - t
print(json.dumps({{"forward_s": dt, "shape": list(logits.shape), "dtype": str(logits.dtype),
                  "finite": bool(np.isfinite(logits).all()), "peak_rss": peak_rss()}}))
"""


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minibloom-7b1"))
    ap.add_argument("--new", type=int, default=4, help="tokens to generate (each re-reads all 14 GB)")
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
    size = os.path.getsize(os.path.join(args.dir, "model.safetensors"))
    hidden, n_layer, n_head = SHAPES[args.shape]
    print(f"{args.shape} shape (hidden {hidden}, {n_layer} layers, {n_head} heads), float16 file {size / 1e9:.2f} GB "
          f"(ready in {time.perf_counter() - t:.0f} s); float32 would be {2 * size / 1e9:.1f} GB", flush=True)
    try:
        d = _run(DECODE.format(path=args.dir, new=args.new))
        print(f"low-memory float32 greedy decode: load {d['load_s']:.2f} s, 16-token prompt -> first token "
              f"{d['first_token_s']:.1f} s, then {d['decode_tok_s'] or float('nan'):.3f} tok/s; "
              f"peak RSS {d['peak_rss'] / 1e9:.2f} GB; tokens {d['tokens']}", flush=True)
        if not args.skip_forward64:
            f = _run(FORWARD64.format(path=args.dir))
            print(f"low-memory float64 512-token forward (all logits {f['shape']} {f['dtype']}, finite "
                  f"{f['finite']}): {f['forward_s']:.1f} s; peak RSS {f['peak_rss'] / 1e9:.2f} GB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
