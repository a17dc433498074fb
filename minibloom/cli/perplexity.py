"""``minibloom perplexity FILE``: the perplexity of a text file in transformers' sliding windows
(``minibloom.evaluate.perplexity``), on this process or over Dask workers.

Also home of the options ``kl`` shares: the model and its load options, the windows, the cluster, the output.
"""

from __future__ import annotations

import json

EXAMPLES = """\
examples:
  minibloom perplexity story.txt --context 256 --stride 128                the default model
  minibloom perplexity story.txt --model path/to/ckpt --dtype float64 --json
  minibloom perplexity story.txt --context 256 --stride 128 --workers 2    two local Dask worker processes
  minibloom perplexity corpus.txt --model path/to/ckpt --scheduler tcp://HOST:8786   an existing Dask cluster
"""


def add_eval_options(p) -> None:
    """FILE, --model and the options perplexity and kl share."""
    from . import add_model_option

    p.add_argument("file", metavar="FILE", help="a UTF-8 text file, tokenized whole with the model's tokenizer")
    add_model_option(p)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="compute dtype: float32 (default) or float64 (the oracle mode)")
    p.add_argument("--low-memory", action="store_true",
                   help="keep 16-bit weights memory-mapped and widen one layer at a time (models bigger than RAM)")
    w = p.add_argument_group("windows (transformers' perplexity guide)")
    w.add_argument("--context", "-c", type=int, default=1024, metavar="C",
                   help="tokens per window (default 1024)")
    w.add_argument("--stride", "-s", type=int, default=None, metavar="S",
                   help="tokens between window starts, 1..C (default C/2); each window scores only the tokens no "
                        "earlier window scored")
    d = p.add_argument_group("Dask (pip install minibloom[dask]); default: this process")
    d.add_argument("--scheduler", metavar="tcp://HOST:8786", default=None,
                   help="run the windows on an existing dask.distributed cluster (every worker loads the model once)")
    d.add_argument("--scheduler-timeout", type=float, metavar="S", default=10.0,
                   help="seconds to wait for --scheduler to answer before giving up (default 10; the wait is "
                        "announced on stderr)")
    d.add_argument("--workers", type=int, metavar="N", default=None,
                   help="start a local Dask cluster of N worker processes (one thread each) for this run")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (the last line)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("perplexity", help="perplexity of a text file, in sliding windows (transformers' guide)",
                       description="Tokenize FILE whole, run windows of up to C tokens starting every S tokens and "
                                   "score each token once (no earlier window scored it, and its window has at "
                                   "least one token before it); perplexity = exp(sum nll / tokens scored), the sum "
                                   "exact in float64. Every window runs on one OpenBLAS thread (this process runs "
                                   "several side by side), so the result is the same to the last bit, in float32 "
                                   "and float64, on this process and on any number of Dask workers with the same "
                                   "NumPy and BLAS build on the same kind of CPU.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_options(p)
    p.set_defaults(func=run)


def check_eval_args(args) -> None:
    """The cluster options checked before the text is read or a model loaded."""
    from ..evaluate.distributed import check_cluster_args, check_timeout
    from ..evaluate import check_window_args

    check_cluster_args(args.scheduler, args.workers)
    check_timeout(args.scheduler_timeout, "--scheduler-timeout")
    check_window_args(args.context, args.stride)


def eval_kwargs(args) -> dict:
    return dict(context=args.context, stride=args.stride, dtype=args.dtype, low_memory=args.low_memory,
                scheduler=args.scheduler, workers=args.workers, progress=not args.no_progress,
                scheduler_timeout=args.scheduler_timeout)


def where(result: dict) -> str:
    n = result["workers"]
    return "this process" if not n else f"{n} Dask worker{'s' if n != 1 else ''}"


def summary(r: dict, file: str) -> list[tuple[str, str]]:
    return [("model", f"{r['model']} ({r['dtype']})"),
            ("text", f"{file}: {r['input_tokens']:,} tokens"),
            ("windows", f"{r['windows']:,} of up to {r['context']} tokens, stride {r['stride']}, on {where(r)}"),
            ("scored", f"{r['tokens']:,} tokens"),
            ("nll", f"{r['nll']:.6f} nats, {r['nll'] / r['tokens']:.6f} per token"),
            ("perplexity", f"{r['perplexity']:.6f}")]


def table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def run(args) -> int:
    from ..evaluate import perplexity
    from ..textfile import read_text

    check_eval_args(args)
    text = read_text(args.file)
    r = perplexity(args.model, text, **eval_kwargs(args))
    if args.json:
        print(json.dumps(r))
    else:
        print(table(summary(r, args.file) + [("time", f"{r['seconds']:.2f} s")]))
    return 0
