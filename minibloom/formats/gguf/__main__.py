"""``python -m minibloom.gguf SRC OUT.gguf --outtype q8_0``: convert a checkpoint directory to GGUF."""

from __future__ import annotations

import os
import sys

from ...errors import MinibloomError
from .writer import OUTTYPES, convert_hf_to_gguf


def main(argv=None) -> int:
    """``python -m minibloom.gguf SRC OUT.gguf --outtype q8_0``: convert a checkpoint directory to GGUF."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m minibloom.gguf",
                                 description="Write a Hugging Face BLOOM checkpoint directory as a GGUF file in "
                                             "llama.cpp's layout (convert_hf_to_gguf.py BloomModel).")
    ap.add_argument("src", help="checkpoint directory (config.json, model.safetensors, optional tokenizer.json)")
    ap.add_argument("out", help="the .gguf file to write")
    ap.add_argument("--outtype", choices=OUTTYPES, default="f16", help="type of the 2-D weights (default f16)")
    ap.add_argument("--duplicate-output", action="store_true",
                    help="also store the tied embedding as output.weight (llama.cpp before March 2025 needs it)")
    args = ap.parse_args(argv)
    try:
        path = convert_hf_to_gguf(args.src, args.out, args.outtype, duplicate_output=args.duplicate_output,
                                  progress=None)
    except MinibloomError as e:
        print(f"python -m minibloom.gguf: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
