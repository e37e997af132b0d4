"""No softmax attention goes unreported: every softmax over scores (3 or more axes) that the patterns did not decide
gets a fallback record in the compile pass (so in ``stats`` and ``explain``); a classifier's 2-D softmax does not."""

import pytest
import torch

from fa4_inductor import stats
import fa4_inductor
from tests.compare import rewriting_backend

B, H, S, D = 2, 4, 16, 16


def _qkv():
    return [torch.randn(B, H, S, D, dtype=torch.bfloat16) for _ in range(3)]


def outer_product_scores(q, k, v):  # scores as a broadcast product, not q @ kᵀ
    return torch.softmax(q[..., :1] * k[..., :1].transpose(-1, -2), dim=-1) @ v


def softmax_then_sum(q, k, v):  # probabilities not multiplied by v
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1).sum(-1, keepdim=True) * v


def log_softmax_scores(q, k, v):
    return torch.log_softmax(q @ k.transpose(-1, -2), dim=-1) @ v


@pytest.mark.parametrize("fn", [outer_product_scores, softmax_then_sum, log_softmax_scores])
@pytest.mark.parametrize("dynamic", [False, True])
def test_an_unmatched_softmax_over_scores_gets_a_record(fn, dynamic):
    records = []
    torch.compile(fn, backend=rewriting_backend(records), dynamic=dynamic, fullgraph=True)(*_qkv())
    assert len(records) == 1 and records[0].decision == "fallback", records
    assert "no attention pattern matched" in records[0].reason or records[0].pattern, records


def test_a_classifier_softmax_gets_none():
    def classify(x):
        return torch.softmax(x @ torch.ones(D, 3, dtype=x.dtype), dim=-1)

    records = []
    torch.compile(classify, backend=rewriting_backend(records), fullgraph=True)(torch.randn(B, D, dtype=torch.bfloat16))
    assert records == []


def test_unmatched_softmaxes_are_counted_where_the_compile_publishes():
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(outer_product_scores, fullgraph=True)(*_qkv())
    assert stats.counters["compile.fallback"] == 1
    (record,) = stats.site_records()
    assert record.target == "softmax" and record.location and "test_reporting.py" in record.location
