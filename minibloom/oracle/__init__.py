"""The oracle: what minibloom offers for judging other BLOOM implementations.

``testing`` (verdict policies, ``assert_logits_close``, ``check_logits``), ``trace`` (the trace format, ``diff``,
``verify``), ``hf`` (``minibloom check``: layer by layer against transformers, ``hf_float64_exact``), ``compare``
(a quantized checkpoint against its source), ``calibrate`` (the measurements behind ``policies.json``), ``engines``
(traces of CTranslate2, ONNX Runtime and llama.cpp runs) and ``pytest_plugin`` (the ``bloom_oracle`` fixture).
"""

from .hf import CheckResult, check, hf_available, hf_float64_exact, hf_trace

__all__ = ["CheckResult", "check", "hf_available", "hf_float64_exact", "hf_trace"]
