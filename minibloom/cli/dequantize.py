"""``minibloom dequantize SOURCE --like MODEL --out DIR``: write the same-weights reference of a quantized model (the
engine's weights dequantized in float64, MODEL's tensors for the rest) as a BLOOM checkpoint, then judge the port
with ``minibloom verify CAND.npz --model DIR --kind float32``."""

from __future__ import annotations

import re

from ..errors import MinibloomError

_OPTIONS = (("out_dir", "--out"), ("like", "--like"), ("source", "SOURCE"), ("force", "--force"),
            ("activations", "--activations"))


def add_parser(sub) -> None:
    p = sub.add_parser("dequantize", help="write a quantized model's dequantized weights as a reference checkpoint",
                       description="Read the integers, scales and zero points of a quantized model (a CTranslate2 "
                                   "model directory, an OpenVINO IR .xml, an ONNX model, a transformers checkpoint "
                                   "quantized in torch, or a .pt file of a whole module: .pt files are unpickled, "
                                   "so only your own), dequantize them in float64, and write them with MODEL's "
                                   "config, tokenizer and unquantized tensors as a checkpoint in DIR: the "
                                   "same-weights reference a weight-only port must match to float precision.")
    p.add_argument("source", metavar="SOURCE", help="the quantized model (file or directory)")
    p.add_argument("--like", required=True, metavar="MODEL",
                   help="the unquantized model that was quantized: directory, .safetensors file, name under "
                        "weights/, or hub repo id")
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write (must be empty or absent)")
    p.add_argument("--force", action="store_true", help="replace DIR as a whole if it exists")
    p.add_argument("--activations", metavar="SCHEME",
                   help="how the engine quantizes activations at run time, when its files do not say: "
                        "int8-per-row (CTranslate2), uint8-per-tensor (ONNX Runtime dynamic), int8-per-group:N "
                        "(OpenVINO's CPU dynamic quantization, N = DYNAMIC_QUANTIZATION_GROUP_SIZE, 32 by default), "
                        "or none (weight-only); default: what the reader found in the files")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run)


def _cli_names(message: str) -> str:
    """The library's argument names -> this command's (out_dir -> --out, ...)."""
    for name, option in _OPTIONS:
        message = re.sub(rf"^{name}\b", option, message)
    return message


def run(args) -> int:
    import json
    import os

    from ..oracle.dequantize import NOTE_FILE, dequantized_checkpoint

    try:
        out = dequantized_checkpoint(args.source, args.out, args.like, force=args.force, activations=args.activations)
    except MinibloomError as e:
        raise MinibloomError(_cli_names(str(e))) from None
    with open(os.path.join(out, NOTE_FILE)) as f:
        note = json.load(f)
    summary = {"out": out, "engine": note["engine"], "activations": note["activations"], "compute": note["compute"],
               "from_engine": len(note["tensors"]), "from_model": len(note["from_model"]), "stored": note["stored"],
               "tie_word_embeddings": note["tie_word_embeddings"], "differs_from_model": note["differs_from_model"]}
    kind = note["compute"] if note["activations"] is None else "int8-activations"  # the port's arithmetic
    nxt = f"minibloom verify CAND.npz --model {out} --kind {kind}"
    summary["next"] = nxt
    if args.json:
        print(json.dumps(summary))
        return 0
    rows = [("engine", note["engine"]), ("activations", note["activations"] or "float (weight-only)"),
            ("compute", note["compute"]), ("tensors from the engine", str(summary["from_engine"])),
            ("tensors from MODEL", str(summary["from_model"])), ("stored", note["stored"]),
            ("head", "tied" if note["tie_word_embeddings"] else "untied")]
    width = max(len(k) for k, _ in rows)
    print(f"same-weights reference written to {out}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if note.get("differs_from_model"):
        names = note["differs_from_model"]
        print(f"  note: the engine's own float tensors differ from MODEL's in {len(names)} of them ("
              f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): the reference holds MODEL's; a port "
              "that loaded MODEL correctly matches it")
    print(f"next: {nxt}")
    return 0
