"""In-place writes: no rewrite reads a value the graph changes in place (fa4_inductor.compile.graph_mutations).

Each mask form the plugin accepts, spelled with in-place ops, either runs FA4
(where the write is applied exactly) or falls back saying which write; either
way the compiled program equals eager, forward and backward.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats
from tests.compare import assert_matches_eager

pytestmark = pytest.mark.usefixtures("no_compile_cache")

B, H, S, D = 2, 4, 40, 16
NEG = float("-inf")


def _qkv():
    torch.manual_seed(0)
    return tuple(torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))


def _padding():
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :13] = False  # row 1 left-padded
    return pad


def _idx():
    return torch.arange(S)[:, None], torch.arange(S)[None, :]


def _eager(q, k, v, bias=None, hides=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    if bias is not None:
        scores = scores + bias
    if hides is not None:
        scores = scores.masked_fill(hides, NEG)
    return scores.softmax(-1) @ v


def _timm(q, k, v, pad):
    """timm's Attention (fused_attn=False) with a boolean key mask: its bias built in place."""
    mask = pad[:, None, None, :]
    bias = torch.zeros_like(mask, dtype=q.dtype)
    bias.masked_fill_(~mask, NEG)
    attn = (q * D ** -0.5) @ k.transpose(-2, -1)
    attn = attn + bias
    return attn.softmax(dim=-1) @ v


def _zeros_masked_fill_(q, k, v, pad):
    bias = torch.zeros(B, 1, 1, S, dtype=q.dtype)
    bias.masked_fill_(~pad[:, None, None, :], NEG)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _full_triu_(q, k, v, pad):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.full((S, S), NEG, dtype=q.dtype).triu_(1))


def _ones_tril_(q, k, v, pad):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(S, S, dtype=torch.bool).tril_())


def _bool_iand(q, k, v, pad):
    i, j = _idx()
    mask = j <= i
    mask = mask & pad[:, None, None, :]
    mask &= torch.ones(S, S, dtype=torch.bool)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _additive_iadd(q, k, v, pad):
    i, j = _idx()
    bias = torch.where(j <= i, 0.0, NEG).to(q.dtype)[None, None]
    bias = bias + torch.zeros(B, 1, 1, S, dtype=q.dtype)
    bias += torch.where(pad, 0.0, NEG).to(q.dtype)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _scores_iadd(q, k, v, pad):
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    scores += torch.where(pad, 0.0, NEG).to(q.dtype)[:, None, None, :]
    return scores.softmax(-1) @ v


def _scores_masked_fill_(q, k, v, pad):
    i, j = _idx()
    return (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill_(j > i, NEG).softmax(-1) @ v


def _copy_(q, k, v, pad):
    mask = torch.empty(S, S, dtype=torch.bool)
    mask.copy_(torch.ones(S, S, dtype=torch.bool).tril())
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# name: (program, features of its FA4 call)
APPLIED = {
    "timm_zeros_like_masked_fill_": (_timm, dict(causal=False, padding=True)),
    "zeros_masked_fill_": (_zeros_masked_fill_, dict(causal=False, padding=True)),
    "full_triu_": (_full_triu_, dict(causal=True, padding=False)),
    "ones_tril_": (_ones_tril_, dict(causal=True, padding=False)),
    "bool_iand": (_bool_iand, dict(causal=True, padding=True)),
    "additive_iadd": (_additive_iadd, dict(causal=True, padding=True)),
    "scores_iadd": (_scores_iadd, dict(causal=False, padding=True)),
    "scores_masked_fill_": (_scores_masked_fill_, dict(causal=True, padding=False)),
    "copy_": (_copy_, dict(causal=True, padding=False)),
}


def _compile_and_compare(fn, grads=True):
    """Compile ``fn`` with the plugin; outputs (and gradients, with ``grads``) must equal eager's."""
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(fn, fullgraph=True)
        if grads:
            assert_matches_eager(fn, compiled, _qkv(), (_padding(),))
        else:
            with torch.no_grad():
                torch.testing.assert_close(compiled(*_qkv(), _padding()), fn(*_qkv(), _padding()), atol=3e-2, rtol=3e-2)
    (record,) = stats.site_records()
    return record


@pytest.mark.parametrize("name", list(APPLIED))
def test_in_place_spellings_of_accepted_masks_run_fa4_exactly(name):
    fn, features = APPLIED[name]
    record = _compile_and_compare(fn)
    assert record.decision == "fa4", record.reason
    assert {key: record.features[key] for key in features} == features


def _scores_written_after_read(q, k, v, pad):
    attn = q @ k.transpose(-2, -1) / math.sqrt(D)
    attn.masked_fill_(~pad[:, None, None, :], NEG)  # the softmax below reads attn: the write is not a visible input
    return attn.softmax(-1) @ v


def _bias_written_through_a_view(q, k, v, pad):
    bias = torch.zeros(B, 1, 1, S, dtype=q.dtype)
    bias[:, :, :, :5] = NEG
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _key_written_after_its_repeat(q, k, v, pad):
    k = k * 1.0
    repeated = k[:, :2].repeat_interleave(2, dim=1)
    k.mul_(2.0)  # the rewrite would read k at the attention, after this
    return F.scaled_dot_product_attention(q, repeated, v[:, :2].repeat_interleave(2, dim=1))


def _query_written_after_the_scores(q, k, v, pad):
    q = q * 1.0
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    q.add_(1.0)
    return scores.softmax(-1) @ v + q


def _mask_input_written_after_its_lookup(q, k, v, pad):
    pad = pad.clone()
    i, j = _idx()
    b = torch.arange(B)[:, None, None, None]
    mask = pad[b, j[None, None]] & (j <= i)
    pad[:, :3] = False  # after the mask read it
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) + pad.sum()


# name: (program, what the reason says)
MISSED = {
    "scores_written_after_read": (_scores_written_after_read, "written in place (masked_fill_"),
    "bias_written_by_setitem": (_bias_written_through_a_view, "written in place by setitem"),
    "key_written_after_its_repeat": (_key_written_after_its_repeat, "written in place (mul_"),
    "query_written_after_the_scores": (_query_written_after_the_scores, "written in place (add_"),
    "mask_input_written_after_its_lookup": (_mask_input_written_after_its_lookup, "written in place (setitem"),
}


@pytest.mark.parametrize("name", list(MISSED))
def test_sites_whose_rewrite_would_miss_a_write_fall_back_and_stay_exact(name):
    fn, reason = MISSED[name]
    record = _compile_and_compare(fn, grads=name != "query_written_after_the_scores")  # autograd refuses that write
    assert record.decision == "fallback" and reason in record.reason, record.reason


def test_sdpa_with_a_padding_mask_and_is_causal_applies_both_or_stays_where_torch_refuses_them():
    """torch 2.13 applies ``attn_mask`` and ``is_causal`` together, and so must the rewrite; torch 2.15 raises, and
    the site stays as written (raising just as it does without the plugin)."""
    def fn(q, k, v, pad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :], is_causal=True)

    try:
        fn(*_qkv(), _padding())
    except RuntimeError:  # torch refuses the pair; so does Dynamo's tracing, before anything reaches the rewrite
        with fa4_inductor.enabled(eager=False, devices=("cpu",)), pytest.raises(Exception, match="is_causal"):
            torch.compile(fn, fullgraph=True)(*_qkv(), _padding())
        assert not [r for r in stats.site_records() if r.decision == "fa4"]
        return
    record = _compile_and_compare(fn)
    assert record.decision == "fa4" and record.features["causal"] and record.features["padding"]
    window = _compile_and_compare_window()
    assert window.decision == "fa4" and window.features["window"] == (5, 0)


def _compile_and_compare_window():
    stats.reset()
    torch._dynamo.reset()

    def fn(q, k, v, pad):
        i, j = _idx()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j >= i - 5) & (j <= i + 3), is_causal=True)

    return _compile_and_compare(fn)
