"""The bloom-176b shape as a float64 oracle on one machine: a two-layer slice (hidden 14336, 112 heads, vocab 250880;
~17 GB of bfloat16) in low-memory mode.

    flock /tmp/minibloom-heavy.lock python benchmarks/slice_176b.py [--dir /tmp/minibloom-176b-slice]
        [--tokens 32] [--max-memory 6GB] [--keep]

Writes the slice tensor by tensor (``minibloom.bench.ensure_checkpoint``, bfloat16 as the released model is), then,
each in a fresh process (peak RSS per run): a float64 forward of ``--tokens`` tokens keeping all logits, with
``max_memory`` as given, timing each layer and the output head; the same forward in float32. Prints the per-layer
time and its extrapolation to the 70 layers of bloom-176b, the peak RSS of each run, and the float64 logits against
the float32 run's under minibloom's float32 policy at this size (``minibloom.testing.FP32``). Deletes the checkpoint
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import child


def forward_slice(path: str, dtype: str, budget: str, tokens: int, out: str) -> dict:
    """Load with ``budget`` and one ``tokens``-token forward, stamping when each layer is asked for; the head alone;
    the logits saved to ``out``."""
    import numpy as np

    import minibloom
    from minibloom.bench import peak_rss

    m = minibloom.load(path, dtype=dtype, max_memory=budget, progress=False)
    layers, stamps = m.params["h"], []

    class Timed(type(layers)):  # stamps the moment the forward pass asks for each layer
        def __getitem__(self, i):
            stamps.append(time.perf_counter())
            return layers[i]

    m.params["h"] = Timed(layers.layers, layers.resident)
    ids = np.random.default_rng(1).integers(5, m.vocab_size, (1, tokens))
    t = time.perf_counter()
    logits = m(ids)
    total = time.perf_counter() - t
    x = np.random.default_rng(2).standard_normal((tokens, m.config.hidden_size)).astype(logits.dtype)
    t = time.perf_counter()
    m.primitives.head(x[None], m.params["word_embeddings"]["weight"])
    head = time.perf_counter() - t
    np.save(out, logits)
    return {"total_s": total, "head_s": head, "stamps": [s - stamps[0] for s in stamps], "peak_rss": peak_rss()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minibloom-176b-slice"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-memory", default="6GB")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--shape", default="bloom-176b", help="another shape from minibloom.bench.SHAPES (smoke tests)")
    args = ap.parse_args(argv)
    import numpy as np

    from minibloom.bench import SHAPES, VOCAB, ensure_checkpoint
    from minibloom.testing import FP32

    hidden, full_layers, heads = SHAPES[args.shape]
    need = 2 * (VOCAB * hidden + 2 * 12 * hidden * hidden) + (1 << 30)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir)) or ".").free
    if not os.path.isdir(args.dir) and free < need:
        print(f"need ~{need / 1e9:.1f} GB free for the slice, {free / 1e9:.1f} GB free", file=sys.stderr)
        return 1
    t = time.perf_counter()
    ensure_checkpoint(args.dir, args.shape, dtype="bfloat16", n_layer=2)
    size = os.path.getsize(os.path.join(args.dir, "model.safetensors"))
    print(f"{args.shape} shape, 2 of {full_layers} layers (hidden {hidden}, {heads} heads, vocab {VOCAB}): bfloat16 "
          f"file {size / 1e9:.2f} GB (ready in {time.perf_counter() - t:.0f} s)", flush=True)
    try:
        res = {}
        for dtype in ("float64", "float32"):
            out = os.path.join(args.dir, f"logits-{dtype}.npy")
            d = res[dtype] = child.run(__file__, "forward_slice", path=args.dir, dtype=dtype, budget=args.max_memory,
                                       tokens=args.tokens, out=out)
            d["logits"] = np.load(out)
            layer = d["stamps"][1]
            rest = d["total_s"] - layer  # embedding gather + LayerNorm before stamp 0 are tiny; layer 1 + head after
            print(f"{dtype} forward of {args.tokens} tokens (all logits), max_memory={args.max_memory}: "
                  f"{d['total_s']:.1f} s; layer 0 {layer:.1f} s, layer 1 + final LayerNorm + head {rest:.1f} s "
                  f"(the head alone {d['head_s']:.1f} s); peak RSS {d['peak_rss'] / 1e9:.2f} GB", flush=True)
        d64 = res["float64"]
        layer = d64["stamps"][1]
        full = full_layers * layer + d64["head_s"]
        print(f"float64 extrapolated to {full_layers} layers: {full_layers} x {layer:.1f} s + head "
              f"{d64['head_s']:.1f} s = {full / 60:.1f} min for {args.tokens} tokens "
              f"({full / args.tokens:.1f} s per token)", flush=True)
        a, b = d64["logits"], res["float32"]["logits"].astype(np.float64)
        rel = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
        lim = FP32.at(2, hidden).rel
        print(f"float32 logits vs float64: max|diff| / max|float64| = {rel:.2e} (float32 policy at this size: "
              f"{lim:.2e}) -> {'PASS' if rel <= lim else 'FAIL'}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(0 if child.serve({"forward_slice": forward_slice}) else main())
