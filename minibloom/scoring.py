"""Scoring a model's logits against the tokens that followed, in float64 NumPy: what corpus evaluation
(``minibloom.evaluate``), training's held-out loss (``minibloom.training``) and the oracle's KL divergence
(``minibloom.oracle.compare``) share. Not for training: ``minibloom.backward.cross_entropy`` is the loss with a
gradient.

References:
- The log-sum-exp trick (subtract the row maximum before ``exp``), as ``torch.log_softmax`` and
  ``scipy.special.log_softmax`` compute it.
- The per-token negative log-likelihood is torch's ``F.cross_entropy(..., reduction="none")``.
"""

from __future__ import annotations

import numpy as np


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64 (NumPy; for scoring, not training)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64: logits [n, V], targets [n] -> [n] (the cross entropy of
    each scored token, without the mean or the gradient)."""
    return -np.take_along_axis(log_softmax64(logits), targets[:, None], axis=-1)[:, 0]
