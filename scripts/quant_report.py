"""The quantization error table: every GGUF type and bitsandbytes 4-bit variant of one random BLOOM checkpoint.

    flock /tmp/minibloom-big.lock python scripts/quant_report.py            # bloom-560m shape (~10-20 min, ~8 GB)
    python scripts/quant_report.py --shape tiny                             # a 2-layer model, seconds

Builds a random checkpoint (transformers, every parameter randomized, float32), writes it as GGUF F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (minibloom.gguf.convert_hf_to_gguf, llama.cpp's layout) and as bitsandbytes NF4/FP4
with and without double quantization (transformers + bitsandbytes on CPU, save_pretrained), loads each with
minibloom and compares it with the float32 source on random prompts (minibloom.oracle.compare): max relative logit error
against minibloom on the source and against transformers on the source, mean and max KL(source || quantized) in
float64, top-1 agreement. K-quants (Q2_K..Q6_K) cannot be produced by the gguf package (it only dequantizes them);
their decoding is checked block by block in tests/test_gguf.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time


SHAPES = {"560m": {"vocab": 250880, "hidden": 1024, "n_layer": 24, "n_head": 16},
          "tiny": {"vocab": 320, "hidden": 64, "n_layer": 2, "n_head": 4}}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BNB_VARIANTS = (("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="560m")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="std of the random weight matrices (BLOOM's init: 0.02)")
    ap.add_argument("--workdir", default=None, help="where to write the files (default: a temporary directory)")
    ap.add_argument("--skip-bnb", action="store_true")
    args = ap.parse_args(argv)

    import torch

    import minibloom
    from minibloom.oracle.compare import compare_models, random_prompts
    from minibloom.oracle.hf import random_model
    from minibloom.gguf import convert_hf_to_gguf
    from minibloom.testing import rel_error

    work = args.workdir or tempfile.mkdtemp(prefix="minibloom-quant-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "source")
    shape = SHAPES[args.shape]
    t0 = time.time()
    hf = random_model(seed=args.seed, std=args.std, **shape)
    hf.save_pretrained(src)
    ids = random_prompts(shape["vocab"], args.prompts, args.length, seed=args.seed + 1)
    with torch.no_grad():
        hf_logits = [hf(torch.as_tensor(row[None])).logits[0].numpy() for row in ids]
    del hf
    gc.collect()
    ref = minibloom.load(src)
    print(f"# {args.shape}-shape random BLOOM (std {args.std}), {args.prompts} prompts x {args.length} random ids; "
          f"source built in {time.time() - t0:.0f}s; minibloom fp32 vs transformers fp32 on the source: "
          f"{max(rel_error(ref(row[None])[0], h) for row, h in zip(ids, hf_logits)):.2e}", flush=True)
    header = (f"| {'variant':<18} | {'size MB':>8} | {'max rel vs src (minibloom)':>26} | "
              f"{'max rel vs src (HF)':>19} | {'mean KL (nats)':>14} | {'max KL':>9} | {'top-1':>7} |")
    rows = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    print(header, flush=True)

    def report(name: str, path: str, size: int) -> None:
        t = time.time()
        cand = minibloom.load(path)
        r = compare_models(ref, cand, ids)
        vs_hf = max(rel_error(cand(row[None])[0], h) for row, h in zip(ids, hf_logits))
        line = (f"| {name:<18} | {size / 2**20:>8.1f} | {r.max_rel:>26.3e} | {vs_hf:>19.3e} | {r.kl_mean:>14.3e} | "
                f"{r.kl_max:>9.2e} | {100 * r.top1:>6.2f}% |")
        rows.append(line)
        print(line + f"  ({time.time() - t:.0f}s)", flush=True)
        del cand
        gc.collect()

    for qtype in GGUF_TYPES:
        path = convert_hf_to_gguf(src, os.path.join(work, f"model-{qtype}.gguf"), qtype)
        report(f"GGUF {qtype.upper()}", path, os.path.getsize(path))
        os.remove(path)

    if not args.skip_bnb:
        import transformers

        for qtype, double in BNB_VARIANTS:
            d = os.path.join(work, f"bnb-{qtype}-{'dq' if double else 'plain'}")
            cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qtype,
                                                  bnb_4bit_use_double_quant=double,
                                                  bnb_4bit_compute_dtype=torch.float32)
            q = transformers.BloomForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)
            q.save_pretrained(d)
            del q
            gc.collect()
            report(f"bnb {qtype}{' +dq' if double else ''}", d, os.path.getsize(os.path.join(d, "model.safetensors")))
            shutil.rmtree(d)

    print("\n" + "\n".join(rows))
    print("\nK-quants (Q2_K..Q6_K): not producible with the gguf package (dequantize only); their decoding is "
          "checked against a per-block decoder in tests/test_gguf.py::test_k_quant_*.")
    if not args.workdir:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
