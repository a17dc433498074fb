"""Measure the errors behind minibloom.testing's tolerance policy (FP16, BF16, QUANTIZED).

For random BLOOM checkpoints (every parameter randomized, tests/factory.py) it reports max|x - ref| / max|ref| of the
logits, where ref is minibloom float64, for:
  - transformers float32, float16 and bfloat16 (the weights rounded to that dtype, activations too);
  - minibloom float64 with the weight matrices (and embeddings) quantized to GGUF Q8_0 / Q4_0 and back with the
    ``gguf`` package, against the unquantized model ("q8_0 vs orig", "q4_0 vs orig"): what quantization itself
    costs; large and model dependent (random checkpoints amplify it), so no tolerance is built on it;
  - a correct quantized kernel against minibloom on the *same* quantized weights ("q4_0 kernel"): the weights are
    exact, but llama.cpp's CPU dot products quantize the activations to Q8_0 blocks first, which is simulated by
    rounding every linear layer's input through Q8_0. This is what ``QUANTIZED`` bounds.

    python scripts/measure_tolerances.py                 # small shapes, ~1 minute
    python scripts/measure_tolerances.py --model weights/default   # a trained checkpoint
    flock /tmp/minibloom-big.lock python scripts/measure_tolerances.py --big   # adds the bloom-560m shape (~6 GB)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

SHAPES = {
    "tiny 3x64/4h": dict(hidden=64, n_head=4, n_layer=3),
    "small 6x128/8h": dict(hidden=128, n_head=8, n_layer=6),
    "mid 12x256/16h": dict(hidden=256, n_head=16, n_layer=12, vocab=4096),
}
BIG = {"560m shape 24x1024/16h": dict(hidden=1024, n_head=16, n_layer=24, vocab=250880)}


def quantized_copy(params, qtype):
    """params with every 2-D weight (embeddings and linear layers) round-tripped through a GGUF block format."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    t = getattr(T, qtype)

    def q(tree, name=""):
        if isinstance(tree, dict):
            return {k: q(v, k) for k, v in tree.items()}
        if isinstance(tree, list):
            return [q(v) for v in tree]
        if tree.ndim == 2:
            w32 = np.asarray(tree, np.float32)
            return dequantize(quantize(w32, t), t).astype(np.float64)
        return tree

    return q(params)


@contextlib.contextmanager
def q8_activations():
    """Round the input of every linear layer through GGUF Q8_0 blocks of 32 (llama.cpp's vec_dot_*_q8_0 path)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    import minibloom.model as M

    plain = M.linear

    def linear(x, weight, bias, tp=1):
        xq = dequantize(quantize(np.asarray(x, np.float32), T.Q8_0), T.Q8_0).astype(x.dtype)
        return plain(xq, weight, bias, tp)

    M.linear = linear
    try:
        yield
    finally:
        M.linear = plain


def measure(label, cfg, seed, seq, rows, std=0.08, checkpoint=None):
    import torch
    import transformers

    import minibloom
    from factory import make_model, random_ids, save
    from minibloom.testing import rel_error

    if checkpoint:
        model = transformers.BloomForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    else:
        model = make_model(seed=seed, std=std, **cfg)
    with tempfile.TemporaryDirectory() as d:
        save(model, d)
        vocab = model.config.vocab_size
        ids = random_ids(vocab, (rows, seq), seed=seed + 100)
        ref_model = minibloom.load(d, dtype="float64")
        ref = ref_model(ids)
        out = {}
        for name, q in (("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
            qm = minibloom.Bloom(ref_model.config, quantized_copy(ref_model.params, q), "float64")
            qref = qm(ids)
            out[f"{name} vs orig"] = rel_error(qref, ref)
            with q8_activations():
                out[f"{name} kernel"] = rel_error(qm(ids), qref)
            del qm
            gc.collect()
        del ref_model
        gc.collect()
    for name, dt in (("hf fp32", torch.float32), ("hf fp16", torch.float16), ("hf bf16", torch.bfloat16)):
        model.to(dt)
        with torch.no_grad():
            logits = model(torch.as_tensor(ids)).logits
        out[name] = rel_error(logits.double().numpy(), ref)
        del logits
        gc.collect()
    print(f"{label:<26} seed {seed}: " + "  ".join(f"{k} {v:.2e}" for k, v in out.items()), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", action="store_true", help="also the bloom-560m shape (run under flock)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--std", type=float, default=0.08,
                    help="std of the random weight matrices (0.08: tests/factory.py default, deep shapes amplify "
                         "errors; 0.02: BLOOM's initializer_range)")
    ap.add_argument("--model", help="measure this checkpoint directory (e.g. weights/default) instead")
    args = ap.parse_args(argv)
    if args.model:
        measure(args.model, {}, 1, seq=32, rows=2, checkpoint=args.model)
        return
    shapes = {**SHAPES, **(BIG if args.big else {})}
    worst: dict[str, float] = {}
    for label, cfg in shapes.items():
        big = cfg["hidden"] >= 1024
        for seed in range(1, (1 if big else args.seeds) + 1):
            out = measure(label, cfg, seed, seq=16 if big else 32, rows=1 if big else 2, std=args.std)
            for k, v in out.items():
                worst[k] = max(worst.get(k, 0.0), v)
    print(f"worst (std {args.std}): " + "  ".join(f"{k} {v:.2e}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
