"""``minibloom.gguf``, the documented path of llama.cpp's GGUF format (and ``python -m minibloom.gguf``, the
converter's command line): the public names of ``minibloom.formats.gguf``, the same objects.
"""

from .formats.gguf import (ARCH, GLOBAL_NAMES, LAYER_NAMES, OUTTYPES, LazyLayer, QuantizedWeight, config_from_gguf,
                           convert_hf_to_gguf, dequantize, gguf_to_hf_name, hf_to_gguf_name, metadata, open_reader,
                           qkv_from_gguf, qkv_to_gguf, read_gguf, read_gguf_checkpoint, tokenizer_from_gguf,
                           tokenizer_metadata, wrap_tokenizer)

__all__ = ["ARCH", "GLOBAL_NAMES", "LAYER_NAMES", "OUTTYPES", "LazyLayer", "QuantizedWeight", "config_from_gguf",
           "convert_hf_to_gguf", "dequantize", "gguf_to_hf_name", "hf_to_gguf_name", "metadata", "open_reader",
           "qkv_from_gguf", "qkv_to_gguf", "read_gguf", "read_gguf_checkpoint", "tokenizer_from_gguf",
           "tokenizer_metadata", "wrap_tokenizer"]

if __name__ == "__main__":
    from .formats.gguf.__main__ import main

    raise SystemExit(main())
