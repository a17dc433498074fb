"""``minibloom verify CANDIDATE.npz --model M``: judge an engine's dumped logits (or full trace) against minibloom."""

from __future__ import annotations
from . import add_model_option


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="judge another engine's logits (a trace .npz) against minibloom float64",
                       description="Run minibloom in float64 on the input_ids and attention_mask stored in "
                                   "CANDIDATE.npz (a minibloom trace; logits alone are enough) and judge the "
                                   "candidate's logits (and hidden states, if present) under the policy of its kind. "
                                   "--model is the unquantized checkpoint for engines that cast or quantized the "
                                   "weights themselves (float16, bfloat16, int8 / int4 kinds), the same GGUF / "
                                   "bitsandbytes file for ports of a quantized file, or the engine's own weights "
                                   "written by `minibloom dequantize` (then --kind float32 / float16 / bfloat16, or "
                                   "int8-activations). The limits are sized for --model's depth and width, never "
                                   "for the candidate's meta. Exit status: 0 pass, 1 mismatch, 2 cannot compare.")
    p.add_argument("candidate", metavar="CANDIDATE.npz", help="the engine's trace (minibloom.trace format)")
    add_model_option(p, required=True,
                     help="the checkpoint the reference runs: directory, .safetensors / .gguf file, name under "
                          "weights/, or hub repo id")
    p.add_argument("--kind", help="the candidate's implementation kind (default: its meta 'kind' or 'dtype'; "
                                  "an unknown one is an error): float32, float32-gelu-table, float16, bfloat16, "
                                  "int8-weight-only, int4-weight-only (= int4), int8-dynamic (= int8), "
                                  "int8-activations, q8_0, q4_0, q4_k, nf4")
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the verdict line")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..oracle.trace import verify_trace

    report = verify_trace(args.candidate, args.model, kind=args.kind)
    if args.json:
        v = report.verdict
        out = {"passed": report.passed, "policy": report.policy.kind,
               "first_divergence": None if report.first_divergence is None else report.first_divergence.key}
        if v is not None:
            out.update(rel=v.rel, kl_mean=v.kl_mean, kl_max=v.kl_max, top1=v.top1, failed=v.failed,
                       worst={"row": v.worst[0], "position": v.worst[1], "token": v.worst[2],
                              "input_id": v.input_id, "actual": v.worst_values[0], "reference": v.worst_values[1]})
        print(json.dumps(out))
    else:
        print(report.table().splitlines()[-1] if args.quiet else report.table())
    return 0 if report.passed else 1
