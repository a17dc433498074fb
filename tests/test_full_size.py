"""The bloom-560m shape (24 layers, 16 heads, hidden 1024, vocab 250880, fp16 on disk) against transformers."""

from __future__ import annotations

import numpy as np
import pytest

import minibloom
from minibloom.testing import FP32, assert_rel_close

pytestmark = pytest.mark.slow


def test_560m_shape_logits_match_transformers(bloom560m_dir, record):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from factory import left_pad, random_ids

    rows = [list(random_ids(250880, 24, seed=1)), list(random_ids(250880, 17, seed=2))]
    ids, mask = left_pad(rows)
    hf = transformers.BloomForCausalLM.from_pretrained(bloom560m_dir, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    del hf
    model = minibloom.load(bloom560m_dir)
    assert (model.config.n_layer, model.config.n_head, model.vocab_size) == (24, 16, 250880)
    got = model(ids, mask)
    for i, r in enumerate(rows):  # compare real tokens only; pad positions are garbage in both
        err = assert_rel_close(got[i, -len(r):], ref[i, -len(r):], FP32, f"560m-shape row {i}")
        record(f"560m fp32 row {i} rel err", err)
    assert (got[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).all()
