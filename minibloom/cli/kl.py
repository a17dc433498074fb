"""``minibloom kl FILE --model REF --candidate CAND``: per-token KL(P_ref || P_cand), top-1 agreement and their
distribution over a text file, as llama.cpp's ``llama-perplexity --kl-divergence`` reports them
(``minibloom.evaluate.kl``); the candidate is another model or logits an external engine wrote."""

from __future__ import annotations

import argparse
import json

from .perplexity import add_eval_options, check_eval_args, eval_kwargs, summary, table

EXAMPLES = """\
examples:
  minibloom kl story.txt --model weights/default --candidate default-q8_0.gguf --context 256 --stride 128
  minibloom kl story.txt --dtype float64 --save-logits ref.npz --context 256     the reference's logits only
  minibloom kl story.txt --candidate engine.npy --context 256                    logits from another engine
  minibloom kl story.txt --candidate default-q8_0.gguf --context 256 --workers 2 --json

A logits file (.npy, or .npz with 'logits' and optionally 'input_ids' and 'windows') holds one row of logits [V]
per scored token, in window order; minibloom.evaluate.windows(n, C, S) lists the windows, --save-logits writes one.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("kl", help="KL divergence and top-1 agreement of a candidate vs a reference over a text file",
                       description="Run the reference (--model) and the candidate over the windows of 'minibloom "
                                   "perplexity' and report, per scored token, KL(P_ref || P_cand) in float64: mean, "
                                   "max, percentiles, min; the share of tokens where both rank the same token first; "
                                   "both perplexities and Δp of the actual next token.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(p)
    p.add_argument("--candidate", metavar="CAND", default=None,
                   help="the model compared with the reference (anything --model takes), or a .npy/.npz logits file")
    p.add_argument("--candidate-dtype", choices=("float32", "float64"), default=None,
                   help="compute dtype of a candidate model (default: --dtype)")
    p.add_argument("--save-logits", metavar="PATH.npz", default=None,
                   help="write the reference's logits for the scored tokens (a logits file, the format --candidate "
                        "reads)")
    p.set_defaults(func=run)


def report(r: dict, file: str) -> list[tuple[str, str]]:
    """llama.cpp's --kl-divergence summary, as (name, value) rows."""
    rows = summary(r, file)
    rows[0] = ("reference", rows[0][1])
    rows[-1] = ("PPL(ref)", rows[-1][1])
    if r.get("saved_logits"):
        rows.append(("saved logits", r["saved_logits"]))
    if "kl_mean" not in r:
        return rows
    rows += [("candidate", r["candidate"]), ("PPL(cand)", f"{r['perplexity_candidate']:.6f}"),
             ("ln(PPL(cand)/PPL(ref))", f"{r['ln_ppl_ratio']:.6e}"),
             ("mean KL", f"{r['kl_mean']:.6e} ± {r['kl_mean_stderr']:.2e} nats"),
             ("max KL", f"{r['kl_max']:.6e}")]
    rows += [(f"{q}% KL" if q != "50.0" else "median KL", f"{v:.6e}") for q, v in r["kl_percentiles"].items()]
    rows += [("min KL", f"{r['kl_min']:.6e}"),
             ("same top p", f"{100 * r['top1']:.3f} ± {100 * r['top1_stderr']:.3f} %"),
             ("mean Δp", f"{100 * r['delta_p']['mean']:.4f} %, rms {100 * r['delta_p']['rms']:.4f} %")]
    return rows


def run(args) -> int:
    from ..errors import MinibloomError
    from ..evaluate import is_logits_file, kl
    from ..textfile import read_text
    from . import output_path

    if args.candidate is None and args.save_logits is None:
        raise MinibloomError("give the candidate with --candidate CAND (a model or a logits file), or only save the "
                             "reference's logits with --save-logits PATH.npz")
    if args.candidate_dtype is not None and is_logits_file(args.candidate):
        raise MinibloomError("--candidate-dtype: the candidate is a logits file, not a model")
    if args.save_logits is not None:
        output_path(args.save_logits, "--save-logits")
    check_eval_args(args)
    text = read_text(args.file)
    r = kl(args.model, args.candidate, text, candidate_dtype=args.candidate_dtype, save_logits_to=args.save_logits,
           **eval_kwargs(args))
    if args.json:
        print(json.dumps(r))
    else:
        print(table(report(r, args.file) + [("time", f"{r['seconds']:.2f} s")]))
    return 0
