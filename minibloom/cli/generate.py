"""``minibloom generate PROMPT``: continue a prompt, printing tokens as they are produced.

Also home of the options every text command shares (``--model``, ``--dtype``, sampling), reused by ``chat``.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import MinibloomError

EXAMPLES = """\
examples:
  minibloom generate "ROMEO:"                                 the default Shakespeare model, sampled
  minibloom generate "ROMEO:" --max-new-tokens 60 --seed 0    reproducible
  minibloom generate "ROMEO:" --temperature 0                 greedy: always the most likely token
  minibloom generate "The capital of France is" --model bigscience/bloom-560m
  minibloom generate "Hello" --model path/to/checkpoint --dtype float64 --stats

Sampling defaults come from the model's generation_config.json when it has one (the default model: temperature 0.8,
top-k 40), else temperature 0.8, top-k 50, top-p 1.0. The run stops at the end-of-sequence token </s>.
"""

MODEL_HELP = ("a checkpoint directory (config.json + *.safetensors + tokenizer.json), a .safetensors or .gguf file, "
              "a name under weights/, or a hub repo id such as bigscience/bloom-560m (downloaded once into "
              "weights/; HF_HUB_OFFLINE=1 uses only local copies). Default: the small Shakespeare model in "
              "weights/default")
SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", metavar="M", default=None, help=MODEL_HELP)
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="compute dtype: float32 (transformers' numerics, default) or float64 (the exact oracle mode)")
    g.add_argument("--backend", choices=("numpy", "cupy", "array_api_strict"), default="numpy",
                   help="array library for the forward pass (cupy: NVIDIA GPU)")
    g.add_argument("--revision", default=None, help="hub branch, tag or commit (hub repo ids only)")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens_help: str) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json, else built-in)")
    g.add_argument("--max-new-tokens", "-n", type=int, metavar="N", default=None, help=max_new_tokens_help)
    g.add_argument("--temperature", "-t", type=float, metavar="T", default=None,
                   help="divide the logits by T before sampling: < 1 is safer, > 1 wilder; 0 means greedy "
                        "(built-in default 0.8)")
    g.add_argument("--top-k", type=int, metavar="K", default=None,
                   help="sample only among the K most likely tokens (0 = all; built-in default 50)")
    g.add_argument("--top-p", type=float, metavar="P", default=None,
                   help="nucleus sampling: the smallest set of tokens whose probability adds up to P (1.0 = off)")
    g.add_argument("--repetition-penalty", type=float, metavar="R", default=None,
                   help="R > 1 makes tokens already in the text less likely (transformers' rule; 1.0 = off)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (same as -t 0)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def read_stdin() -> str:
    """All of standard input as text; bytes that are not UTF-8 are a MinibloomError, not a traceback."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinibloomError(f"stdin: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_model(args):
    """``minibloom.load`` with the CLI's model options (progress bars on a terminal for big checkpoints)."""
    from ..bloom import load

    return load(args.model, dtype=args.dtype, backend=args.backend, revision=getattr(args, "revision", None))


def generation_options(args, model) -> dict:
    """``minibloom.generate.generation_options`` with the CLI's sampling flags."""
    from ..generate import generation_options as options

    return options(model, **{k: getattr(args, k, None) for k in SAMPLING}, greedy=getattr(args, "greedy", False),
                   seed=getattr(args, "seed", None))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="continue a prompt, printing tokens as they come",
        description="Continue PROMPT with a BLOOM model and print the text as it is generated. The prompt is "
                    "tokenized as is: BLOOM adds no beginning-of-text token.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue (quote it), or - to read it from stdin")
    add_model_args(p)
    add_sampling_args(p, "how many tokens to add at most (default: the model's generation_config.json, else 100)")
    out = p.add_argument_group("output")
    out.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    out.add_argument("--stats", action="store_true",
                     help="print token counts and speed (prefill, decode tokens/s) to stderr at the end")
    p.set_defaults(func=run)


def run(args, stdout=None, stderr=None) -> int:
    from ..generate import stream

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    t0 = time.perf_counter()
    model = load_model(args)
    t_load = time.perf_counter() - t0
    tok = model.tokenizer
    if tok is None:
        raise MinibloomError(f"{model.path}: no tokenizer.json, so text cannot be encoded; use the Python API "
                             "(model.generate with token ids)")
    ids = tok.encode(prompt)
    if not ids:
        raise MinibloomError("PROMPT: empty prompt (BLOOM adds no start token, so there is nothing to continue)")
    opts = generation_options(args, model)
    steps = stream(model, [ids], **opts)  # checks every option before anything is printed
    if args.stats:
        mode = "greedy" if not opts["do_sample"] else \
            f"sampling T={opts['temperature']} top-k={opts['top_k']} top-p={opts['top_p']} seed={opts['seed']}"
        print(f"[{model!r}; {mode}]", file=stderr)
    if not args.no_echo:
        stdout.write(prompt)
        stdout.flush()
    dec = tok.stream_decoder(skip_special_tokens=True)  # never prints half a UTF-8 character
    n = 0
    t1 = time.perf_counter()
    t_first = None
    for nxt in steps:
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        piece = dec.push(int(nxt[0]))
        if piece:
            stdout.write(piece)
            stdout.flush()
    stdout.write(dec.flush() + "\n")
    stdout.flush()
    t_end = time.perf_counter()
    if args.stats:
        prefill = (t_first or t_end) - t1
        decode = t_end - (t_first or t_end)
        # the decode rate counts the tokens after the first; with none of them there is no rate to show
        speed = f"decode {(n - 1) / decode:.1f} tokens/s" if n > 1 and decode > 0 else "no decode steps"
        print(f"[load {t_load:.2f} s; prompt {plural(len(ids), 'token')}, prefill + first token "
              f"{prefill * 1e3:.1f} ms; {plural(n, 'new token')}, {speed}]", file=stderr)
    return 0
