"""BLOOM's tensor names in llama.cpp's GGUF files and the fused-QKV regrouping (gguf-py ``constants.py`` and
``tensor_mapping.py``, entries tagged "bloom"; llama.cpp ``convert_hf_to_gguf.py`` ``BloomModel``).

GGUF keeps matrices as ``(out, in)`` with ggml's reversed dims, which ``GGUFReader`` turns back into NumPy order, so
only the fused QKV needs work: llama.cpp stores it as ``[all q; all k; all v]`` while BLOOM interleaves ``(q, k, v)``
per head.
"""

from __future__ import annotations

import numpy as np

from ...errors import MinibloomError

ARCH = "bloom"

GLOBAL_NAMES = {  # llama.cpp name -> HF BLOOM name (gguf-py tensor_mapping.py, entries tagged "bloom")
    "token_embd.weight": "word_embeddings.weight",
    "token_embd_norm.weight": "word_embeddings_layernorm.weight",
    "token_embd_norm.bias": "word_embeddings_layernorm.bias",
    "output_norm.weight": "ln_f.weight",
    "output_norm.bias": "ln_f.bias",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {  # per block: llama.cpp module -> HF module
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}


def hf_to_gguf_name(hf_name: str) -> str:
    """``h.3.self_attention.query_key_value.weight`` -> ``blk.3.attn_qkv.weight`` (bare HF names)."""
    for g, h in GLOBAL_NAMES.items():
        if h == hf_name:
            return g
    parts = hf_name.split(".")
    if parts[0] == "h" and len(parts) >= 4:
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        for g, h in LAYER_NAMES.items():
            if h == module:
                return f"blk.{parts[1]}.{g}.{leaf}"
    raise MinibloomError(f"{hf_name}: not a BLOOM tensor name")


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_qkv.weight`` -> ``h.3.self_attention.query_key_value.weight``; None for unknown names."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES \
            and parts[3] in ("weight", "bias"):
        return f"h.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def qkv_to_gguf(a: np.ndarray, n_head: int) -> np.ndarray:
    """BLOOM's per-head ``(q, k, v)`` rows -> llama.cpp's ``[all q; all k; all v]`` (weight [3C, C] or bias [3C])."""
    three_c = a.shape[0]
    hd = three_c // (3 * n_head)
    return a.reshape(n_head, 3, hd, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def qkv_from_gguf(a: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``qkv_to_gguf``: ``[all q; all k; all v]`` -> per-head ``(q, k, v)``."""
    three_c = a.shape[0]
    hd = three_c // (3 * n_head)
    return np.ascontiguousarray(a.reshape(3, n_head, hd, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape))
