"""``minibloom.trace``, the documented path of the oracle's traces: the public names of ``minibloom.oracle.trace``
(``trace``, ``save_trace`` / ``load_trace``, ``diff_traces``, ``verify_trace``; the module documents the format), the
same objects. A test that patches one patches ``minibloom.oracle.trace``, where they are used.
"""

from .oracle.trace import (FORMAT_VERSION, IGNORE_LABEL, MAX_COMPRESSION, MAX_LAYERS, DiffReport, LayerDiff,
                           diff_policy, diff_traces, explain_input_mismatch, grad_group, layer_name, load_trace,
                           meta_size, model_size, read_npz, save_trace, trace, verify_trace)

__all__ = ["FORMAT_VERSION", "IGNORE_LABEL", "MAX_COMPRESSION", "MAX_LAYERS", "DiffReport", "LayerDiff", "diff_policy",
           "diff_traces", "explain_input_mismatch", "grad_group", "layer_name", "load_trace", "meta_size", "model_size",
           "read_npz", "save_trace", "trace", "verify_trace"]
