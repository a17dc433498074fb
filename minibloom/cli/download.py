"""``minibloom download M``: fetch a hub checkpoint (configs, tokenizer, safetensors; never pickles) into weights/."""

from __future__ import annotations

import argparse
import os

from . import add_model_option

EXAMPLES = """\
examples:
  minibloom download bigscience/bloom-560m            -> weights/bigscience--bloom-560m
  minibloom download cmarkea/bloomz-560m-sft-chat --revision main
  minibloom download bigscience/bloomz-560m --dir /data/models

Only config.json, generation_config.json, tokenizer files and *.safetensors (plus the shard index) are fetched:
minibloom never loads pickled pytorch_model.bin files. Afterwards the model loads offline by its repo id
(HF_HUB_OFFLINE=1 minibloom generate "..." --model bigscience/bloom-560m) or by its folder. To move it to a machine
without network, copy the folder into that machine's weights/.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "download", help="fetch a checkpoint from the Hugging Face Hub into weights/",
        description="Download a BLOOM checkpoint (safetensors only) with huggingface_hub.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p, positional=True, required=True, help="hub repo id, e.g. bigscience/bloom-560m")
    p.add_argument("--revision", default=None, help="branch, tag or commit to fetch (default: main)")
    p.add_argument("--dir", default=None, metavar="D",
                   help="folder to download into (default: weights/, or $MINIBLOOM_WEIGHTS); the files land in "
                        "D/org--name")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..formats.hub import download

    path = download(args.model, revision=args.revision, cache_dir=args.dir, progress=False if args.quiet else None,
                    local_first=False)
    files = sorted(f for f in os.listdir(path) if not f.startswith("."))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in files if os.path.isfile(os.path.join(path, f)))
    print(f"{args.model}: {len(files)} files, {size / 2**20:.1f} MiB in {path}")
    print(f"use it with: minibloom generate \"Hello\" --model {args.model}")
    return 0
