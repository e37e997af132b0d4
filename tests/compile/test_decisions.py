"""Decisions are typed values made without writing the graph; the pattern pass is built once.

Analysis (every pattern's ``analyze``) reads a graph and returns a frozen :class:`SiteDecision`; only emission
(:mod:`fa4_inductor.compile.emit`) writes. Checked by running the patterns with their rewrites switched off: the graph
must come out as it went in, with every site decided. The operands analysis reads through views it does not write
(kᵀ transposed back, a (B * H, S, D) ``bmm`` read as one head) are then written by emission, checked against eager.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats
from fa4_inductor.compile import rewrite, sites
from tests.compare import assert_matches_eager

pytestmark = pytest.mark.usefixtures("no_compile_cache")

B, H, S, D = 2, 4, 16, 16


def _causal_additive(dtype):
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    return torch.where(j <= i, 0.0, float("-inf")).to(dtype)


def sdpa_padded(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def permuted_key(q, k, v, keep):
    return (q @ k.permute(0, 1, 3, 2) * 0.25).softmax(-1) @ v


def bmm_three_d_mask(q, k, v, keep):
    q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
    scores = torch.bmm(q3, k3.transpose(1, 2)) * 0.25 + _causal_additive(q.dtype).expand(B * H, S, S)
    return torch.bmm(scores.softmax(-1), v3).view(B, H, S, D)


def bmm_permuted_key(q, k, v, keep):
    q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
    return torch.bmm((torch.bmm(q3, k3.permute(0, 2, 1)) * 0.25).softmax(-1), v3).view(B, H, S, D)


def unservable_mask(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.randn(S, S) > 0)


PROGRAMS = {"sdpa_padded": (sdpa_padded, True), "permuted_key": (permuted_key, True),
            "bmm_three_d_mask": (bmm_three_d_mask, True), "bmm_permuted_key": (bmm_permuted_key, True),
            "unservable_mask": (unservable_mask, False)}


def _inputs():
    torch.manual_seed(0)
    qkv = [torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, -5:] = False
    return qkv, keep


@pytest.mark.parametrize("name", PROGRAMS)
def test_analysis_writes_nothing(name, monkeypatch):
    """Every pattern with its rewrite switched off leaves the graph as Dynamo made it, and still decides the site."""
    fn, served = PROGRAMS[name]
    analysis_only = tuple(dataclasses.replace(p, rewrite=lambda match, decision: None)
                          for p in sites.registered_patterns())
    monkeypatch.setattr(rewrite, "registered_patterns", lambda: analysis_only)
    seen = []

    def backend(gm, example_inputs):
        before = str(gm.graph)
        records = rewrite.rewrite_graph(gm.graph, sites.RewriteContext(devices=("cpu",), publish=False))
        seen.append((before, str(gm.graph), records))
        return gm

    (q, k, v), keep = _inputs()
    torch.compile(fn, backend=backend, fullgraph=True)(q, k, v, keep)
    ((before, after, records),) = seen
    assert after == before
    assert [r.decision for r in records] == ["fa4" if served else "fallback"], records


@pytest.mark.parametrize("name", [n for n, (_, served) in PROGRAMS.items() if served])
def test_views_the_analysis_read_through_are_written_by_emission(name):
    fn, _ = PROGRAMS[name]
    (q, k, v), keep = _inputs()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(fn, torch.compile(fn, fullgraph=True), [q, k, v], (keep,))
    (record,) = stats.site_records()
    assert record.decision == "fa4", record
    assert record.features["causal"] == (name == "bmm_three_d_mask")


def test_a_per_row_three_d_bmm_mask_is_read_per_row():
    """A (B * H, S, S) mask whose rows differ (per head) is not one FA4 mask: the site stays, with a reason."""
    def per_row(q, k, v, keep):
        q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
        mask = torch.zeros(B * H, S, S, dtype=q.dtype)
        mask[0, :, -1] = float("-inf")
        return torch.bmm((torch.bmm(q3, k3.transpose(1, 2)) + mask).softmax(-1), v3).view(B, H, S, D)

    (q, k, v), keep = _inputs()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(per_row, torch.compile(per_row, fullgraph=True), [q, k, v], (keep,))
    (record,) = stats.site_records()
    assert record.decision == "fallback" and record.reason, record


def test_the_pattern_pass_is_built_once():
    (q, k, v), keep = _inputs()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(sdpa_padded, fullgraph=True)(q, k, v, keep)
        built = rewrite._pattern_pass.cache_info()
        torch.compile(permuted_key, fullgraph=True)(q, k, v, keep)
    after = rewrite._pattern_pass.cache_info()
    assert after.misses == built.misses and after.hits > built.hits


def test_decisions_are_frozen():
    params = sites.FA4Params(softmax_scale=0.25, causal=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.causal = False
    assert sites.FA4Params(softmax_scale=0.25).mask_sources == ()
