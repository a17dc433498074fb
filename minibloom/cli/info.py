"""``minibloom info M``: what a checkpoint is, from its headers only (no weights are read)."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

from ..errors import MinibloomError
from . import add_model_option

EXAMPLES = """\
examples:
  minibloom info                          the default model in weights/default
  minibloom info bigscience/bloom-560m    (downloads it first unless it is already in weights/)
  minibloom info model-q8_0.gguf
  minibloom info path/to/checkpoint --json

Shows the config, parameter count, the dtypes and bytes on disk, the memory the weights need in float32 / float64,
the KV cache per 1000 tokens, and whether a tokenizer and a chat template come with the model. Only file headers are
read, so it is instant even for bloom-176b.
"""


def count(n: int) -> str:
    """12,345 -> "12.3K", 559,214,592 -> "559.2M": three significant figures at least, never "0.0M"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="sizes, dtype, parameter count and memory needed of a checkpoint",
        description="Describe a checkpoint without loading its weights.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p, positional=True)
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (hub repo ids only)")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=run)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _safetensors_facts(path: str) -> tuple[dict, dict]:
    from ..config import BloomConfig
    from ..formats.loading import checkpoint_parts
    from ..formats.safetensors import SafetensorsFile
    from ..formats.weights import bare_name, safetensors_files

    directory, files, config_path = checkpoint_parts(path)
    cfg = BloomConfig.from_json(config_path)
    files = files or safetensors_files(directory)
    dtypes: Counter = Counter()
    dtype_bytes: Counter = Counter()
    n_elements, vocab, disk = 0, None, 0
    for f in files:
        disk += os.path.getsize(f)
        with SafetensorsFile(f) as sf:
            for key in sf.names:
                info = sf.info(key)
                if bare_name(key) == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # a stored copy of the tied head is not a parameter of its own
                count = 1
                for d in info.shape:
                    count *= d
                n_elements += count
                dtypes[info.dtype] += 1
                dtype_bytes[info.dtype] += info.nbytes
                if bare_name(key) == "word_embeddings.weight":
                    vocab = info.shape[0]
    facts = {"format": "safetensors", "files": [os.path.basename(f) for f in files], "disk_bytes": disk,
             "tensor_dtypes": {k: {"tensors": dtypes[k], "bytes": dtype_bytes[k]} for k in sorted(dtypes)}}
    if cfg.quantization_config:
        qc = cfg.quantization_config
        facts["quantization"] = {k: qc[k] for k in ("quant_method", "bnb_4bit_quant_type", "load_in_4bit",
                                                    "bnb_4bit_use_double_quant") if k in qc}
        n_elements = None  # packed 4-bit storage: count from the config instead
    return facts, {"config": cfg, "vocab": vocab or cfg.vocab_size, "n_stored": n_elements, "directory": directory}


def _gguf_facts(path: str) -> tuple[dict, dict]:
    from ..formats import gguf as G

    reader = G.open_reader(path)
    meta = G.metadata(reader)
    names = [t.name for t in reader.tensors]
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(emb.shape[-1]) if emb is not None else len(meta.get("tokenizer.ggml.tokens") or [])
    cfg = G.config_from_gguf(meta, vocab, "output.weight" in names, path)
    types: Counter = Counter()
    type_bytes: Counter = Counter()
    n = 0
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        type_bytes[t.tensor_type.name] += int(t.n_bytes)
        if t.name != "output.weight" or not cfg.tie_word_embeddings:
            n += int(t.n_elements)
    facts = {"format": "gguf", "files": [os.path.basename(path)], "disk_bytes": os.path.getsize(path),
             "tensor_dtypes": {k: {"tensors": types[k], "bytes": type_bytes[k]} for k in sorted(types)},
             "gguf_file_type": meta.get("general.file_type"), "gguf_name": meta.get("general.name")}
    return facts, {"config": cfg, "vocab": vocab, "n_stored": n, "directory": None, "meta": meta}


def describe(model: str | None, revision: str | None = None) -> dict:
    """All facts ``info`` prints, as a dict (JSON-able)."""
    from .. import chat
    from ..formats.loading import resolve
    from ..tokenizer import load_tokenizer

    path = resolve(model, revision=revision)
    if os.path.isfile(path) and path.endswith(".gguf"):
        facts, extra = _gguf_facts(path)
    elif os.path.isdir(path) or path.endswith(".safetensors"):
        facts, extra = _safetensors_facts(path)
    else:
        raise MinibloomError(f"{path}: expected a checkpoint directory, a .safetensors file or a .gguf file")
    cfg, vocab = extra["config"], extra["vocab"]
    n_params = cfg.n_params(vocab)
    if extra["n_stored"] is not None and extra["n_stored"] != n_params:
        facts["stored_elements"] = extra["n_stored"]
    tok = None
    if extra["directory"]:
        tok = load_tokenizer(extra["directory"])
    else:
        meta = extra["meta"]
        if meta.get("tokenizer.ggml.tokens"):
            from ..formats import gguf as G

            tok = G.wrap_tokenizer(G.tokenizer_from_gguf(meta, path), meta, path)
    C, L = cfg.hidden_size, cfg.n_layer
    facts.update({
        "path": path,
        "config": {"n_layer": L, "hidden_size": C, "n_head": cfg.n_head, "head_dim": cfg.head_dim,
                   "vocab_rows": vocab, "layer_norm_epsilon": cfg.layer_norm_epsilon,
                   "apply_residual_connection_post_layernorm": cfg.apply_residual_connection_post_layernorm,
                   "pretraining_tp": cfg.pretraining_tp, "tie_word_embeddings": cfg.tie_word_embeddings,
                   "torch_dtype": cfg.torch_dtype},
        "n_params": n_params,
        "memory_bytes": {"float32": 4 * n_params, "float64": 8 * n_params},
        "kv_cache_bytes_per_1000_tokens": {"float32": 2 * L * C * 4 * 1000, "float64": 2 * L * C * 8 * 1000},
        "tokenizer": None if tok is None else {"vocab_size": tok.vocab_size, "special_tokens": tok.special_tokens},
        "chat_template": chat.detect(model or path, tok, default="bloomz"),
    })
    return facts


def run(args) -> int:
    facts = describe(args.model, args.revision)
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    c = facts["config"]
    lines = [
        f"path            {facts['path']}",
        f"format          {facts['format']}: {', '.join(facts['files'][:4])}"
        + (f" (+{len(facts['files']) - 4} more)" if len(facts["files"]) > 4 else ""),
        f"architecture    BLOOM, {c['n_layer']} layers, hidden {c['hidden_size']}, {c['n_head']} heads x "
        f"{c['head_dim']}, vocab {c['vocab_rows']} rows"
        + (", post-LN residual" if c["apply_residual_connection_post_layernorm"] else "")
        + (f", pretraining_tp {c['pretraining_tp']}" if c["pretraining_tp"] != 1 else ""),
        f"parameters      {facts['n_params']:,} ({count(facts['n_params'])})",
        f"on disk         {human(facts['disk_bytes'])}; "
        + ", ".join(f"{k} x{v['tensors']} ({human(v['bytes'])})" for k, v in facts["tensor_dtypes"].items()),
    ]
    if "quantization" in facts:
        lines.append(f"quantization    {facts['quantization']}")
    m, kv = facts["memory_bytes"], facts["kv_cache_bytes_per_1000_tokens"]
    lines += [
        f"memory needed   {human(m['float32'])} in float32, {human(m['float64'])} in float64 (weights), plus KV "
        f"cache {human(kv['float32'])} / {human(kv['float64'])} per 1000 tokens of context",
        "tokenizer       " + ("none (no tokenizer.json: token ids only)" if facts["tokenizer"] is None else
                              f"{facts['tokenizer']['vocab_size']} entries, special "
                              + " ".join(facts["tokenizer"]["special_tokens"].values())),
        f"chat template   {facts['chat_template']} (minibloom chat --template to override)",
    ]
    print("\n".join(lines))
    return 0
