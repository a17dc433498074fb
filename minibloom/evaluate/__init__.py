"""Corpus evaluation, split by role: ``corpus`` (``perplexity`` and ``kl`` over a long text), ``windowing`` (the
sliding windows), ``logits`` (logits files an external engine wrote) and ``distributed`` (spreading the windows over
a Dask cluster).

``from minibloom.evaluate import perplexity, kl, windows, ...`` reads the names below; a test that replaces one of
the functions ``perplexity`` or ``kl`` calls patches the module that calls it (``minibloom.evaluate.corpus``).
"""

from .corpus import KL_PERCENTILES, check_same_vocabulary, kl, perplexity, window_bytes
from .logits import LOGITS_SUFFIXES, is_logits_file, read_logits, save_logits
from .windowing import MAX_CONTEXT, MAX_TOKENS, MAX_WINDOWS, Window, check_window_args, windows

__all__ = ["KL_PERCENTILES", "LOGITS_SUFFIXES", "MAX_CONTEXT", "MAX_TOKENS", "MAX_WINDOWS", "Window",
           "check_same_vocabulary", "check_window_args", "is_logits_file", "kl", "perplexity", "read_logits",
           "save_logits", "window_bytes", "windows"]
