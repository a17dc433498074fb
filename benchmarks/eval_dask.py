"""Corpus evaluation on this process and on 1 and 2 local Dask workers, and what the bloom-176b oracle would cost.

    flock /tmp/minibloom-heavy.lock python benchmarks/eval_dask.py [--dir /tmp/minibloom-eval]

1. Writes the default model's held-out text (the last 10% of data/tinyshakespeare.txt, as `minibloom train`
   splits it) and a Q4_0 GGUF of the default model (the KL candidate).
2. Runs ``minibloom perplexity`` (float64) and ``minibloom kl`` (float64 reference, the Q4_0 file in float32) on it,
   each on this process, with ``--workers 1`` and with ``--workers 2``: each a fresh ``python -m minibloom``, timed
   from start to exit; the results must be identical (==) across the three.
3. Measures this machine's float64 matrix-product rate (a NumPy dgemm) and the share of it a float64 forward pass of
   a bloom-560m-wide model (hidden 1024, 16 heads, 4 layers, random weights) reaches, and from both extrapolates the
   float64 perplexity of a 1M-token corpus under bloom-176b (70 layers, hidden 14336, vocab 250880).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare(d: str) -> tuple[str, str]:
    import minibloom
    from minibloom.gguf import convert_hf_to_gguf
    from minibloom.training import read_text, split_text

    os.makedirs(d, exist_ok=True)
    held_out = os.path.join(d, "heldout.txt")
    with open(held_out, "w", encoding="utf-8") as f:
        f.write(split_text(read_text(None), 0.1)[1])  # the bundled corpus's held-out part, as minibloom train splits
    gguf = os.path.join(d, "default-q4_0.gguf")
    convert_hf_to_gguf(minibloom.load().path, gguf, "q4_0")  # always afresh: the default model may have changed
    return held_out, gguf


def cli(*argv: str) -> tuple[dict, float]:
    """(the JSON line, wall seconds from start to exit) of ``python -m minibloom ARGV --json`` of this checkout."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "minibloom", *argv, "--json", "--no-progress"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"minibloom {' '.join(argv)} failed:\n{r.stderr}")
    return json.loads(r.stdout.splitlines()[-1]), wall


def dgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    import numpy as np

    a, b = np.random.default_rng(0).standard_normal((2, n, n))
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def forward_efficiency(d: str, dgemm: float, tokens: int = 1024) -> tuple[float, float]:
    """(seconds, share of the dgemm rate) of a float64 forward pass of ``tokens`` through a random hidden-1024 model,
    counting 2 x (its weight-matrix parameters, the head included) FLOPs per token and nothing for attention."""
    import numpy as np

    import minibloom
    from minibloom.formats.weights import write_random_checkpoint

    cfg = minibloom.BloomConfig(vocab_size=4096, hidden_size=1024, n_layer=4, n_head=16)
    path = os.path.join(d, "hidden1024")
    if not os.path.exists(os.path.join(path, "config.json")):
        write_random_checkpoint(path, cfg, 4096, np.float32, seed=1, progress=False)
    m = minibloom.load(path, dtype="float64")
    ids = np.random.default_rng(0).integers(0, 4096, (1, tokens))
    m(ids)
    best = min(_timed(lambda: m(ids)) for _ in range(3))
    C = cfg.hidden_size
    matrix_params = cfg.n_layer * 12 * C * C + 4096 * C
    return best, 2 * matrix_params * tokens / best / 1e9 / dgemm


def estimate_176b(gflops: float, efficiency: float, corpus: int = 1_000_000, context: int = 2048,
                  stride: int = 1024) -> dict:
    """Machine-hours of the float64 perplexity of ``corpus`` tokens under bloom-176b at ``gflops`` x ``efficiency``
    per machine: every window runs 2 x params FLOPs per token it holds (attention and the widening left out)."""
    import minibloom

    cfg = minibloom.BloomConfig(vocab_size=250880, hidden_size=14336, n_layer=70, n_head=112)
    params = cfg.n_params(250880)
    forward_tokens = corpus * context / stride  # each token runs in context / stride windows
    flops = 2 * params * forward_tokens
    hours = flops / (gflops * efficiency * 1e9) / 3600
    return {"params": params, "forward_tokens": forward_tokens, "flops": flops, "machine_hours": hours,
            "windows": corpus / stride, "hours_per_window": hours / (corpus / stride)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minibloom-eval"),
                   help="where the held-out text, the GGUF candidate and the hidden-1024 model go")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    args = p.parse_args(argv)
    held_out, gguf = prepare(args.dir)
    win = ["--context", str(args.context), "--stride", str(args.stride)]
    runs = {"perplexity": ["perplexity", held_out, "--dtype", "float64", *win],
            "kl": ["kl", held_out, "--dtype", "float64", "--candidate", gguf, "--candidate-dtype", "float32", *win]}
    modes = {"this process": [], "--workers 1": ["--workers", "1"], "--workers 2": ["--workers", "2"]}
    print(f"{'command':<11} {'where':<13} {'wall s':>7} {'in-call s':>9} {'ms/token':>8}  result")
    per_token = {}
    for name, argv_ in runs.items():
        results = {}
        for mode, extra in modes.items():
            r, wall = cli(*argv_, *extra)
            results[mode] = r
            figure = (f"perplexity {r['perplexity']!r}, nll {r['nll']!r}, {r['tokens']} tokens"
                      if name == "perplexity" else
                      f"mean KL {r['kl_mean']!r}, max {r['kl_max']!r}, same top {r['top1']!r}, "
                      f"PPL(ref) {r['perplexity']!r}, PPL(cand) {r['perplexity_candidate']!r}")
            forward = r["input_tokens"] * args.context / args.stride  # tokens through the model, all windows
            per_token[name, mode] = r["seconds"] / forward
            print(f"{name:<11} {mode:<13} {wall:7.2f} {r['seconds']:9.2f} {1e3 * per_token[name, mode]:8.3f}  "
                  f"{figure}", flush=True)
        strip = [{k: v for k, v in r.items() if k not in ("seconds", "workers")} for r in results.values()]
        print(f"{name}: identical on this process, 1 and 2 workers: {all(s == strip[0] for s in strip)}")
    gflops = dgemm_gflops()
    seconds, eff = forward_efficiency(args.dir, gflops)
    print(f"dgemm 2048^3 float64: {gflops:.1f} GFLOP/s; hidden-1024 float64 forward of 1024 tokens: {seconds:.3f} s, "
          f"{100 * eff:.1f}% of the dgemm rate")
    for context, stride in ((2048, 1024), (2048, 2048)):
        e = estimate_176b(gflops, eff, context=context, stride=stride)
        print(f"bloom-176b float64, 1M tokens, context {context} stride {stride}: {e['params'] / 1e9:.1f}B params, "
              f"{e['forward_tokens'] / 1e6:.1f}M forward tokens, {e['flops']:.3g} FLOPs, {e['machine_hours']:,.0f} "
              f"machine-hours at {gflops * eff:.1f} GFLOP/s per machine ({e['windows']:,.0f} windows, "
              f"{e['hours_per_window']:.2f} h each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
