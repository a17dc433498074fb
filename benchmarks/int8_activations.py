"""Measure real engines that quantize activations (CTranslate2 int8, ONNX Runtime quantize_dynamic) against the
same-weights float64 reference with their activation rounding emulated (``minibloom.oracle.activations``), and the
float compute of the same weights against the plain same-weights reference: the evidence for ``int8-activations``.

    python -m benchmarks.int8_activations --out /tmp/int8act            # both engines, every case
    python -m benchmarks.int8_activations --out /tmp/int8act --only ct2 --env ONEDNN_MAX_CPU_ISA=AVX2 \\
        --scheme int8-per-row-sat16                                       # CTranslate2 as on a CPU without VNNI

Cases: random checkpoints (3 layers, hidden 64 / 96 / 160, 8 and 12 heads, every parameter random, weight std 0.02
and 0.08) and ``weights/default``; a batch with full, left-padded, right-padded and holed rows. Each line printed is
one JSON record: rel, KL mean, KL max, top-1, the median and 90th percentile of the per-position relative error, and
the figures per unit of scale sqrt(n_layer * hidden_size) (KL per scale squared), next to int8-dynamic's limits.
CTranslate2 reads ``CT2_FORCE_CPU_ISA`` (and oneDNN ``ONEDNN_MAX_CPU_ISA``) when it is imported: each ``--env`` set
runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

SHAPES = ((3, 64, 8), (3, 96, 12), (3, 96, 8), (3, 160, 8))
STDS = (0.02, 0.08)


def cases(root: str) -> list[tuple[str, str]]:
    from minibloom.config import BloomConfig
    from minibloom.formats.weights import write_checkpoint
    from minibloom.oracle.calibrate import random_checkpoint
    from minibloom.paths import weights_dir

    out = []
    for L, C, H in SHAPES:
        for std in STDS:
            name = f"r{L}x{C}h{H}s{std}"
            d = os.path.join(root, name, "ckpt")
            if not os.path.isfile(os.path.join(d, "config.json")):
                cfg = BloomConfig(vocab_size=256, hidden_size=C, n_layer=L, n_head=H)
                write_checkpoint(d, cfg, random_checkpoint(cfg, 256, C + H, std))
            out.append((name, d))
    return out + [("default", os.path.join(weights_dir(), "default"))]


def inputs(ckpt: str) -> tuple[np.ndarray, np.ndarray]:
    from minibloom.oracle.calibrate import calibration_mask

    with open(os.path.join(ckpt, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    return np.random.default_rng(7).integers(0, vocab, (4, 24)), calibration_mask(4, 24)


def reference(ckpt: str, matrices: dict, ids, mask, scheme: str | None):
    """float64 logits of the checkpoint with the engine's tensors in place, activations rounded as ``scheme``."""
    from minibloom import model as M
    from minibloom.bloom import load
    from minibloom.formats.weights import flatten, nest
    from minibloom.oracle.activations import activation_primitives

    model = load(ckpt, dtype="float64")
    flat = dict(flatten(model.params))
    for k, v in matrices.items():
        if not (k == "lm_head.weight" and np.array_equal(v, matrices.get("word_embeddings.weight"))):
            flat[k] = v
    ops = M.REFERENCE if scheme is None else activation_primitives(scheme)
    return np.asarray(M.forward(nest(flat), ids, mask, model.config, primitives=ops)), model.config


def figures(cand, ref, mask, cfg) -> dict:
    from minibloom.oracle.testing import logit_metrics, policy_for, scale

    m = logit_metrics(cand, ref, mask)
    real = mask.astype(bool)
    pos = np.max(np.abs(np.asarray(cand, np.float64) - ref), axis=-1)[real] / np.max(np.abs(ref[real]))
    s = scale(cfg.n_layer, cfg.hidden_size)
    dyn = policy_for("int8-dynamic", size=(cfg.n_layer, cfg.hidden_size))
    return {"L": cfg.n_layer, "C": cfg.hidden_size, "rel": m["rel"], "kl_mean": m["kl_mean"], "kl_max": m["kl_max"],
            "top1": m["top1"], "rel_p50": float(np.median(pos)), "rel_p90": float(np.quantile(pos, 0.9)),
            "rel/s": m["rel"] / s, "kl_mean/s2": m["kl_mean"] / s**2, "kl_max/s2": m["kl_max"] / s**2,
            "int8_dynamic_limits": [dyn.rel, dyn.kl_mean, dyn.kl_max]}


def run_ct2(root: str, tag: str, scheme: str) -> None:
    from minibloom.engines import ctranslate2_convert, ctranslate2_trace
    from minibloom.oracle.read_ct2 import read

    for name, ckpt in cases(root):
        ids, mask = inputs(ckpt)
        for q in ("int8", "int8_float32", "int8_float16"):
            d = os.path.join(root, name, f"ct2_{q}")
            if not os.path.isfile(os.path.join(d, "model.bin")):
                ctranslate2_convert(ckpt, d, q)
            ew = read(d)
            for compute, sch in (("float32", None), ("int8_float32", scheme)):
                cand = ctranslate2_trace(d, ids, mask, compute_type=compute, intra_threads=1)["logits"]
                ref, cfg = reference(ckpt, ew.matrices, ids, mask, sch)
                print(json.dumps({"engine": "ctranslate2", "env": tag, "case": name, "weights": q,
                                  "compute": compute, "emulation": sch, **figures(cand, ref, mask, cfg)}), flush=True)


def run_ort(root: str) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from minibloom.engines import onnx_export, onnx_quantize_dynamic, onnx_trace
    from minibloom.oracle.read_onnx import read

    for name, ckpt in cases(root):
        ids, mask = inputs(ckpt)
        d = os.path.join(root, name)
        fp32 = os.path.join(d, "fp32.onnx")
        if not os.path.isfile(fp32):
            onnx_export(ckpt, fp32, hidden_states=False)
        paths = {"dynamic": onnx_quantize_dynamic(fp32, os.path.join(d, "dyn.onnx")),
                 "dynamic per-channel": onnx_quantize_dynamic(fp32, os.path.join(d, "dyn_pc.onnx"), per_channel=True)}
        nbits = os.path.join(d, "nbits.onnx")
        quantizer = MatMulNBitsQuantizer(onnx.load(fp32), block_size=32, is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(nbits)
        paths["MatMulNBits int4"] = nbits
        for form, path in paths.items():
            ew = read(path)
            cand = onnx_trace(path, ids, mask, kind="int8-activations", threads=1)["logits"]
            ref, cfg = reference(ckpt, ew.matrices, ids, mask, ew.activations)
            print(json.dumps({"engine": "onnxruntime", "env": "", "case": name, "weights": form,
                              "compute": ew.activations or "float32", "emulation": ew.activations,
                              **figures(cand, ref, mask, cfg)}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the checkpoints and converted models")
    p.add_argument("--only", choices=("ct2", "ort"), help="one engine (default: both)")
    p.add_argument("--env", action="append", default=[], metavar="VAR=VALUE",
                   help="environment for the CTranslate2 run (a fresh process), e.g. CT2_FORCE_CPU_ISA=AVX2")
    p.add_argument("--scheme", default="int8-per-row", help="the emulation for CTranslate2's int8 compute")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tag = " ".join(args.env) or "default"
    if args.only in (None, "ct2"):
        if args.child or not args.env:
            run_ct2(args.out, tag, args.scheme)
        else:
            env = dict(os.environ, **dict(e.split("=", 1) for e in args.env))
            cmd = [sys.executable, "-m", "benchmarks.int8_activations", "--out", args.out, "--only", "ct2", "--scheme",
                   args.scheme, "--child"]
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            subprocess.run(cmd + [f"--env={e}" for e in args.env], env=env, check=True, cwd=root)
    if args.only in (None, "ort") and not args.child:
        run_ort(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
