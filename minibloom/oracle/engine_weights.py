"""What a quantizing engine multiplies by: the matrices a reader takes from an engine's own files (or modules),
dequantized in float64 from its integers, scales and zero points, before ``minibloom.oracle.dequantize`` maps them
to BLOOM's tensor names and writes them as a checkpoint (the same-weights reference of a quantized port).

Each reader (``read_ct2``, ``read_onnx``, ``read_openvino``, ``read_torch``) returns one ``EngineWeights``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEQUANTIZED_NOTE = "minibloom_dequantized.json"  # beside a same-weights reference: where each tensor came from

# How an engine quantizes the activations entering a product at run time (None: weight-only, float activations).
ACTIVATIONS = {
    "int8-per-row": "symmetric int8, one scale per row (token) of the input: CTranslate2's int8 compute",
    "int8-per-row-sat16": "CTranslate2's int8 compute where oneDNN / MKL multiply without VNNI (AVX2, AVX-512 "
                          "without VNNI): int8-per-row, the input shifted to uint8 and products summed in adjacent "
                          "pairs saturating at int16 (vpmaddubsw)",
    "uint8-per-tensor": "asymmetric uint8 with a zero point, one scale for the whole input "
                        "(ONNX Runtime's DynamicQuantizeLinear)",
    "int8-per-group": "symmetric int8, one scale per group of the input's columns: OpenVINO's CPU dynamic "
                      "quantization (DYNAMIC_QUANTIZATION_GROUP_SIZE)",
    "static": "fixed activation scales from calibration (ONNX Runtime's quantize_static): not emulated at run time",
}


@dataclass
class EngineWeights:
    """The dequantized weights of one engine's model.

    ``matrices``: float64 arrays keyed by BLOOM's bare tensor name (``h.0.self_attention.query_key_value.weight``,
    ``word_embeddings.weight``, ``lm_head.weight``) in transformers' layout [out, in] where the reader knows it, else
    by the engine's own tensor name in either orientation (``minibloom.oracle.dequantize`` then maps it by shape and
    value against the unquantized model). Tensors the engine left in floating point are not listed: the reference
    takes them from the unquantized model.
    """

    engine: str  # what wrote them, e.g. "ctranslate2 4.8 int8_float32"
    matrices: dict[str, np.ndarray]
    activations: str | None = None  # a key of ACTIVATIONS, or None for weight-only engines
    compute: str = "float32"  # the precision of the engine's floating-point arithmetic
    group: int | None = None  # activation group size for "int8-per-group"
    notes: list[str] = field(default_factory=list)
    # BLOOM names of ``matrices`` the engine keeps in a floating-point format rather than as integers ("float16",
    # "bfloat16", "float32"): the reference takes MODEL's tensor rounded to that format (what a correct load of MODEL
    # multiplies by), so a port that dropped or swapped one is still caught; where the engine's values differ from
    # it, ``minibloom dequantize`` says so.
    stored: dict[str, str] = field(default_factory=dict)
