"""Writing a Hugging Face BLOOM checkpoint as a GGUF file laid out like llama.cpp's ``convert_hf_to_gguf.py``
``BloomModel`` (tensor names, the QKV regrouping, tokenizer metadata), with gguf-py's ``GGUFWriter`` and
``gguf.quants.quantize``.
"""

from __future__ import annotations

import os

import numpy as np

from ...config import BloomConfig
from ...errors import MinibloomError
from ..weights import Checkpoint, flatten, read_params, safetensors_files
from .names import ARCH, hf_to_gguf_name, qkv_to_gguf
from .vocab import tokenizer_metadata

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}


def convert_hf_to_gguf(src: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16", *,
                       types: dict[str, str] | None = None, duplicate_output: bool = False,
                       progress=None) -> str:
    """Write a Hugging Face BLOOM checkpoint directory as a GGUF file laid out like llama.cpp's converter.

    ``outtype``: one of ``OUTTYPES`` for the 2-D weights (norms and biases are always F32, as in llama.cpp; a matrix
    whose rows do not split into whole blocks falls back to F16). ``types``: per-tensor overrides by GGUF name, e.g.
    ``{"output.weight": "q8_0"}`` (makes a mixed file). ``duplicate_output``: also write the tied embedding as
    ``output.weight`` (what converters before llama.cpp PR #12456, March 2025, did).
    """
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFWriter, LlamaFileType, QuantError, quants

    src, out_path = os.fspath(src), os.fspath(out_path)
    if os.path.isdir(out_path):
        raise MinibloomError(f"{out_path}: is a directory; give the .gguf file to write")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out_path))):
        raise MinibloomError(f"{out_path}: the directory {os.path.dirname(os.path.abspath(out_path))} does not exist")
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise MinibloomError(f"outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    for k, v in (types or {}).items():
        if v.lower() not in OUTTYPES:
            raise MinibloomError(f"types[{k!r}]: {v!r} is not one of {', '.join(OUTTYPES)}")
    cfg = BloomConfig.from_json(os.path.join(src, "config.json"))
    ckpt = Checkpoint(safetensors_files(src))
    try:
        params = read_params(ckpt, cfg, np.float32, progress=progress)
    finally:
        ckpt.close()
    flat = flatten(params)
    vocab, C = flat["word_embeddings.weight"].shape
    if "lm_head.weight" not in flat and duplicate_output:
        flat["lm_head.weight"] = flat["word_embeddings.weight"]

    w = GGUFWriter(out_path, arch=ARCH)
    w.add_name(os.path.basename(os.path.normpath(src)))
    w.add_context_length(C)  # llama.cpp writes seq_length, else n_embed (ALiBi has no limit; readers ignore it)
    w.add_embedding_length(C)
    w.add_feed_forward_length(4 * C)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_file_type(getattr(LlamaFileType, _FILE_TYPES[outtype]).value)
    w.add_quantization_version(2)
    tm = tokenizer_metadata(src, vocab)
    if tm is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("bloom")
        w.add_token_list(tm["tokens"])
        w.add_token_types(tm["types"])
        w.add_token_merges(tm["merges"])
        if isinstance(tm.get("chat_template"), str) and tm["chat_template"]:
            w.add_chat_template(tm["chat_template"])
    for key, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("unk", cfg.unk_token_id),
                       ("pad", cfg.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)

    for hf_name, a in flat.items():
        name = hf_to_gguf_name(hf_name)
        if ".attn_qkv." in name:
            a = qkv_to_gguf(a, cfg.n_head)
        kind = (types or {}).get(name, outtype).lower() if a.ndim == 2 and name.endswith(".weight") else "f32"
        if kind == "f32":
            w.add_tensor(name, np.ascontiguousarray(a, np.float32))
        elif kind == "f16":
            w.add_tensor(name, np.ascontiguousarray(a, np.float16))
        else:
            qtype = getattr(T, kind.upper())
            try:
                w.add_tensor(name, quants.quantize(np.ascontiguousarray(a, np.float32), qtype), raw_dtype=qtype)
            except QuantError:
                w.add_tensor(name, np.ascontiguousarray(a, np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=bool(progress))
    w.close()
    return out_path
