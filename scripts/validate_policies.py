"""Validate the statistical policies on real engines the calibration never fitted on (issue 26, item 3).

Each engine quantizes the *unquantized* checkpoint itself (optimum-quanto qint8 / qint4, torchao int8 weight-only,
ONNX Runtime ``quantize_dynamic``, CTranslate2 int8); its logits are judged against minibloom float64 on that
checkpoint under the engine's statistical kind, sized for the model. Checkpoints: random BLOOMs of a shape the
calibration does not use (3 x 160, 8 heads) at two weight scales, and ``weights/default``. Prints a Markdown table
(engine, kind, checkpoint, rel, KL mean, limits, margin = limit / measured, verdict); ``--json FILE`` keeps the
figures. Engines that are not installed are skipped with a note.

    python scripts/validate_policies.py [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from minibloom.formats.loading import default_model_path
from minibloom.oracle.calibrate import calibration_mask
from minibloom.oracle.testing import check_logits, policy_for, probe_policy, reference_logits, reference_model


def _hf_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.double().numpy()


def _load_hf(path):
    import transformers

    return transformers.BloomForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()


def quanto(path, ids, mask, weights):
    from optimum import quanto as q

    model = _load_hf(path)
    q.quantize(model, weights=getattr(q, weights))
    q.freeze(model)
    return _hf_logits(model, ids, mask)


def torchao_int8(path, ids, mask):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = _load_hf(path)
    quantize_(model, Int8WeightOnlyConfig())
    return _hf_logits(model, ids, mask)


def ort_dynamic(path, ids, mask, tmp):
    from minibloom.oracle import engines

    f32 = engines.onnx_export(path, os.path.join(tmp, "m.onnx"), hidden_states=False)
    q8 = engines.onnx_quantize_dynamic(f32, os.path.join(tmp, "m.int8.onnx"))
    return engines.onnx_trace(q8, ids, mask)["logits"]


def ct2_int8(path, ids, mask, tmp):
    from minibloom.oracle import engines

    out = engines.ctranslate2_convert(path, os.path.join(tmp, "ct2"), "int8")
    return engines.ctranslate2_trace(out, ids, mask)["logits"]


ENGINES = (  # (name, kind, runner(path, ids, mask, tmp))
    ("optimum-quanto qint8", "int8-weight-only", lambda p, i, m, t: quanto(p, i, m, "qint8")),
    ("optimum-quanto qint4", "int4-weight-only", lambda p, i, m, t: quanto(p, i, m, "qint4")),
    ("torchao int8 weight-only", "int8-weight-only", lambda p, i, m, t: torchao_int8(p, i, m)),
    ("ONNX Runtime dynamic int8", "int8-dynamic", ort_dynamic),
    ("CTranslate2 int8", "int8-dynamic", ct2_int8),
)


def checkpoints(tmp):
    from minibloom.oracle.hf import random_model

    out = []
    for std in (0.08, 0.02):
        path = os.path.join(tmp, f"random-3x160-std{std}")
        random_model(seed=26, std=std, vocab=512, hidden=160, n_layer=3, n_head=8).save_pretrained(path)
        out.append((f"random 3x160 8h std {std}", path))
    out.append(("weights/default", default_model_path()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in checkpoints(tmp):
            model = reference_model(path)
            cfg = model.config
            ids = np.random.default_rng(7).integers(3, cfg.vocab_size, (4, 24))
            mask = calibration_mask(4, 24)
            ref = reference_logits(path, ids, mask)
            for engine, kind, runner in ENGINES:
                work = tempfile.mkdtemp(dir=tmp)
                try:
                    logits = runner(path, ids, mask, work)
                except ImportError as e:
                    print(f"note: {engine} skipped ({e})", file=sys.stderr)
                    continue
                pol = probe_policy(policy_for(kind).at(cfg.n_layer, cfg.hidden_size), path, ids, mask)
                v = check_logits(logits, ref, mask, pol)  # as assert_logits_close judges: sized by this model
                rows.append({"engine": engine, "kind": kind, "checkpoint": name, "rel": v.rel, "kl_mean": v.kl_mean,
                             "kl_max": v.kl_max, "top1": v.top1, "limit_rel": v.policy.rel,
                             "limit_kl_mean": v.policy.kl_mean, "passed": v.passed, "failed": v.failed,
                             "margin": min(v.policy.rel / v.rel, v.policy.kl_mean / max(v.kl_mean, 1e-300))})
                print(f"{engine} on {name}: {'PASS' if v.passed else 'FAIL ' + ','.join(v.failed)} "
                      f"rel {v.rel:.2e}/{v.policy.rel:.2e} KL {v.kl_mean:.2e}/{v.policy.kl_mean:.2e}",
                      file=sys.stderr, flush=True)
    print("| engine | kind | checkpoint | rel | limit rel | KL mean | limit KL mean | top-1 | margin | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['kind']} | {r['checkpoint']} | {r['rel']:.2e} | {r['limit_rel']:.2g} | "
              f"{r['kl_mean']:.2e} | {r['limit_kl_mean']:.2g} | {100 * r['top1']:.1f}% | {r['margin']:.1f}x | "
              f"{'PASS' if r['passed'] else 'FAIL ' + ', '.join(r['failed'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
