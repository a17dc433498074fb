"""``minibloom.engines``, the documented path of the engine adapters: the public names of ``minibloom.oracle.engines``
(CTranslate2, ONNX Runtime, llama.cpp; the engines' own dequantized weights) and ``minibloom.oracle.engines_openvino``
(OpenVINO + NNCF), the same objects. The engines themselves are imported only when an adapter runs. A test that
patches one patches the ``minibloom.oracle`` module that uses it.
"""

from .oracle.engines import (CT2_QUANTIZATIONS, GGML_TYPE_F32, GGUF_KINDS, NOTE_FILE, ONNX_DTYPES, ONNX_KIND_KEY,
                             ctranslate2_convert, ctranslate2_kind, ctranslate2_trace, dequantized_checkpoint,
                             gguf_kind, llama_cpp_trace, onnx_export, onnx_quantize_dynamic, onnx_trace)
from .oracle.engines_openvino import (OPENVINO_WEIGHTS, openvino_compress, openvino_convert, openvino_kind,
                                      openvino_trace)

__all__ = ["CT2_QUANTIZATIONS", "GGML_TYPE_F32", "GGUF_KINDS", "NOTE_FILE", "ONNX_DTYPES", "ONNX_KIND_KEY",
           "OPENVINO_WEIGHTS", "ctranslate2_convert", "ctranslate2_kind", "ctranslate2_trace", "dequantized_checkpoint",
           "gguf_kind", "llama_cpp_trace", "onnx_export", "onnx_quantize_dynamic", "onnx_trace", "openvino_compress",
           "openvino_convert", "openvino_kind", "openvino_trace"]
