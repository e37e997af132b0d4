"""Padded and packed batches: compiled with the plugin equals eager at every position, forward and backward.

The masks are built in the graph the way model code builds them (key padding
looked up as ``pad[batch, kv_idx]``, documents as ``seg[batch, q_idx] ==
seg[batch, kv_idx]``, from segment ids given or derived from restarting
``position_ids``), and-ed with causal or a window. On CPU the ops run the
reference, which classifies tiles like FA4's block sparsity does, so a wrong
tile classification fails here too.
"""

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats
from tests.compare import assert_matches_eager

pytestmark = pytest.mark.usefixtures("no_compile_cache")

B, H, S, D = 3, 4, 100, 16


def _padding(kind: str) -> torch.Tensor:
    lengths = torch.tensor([S, 71, 9])
    idx = torch.arange(S)[None, :]
    if kind == "right":
        return idx < lengths[:, None]
    if kind == "left":
        return idx >= (S - lengths)[:, None]
    pad = torch.rand(B, S, generator=torch.Generator().manual_seed(1)) < 0.6
    pad[2] = False  # a row with no key at all: zeros, not NaN
    return pad


def _position_ids(documents: int = 4) -> torch.Tensor:
    """Restarting positions of ``documents`` packed sequences per row (a packing collator's output)."""
    generator = torch.Generator().manual_seed(documents)
    rows = []
    for _ in range(B):
        cuts = sorted(torch.randperm(S - 1, generator=generator)[: documents - 1].add(1).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, S])]
        rows.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(rows)


def _segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """A new document wherever the position does not continue the last one (Hugging Face's packed-mask rule)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


BANDS = {
    "none": lambda i, j: (j >= 0),
    "causal": lambda i, j: j <= i,
    "window": lambda i, j: (j <= i) & (j > i - 24),
}


def _qkv(hkv=H):
    torch.manual_seed(0)
    return (torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(B, hkv, S, D, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(B, hkv, S, D, dtype=torch.bfloat16, requires_grad=True))


def _compare(fn, inputs, extra, *, padding: bool, documents: bool):
    """Compile ``fn`` with the plugin; every output row and every gradient must match eager."""
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = assert_matches_eager(fn, torch.compile(fn, fullgraph=True), inputs, extra)
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    assert record.features["padding"] == padding and record.features["documents"] == documents
    assert not got.isnan().any()
    return record


@pytest.mark.parametrize("band", list(BANDS))
@pytest.mark.parametrize("kind", ["right", "left", "random"])
@pytest.mark.parametrize("hkv", [H, 2], ids=["mha", "gqa"])
def test_padded_batches_match_eager_at_every_position(band, kind, hkv):
    def fn(q, k, v, pad):
        b = torch.arange(q.shape[0])[:, None, None, None]
        i, j = torch.arange(q.shape[2])[None, None, :, None], torch.arange(k.shape[2])[None, None, None, :]
        mask = BANDS[band](i, j) & pad[b, j]
        if k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    record = _compare(fn, _qkv(hkv), (_padding(kind),), padding=True, documents=False)
    assert record.features["causal"] == (band == "causal")


@pytest.mark.parametrize("band", ["none", "causal"])
def test_key_lengths_become_key_padding(band):
    """Padding given as per-row lengths, ``kv_idx < lengths[:, None]``, as custom encoders and FlexAttention
    examples write it."""
    def fn(q, k, v, lengths):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=BANDS[band](i, j)[None, None] & (j[None, :] < lengths[:, None])[:, None, None, :])

    record = _compare(fn, _qkv(), (torch.tensor([S, 71, 9]),), padding=True, documents=False)
    assert record.features["causal"] == (band == "causal")


@pytest.mark.parametrize("band", ["none", "causal", "window"])
@pytest.mark.parametrize("source", ["segment_ids", "position_ids"])
def test_packed_documents_match_eager_at_every_position(band, source):
    def fn(q, k, v, ids):
        seg = _segments_from_positions(ids) if source == "position_ids" else ids
        b = torch.arange(q.shape[0])[:, None, None, None]
        i, j = torch.arange(q.shape[2])[None, None, :, None], torch.arange(k.shape[2])[None, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=BANDS[band](i, j) & (seg[b, i] == seg[b, j]))

    position_ids = _position_ids()
    ids = position_ids if source == "position_ids" else _segments_from_positions(position_ids)
    _compare(fn, _qkv(), (ids,), padding=False, documents=True)


@pytest.mark.parametrize("band", ["causal", "window"])
def test_packed_documents_banded_on_positions_match_eager_at_every_position(band):
    """transformers >= 5.23 evaluates a packed batch's causal or window part on the positions,
    ``pos[b, kv] <= pos[b, q]``, and-ed with documents derived from the same positions: within a document positions
    step as indices do, so the band is FA4's."""
    def fn(q, k, v, pos):
        seg = _segments_from_positions(pos)
        b = torch.arange(q.shape[0])[:, None, None, None]
        i, j = torch.arange(q.shape[2])[None, None, :, None], torch.arange(k.shape[2])[None, None, None, :]
        wide = pos.expand(q.shape[0], -1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=(seg[b, i] == seg[b, j]) & BANDS[band](wide[b, i], wide[b, j]))

    record = _compare(fn, _qkv(), (_position_ids(),), padding=False, documents=True)
    assert record.features["causal"] == (band == "causal")


@pytest.mark.parametrize("segments, band, reason", [
    ("given", lambda pi, pj: pj <= pi, "values of a tensor"),  # positions need not step within given segments
    ("derived", lambda pi, pj: (pj <= pi) & (pj < 5), "not a bound on kv_idx - q_idx"),  # one position alone
], ids=["given_segments", "bound_on_one_position"])
def test_position_bands_fa4_cannot_express_stay_pytorchs(segments, band, reason):
    def fn(q, k, v, pos, given):
        seg = given if segments == "given" else _segments_from_positions(pos)
        b = torch.arange(q.shape[0])[:, None, None, None]
        i, j = torch.arange(q.shape[2])[None, None, :, None], torch.arange(k.shape[2])[None, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(seg[b, i] == seg[b, j]) & band(pos[b, i], pos[b, j]))

    position_ids = _position_ids()
    inputs = (*_qkv(), position_ids, _segments_from_positions(position_ids))
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(fn)(*inputs)
    _assert_fallback_or_checked_at_run_time(reason, got, fn(*inputs))


@pytest.mark.parametrize("kind", ["right", "left"])
def test_documents_and_padding_together(kind):
    def fn(q, k, v, seg, pad):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=(seg[:, None, :, None] == seg[:, None, None, :]) & pad[:, None, None, :]
            & torch.ones(S, S, dtype=torch.bool).tril())

    seg = _segments_from_positions(_position_ids(3))
    _compare(fn, _qkv(), (seg, _padding(kind)), padding=True, documents=True)


def test_dynamic_lengths_keep_one_graph():
    """New lengths reuse the compiled graph: the tile counts are computed inside the op, not baked in."""
    def fn(q, k, v, pad):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & pad[:, None, None, :])

    torch._dynamo.utils.counters.clear()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        for length in (40, 77, 130):
            q, k, v = (torch.randn(2, 2, length, D, dtype=torch.bfloat16) for _ in range(3))
            pad = torch.arange(length)[None, :] < torch.tensor([[length], [length // 3]])
            torch.testing.assert_close(compiled(q, k, v, pad), fn(q, k, v, pad), atol=3e-2, rtol=3e-2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert all(r.decision == "fa4" for r in stats.site_records())


@pytest.mark.parametrize("build, reason", [
    (lambda seg, i, j: seg[:, None, :, None] <= seg[:, None, None, :], "values of a tensor"),
    (lambda seg, i, j: (seg[:, None, :, None] == seg[:, None, None, :]) | (j <= i), "not and-ed"),
], ids=["ordered_segments", "or_ed_documents"])
def test_document_masks_fa4_cannot_express_stay_pytorchs(build, reason):
    def fn(q, k, v, seg):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build(seg, i, j))

    inputs = (*_qkv(), _segments_from_positions(_position_ids()))
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(fn)(*inputs)
    _assert_fallback_or_checked_at_run_time(reason, got, fn(*inputs))


def _assert_fallback_or_checked_at_run_time(reason: str, got, want):
    """A mask that uses a tensor's values beyond what compile time models is read at run time (here its values are
    no band with padding: PyTorch's route); any other stays PyTorch's with ``reason``."""
    (record,) = stats.site_records()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    if reason == "values of a tensor":
        assert record.decision == "fa4" and record.features["mask"] == "data, checked at run time", record
        assert stats.counters["data_mask.pytorch"] == 1 and stats.counters["data_mask.fa4"] == 0
    else:
        assert record.decision == "fallback" and reason in record.reason, record.reason
