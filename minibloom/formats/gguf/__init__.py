"""BLOOM as llama.cpp stores it, split by role as gguf-py is: ``names`` (tensor names, the QKV regrouping),
``reader`` (GGUF file -> config, parameters, tokenizer), ``quants`` (weights kept in their quantized blocks),
``vocab`` (the BPE vocabulary as metadata) and ``writer`` (a Hugging Face checkpoint -> GGUF); ``python -m
minibloom.gguf`` is the converter's command line.
"""

from .names import ARCH, GLOBAL_NAMES, LAYER_NAMES, gguf_to_hf_name, hf_to_gguf_name, qkv_from_gguf, qkv_to_gguf
from .quants import LazyLayer, QuantizedWeight, dequantize
from .reader import config_from_gguf, metadata, open_reader, read_gguf, read_gguf_checkpoint
from .vocab import tokenizer_from_gguf, tokenizer_metadata, wrap_tokenizer
from .writer import OUTTYPES, convert_hf_to_gguf

__all__ = ["ARCH", "GLOBAL_NAMES", "LAYER_NAMES", "OUTTYPES", "LazyLayer", "QuantizedWeight", "config_from_gguf",
           "convert_hf_to_gguf", "dequantize", "gguf_to_hf_name", "hf_to_gguf_name", "metadata", "open_reader",
           "qkv_from_gguf", "qkv_to_gguf", "read_gguf", "read_gguf_checkpoint", "tokenizer_from_gguf",
           "tokenizer_metadata", "wrap_tokenizer"]
