"""``minibloom.testing``, the documented path of the oracle's verdict policies: the public names of
``minibloom.oracle.testing`` (tolerances, policies, ``check_logits`` / ``assert_logits_close``, the references and
the probes), the same objects. A test that patches one patches ``minibloom.oracle.testing``, where they are used.
"""

from .oracle.testing import (BF16, BNB_VS_DEQUANT, DEFAULT_SIZE, FP16, FP32, FP64_SELF, FP64_VS_HF, GGUF_VS_SOURCE,
                             GRAD_FP32, GRAD_FP64, MAX_HIDDEN_SIZE, MAX_N_LAYER, POLICIES, POLICY_FILE, PROBE_FLOORS,
                             QUANTIZED, Policy, Tolerance, Verdict, activation_models, activation_scheme,
                             assert_grads_close, assert_logits_close, assert_rel_close, check_dimension, check_logits,
                             check_size, limits, logit_metrics, numerical_gradient, policy_for, probe_figures,
                             probe_policy, reference_grads, reference_logits, reference_model, rel_error, scale,
                             tolerance_for, top1_fails)

__all__ = ["BF16", "BNB_VS_DEQUANT", "DEFAULT_SIZE", "FP16", "FP32", "FP64_SELF", "FP64_VS_HF", "GGUF_VS_SOURCE",
           "GRAD_FP32", "GRAD_FP64", "MAX_HIDDEN_SIZE", "MAX_N_LAYER", "POLICIES", "POLICY_FILE", "PROBE_FLOORS",
           "QUANTIZED", "Policy", "Tolerance", "Verdict", "activation_models", "activation_scheme",
           "assert_grads_close", "assert_logits_close", "assert_rel_close", "check_dimension", "check_logits",
           "check_size", "limits", "logit_metrics", "numerical_gradient", "policy_for", "probe_figures", "probe_policy",
           "reference_grads", "reference_logits", "reference_model", "rel_error", "scale", "tolerance_for",
           "top1_fails"]
