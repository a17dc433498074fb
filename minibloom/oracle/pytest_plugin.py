"""pytest plugin (registered as the ``pytest11`` entry point ``minibloom``): the ``bloom_oracle`` fixture.

Downstream test suites get it automatically once minibloom is installed::

    def test_my_kernel(bloom_oracle):
        logits = my_kernel.run("path/to/bloom", ids)
        bloom_oracle.assert_logits_close(logits, "path/to/bloom", ids)

Nothing heavy is imported until the fixture is used (pytest loads this module in every session).
"""

from __future__ import annotations

import pytest


class BloomOracle:
    """minibloom's float64 forward pass as a test oracle. Reference models are cached per checkpoint path."""

    def model(self, model):
        """The float64 ``Bloom`` for ``model`` (a Bloom, a checkpoint path or a hub id)."""
        from .testing import reference_model

        return reference_model(model)

    def logits(self, model, input_ids, attention_mask=None):
        """minibloom's float64 logits [B, T, V]."""
        from .testing import reference_logits

        return reference_logits(model, input_ids, attention_mask)

    def assert_logits_close(self, actual, model, input_ids, attention_mask=None, tol=None, *,
                            kind: str | None = None) -> float:
        """``minibloom.testing.assert_logits_close``: fail unless ``actual`` meets the policy of ``kind`` (default:
        its dtype's; or ``tol``) against minibloom's float64 logits; returns the relative error."""
        from .testing import assert_logits_close

        return assert_logits_close(actual, model, input_ids, attention_mask, tol=tol, kind=kind)

    def check_logits(self, actual, reference, attention_mask=None, kind: str | None = None, size=None):
        """``minibloom.testing.check_logits``: the verdict (not an assertion) on logits against reference logits;
        ``size`` = (n_layer, hidden_size) of the model is required for every calibrated kind."""
        from .testing import check_logits

        return check_logits(actual, reference, attention_mask, kind, size=size)

    def trace(self, model, input_ids, attention_mask=None, attentions: bool = False) -> dict:
        """minibloom's float64 trace (``minibloom.trace`` format) for ``input_ids``."""
        from .trace import trace

        return trace(self.model(model), input_ids, attention_mask, attentions=attentions)

    def assert_traces_close(self, actual, reference, rtol: float | None = None, atol: float = 0.0):
        """Fail, with the per-layer table and the first divergent layer, unless trace ``actual`` (a dict or a
        .npz path) matches ``reference``; returns the ``DiffReport``."""
        from .trace import diff_traces

        report = diff_traces(actual, reference, rtol=rtol, atol=atol)
        if not report.passed:
            raise AssertionError("traces differ\n" + report.table())
        return report


@pytest.fixture(scope="session")
def bloom_oracle() -> BloomOracle:
    """minibloom as a correctness oracle: ``.logits``, ``.assert_logits_close``, ``.trace``,
    ``.assert_traces_close``."""
    return BloomOracle()
