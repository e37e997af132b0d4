"""The spellings PyTorch's own Inductor promises to fuse (``torch/_inductor/fx_passes/fuse_attention.py``), each written
here from the construct its pattern describes, in the FA4-expressible form: dropout at p=0, masks built in the graph
(causal from ``arange``, key padding from a (B, S) 0/1 mask). Compiled with the plugin on CPU against eager, forward
and backward: every one runs FA4."""

import math

import pytest
import torch

import fa4_inductor
from fa4_inductor import stats
from tests.compare import assert_matches_eager

pytestmark = pytest.mark.usefixtures("no_compile_cache")

B, H, S, D = 2, 4, 24, 16
SCALE = math.sqrt(D)
F = torch.nn.functional


def _keep():
    """A (B, S) 0/1 attention mask as BERT-like models get it (a graph input): row 1 pads its last 7 keys."""
    keep = torch.ones(B, S, dtype=torch.int64)
    keep[1, S - 7:] = 0
    return keep


def _causal(length):
    i = torch.arange(length)
    return i[None, :] <= i[:, None]


def _bshd(*tensors):
    """(B, S, H, D) -> (B, H, S, D), as the patterns that take permuted inputs do."""
    return [t.permute(0, 2, 1, 3) for t in tensors]


def div_softmax(q, k, v, keep):  # patterns 1, 3 (dropout p=0), 11 and 12 on permuted inputs
    return torch.matmul(q, k.transpose(-2, -1)).div(SCALE).softmax(dim=-1).matmul(v)


def mul_softmax_dropout(q, k, v, keep):  # patterns 2, 4, 28
    return F.dropout(torch.matmul(q, k.transpose(-2, -1)).mul(1 / SCALE).softmax(dim=-1), p=0.0).matmul(v)


def additive_mask(q, k, v, keep):  # patterns 5, 6
    mask = torch.where(_causal(S), 0.0, float("-inf")).to(q.dtype)
    weights = torch.softmax((q @ k.transpose(-2, -1) / SCALE) + mask, dim=-1)
    return torch.dropout(weights, 0.0, True) @ v


def float32_softmax_half_cast(q, k, v, keep):  # patterns 7-10 (scale on the scores or on q)
    q, k, v = _bshd(q, k, v)
    scores = (q / SCALE) @ k.transpose(-2, -1)
    weights = torch.dropout(torch.softmax(scores.to(torch.float32), dim=-1), 0.0, True).to(torch.float16)
    return weights @ v.to(weights.dtype)


def bmm_heads_in_batch(q, k, v, keep):  # pattern 13, (B * H, S, D)
    q, k, v = (t.reshape(B * H, S, D) for t in (q, k, v))
    weights = F.dropout(torch.bmm(q * (1 / SCALE), k.transpose(1, 2)).softmax(dim=-1), p=0.0)
    return torch.bmm(weights, v)


def bert_extended_mask(q, k, v, keep):  # patterns 14, 16
    q, k, v = _bshd(q, k, v)
    mask = (1.0 - keep[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    scores = torch.matmul(q, k.transpose(-2, -1)).div(SCALE) + mask
    return F.dropout(scores.softmax(dim=-1), 0.0).to(dtype=q.dtype).matmul(v)


def distilbert(q, k, v, keep):  # patterns 15, 17
    q, k, v = _bshd(q, k, v)
    scores = (q @ k.transpose(-2, -1)).div(SCALE)
    hidden = (keep == 0).view((q.size(0), 1, 1, k.size(-2))).expand_as(scores)
    fill = torch.full((), -float("inf"), dtype=q.dtype, device=q.device)
    return F.dropout(torch.softmax(scores.masked_fill(hidden, fill), dim=-1), 0.0) @ v


def distilbert_scaled_query(q, k, v, keep):  # pattern 20
    q, k, v = _bshd(q, k, v)
    scores = q.div(SCALE) @ k.transpose(-2, -1)
    hidden = (keep == 0).view((q.size(0), 1, 1, k.size(-2))).expand_as(scores)
    return F.dropout(torch.softmax(scores.masked_fill(hidden, torch.full((), -float("inf"))), dim=-1), 0.0) @ v


def gpt2(q, k, v, keep):  # patterns 18, 19: scores kept where the causal mask is true, finfo.min elsewhere
    weights = torch.matmul(q, k.permute(0, 1, 3, 2))
    weights = weights.div(torch.full([], SCALE, dtype=weights.dtype, device=weights.device))
    weights = torch.where(_causal(S), weights, torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype))
    return F.dropout(weights.softmax(dim=-1).type(v.dtype), 0.0).matmul(v)


def t5(q, k, v, keep):  # patterns 21-27: no scale, float32 softmax, an additive mask
    q, k, v = _bshd(q, k, v)
    mask = torch.zeros(B, 1, S, S, dtype=q.dtype).masked_fill(~_causal(S), float("-inf"))
    score = torch.matmul(q, k.permute(0, 1, 3, 2)) + mask
    return F.dropout(score.type_as(q).float().softmax(dim=-1).type_as(q), 0.0).matmul(v)


def mbart_bmm(q, k, v, keep):  # pattern 24: (B * H, S, D) bmm with a (B, 1, S, S) mask added in 4-D
    mask = torch.where(_causal(S), 0.0, torch.finfo(torch.float32).min)[None, None]
    q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
    weights = torch.bmm(q3, k3.transpose(1, 2)).view(B, H, S, -1) + mask.to(q.dtype)
    weights = F.softmax(weights.view(B * H, S, -1), dim=-1)
    return torch.bmm(weights, v3).view(B, H, S, D)


def xglm_bmm(q, k, v, keep):  # pattern 24 as XGLM writes it: the masked scores clamped at finfo.min, p viewed 4-D/3-D
    mask = torch.where(_causal(S), 0.0, torch.finfo(torch.float32).min)[None, None]
    q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
    weights = torch.bmm(q3, k3.transpose(1, 2)).view(B, H, S, -1) + mask.to(q.dtype)
    weights = torch.max(weights, torch.full((), torch.finfo(q.dtype).min))
    weights = F.softmax(weights.view(B * H, S, -1), dim=-1)
    return torch.bmm(weights.view(B, H, S, -1).view(B * H, S, -1), v3).view(B, H, S, D)


def math_decomposition(q, k, v, keep):  # patterns 29, 30: the scale split as sqrt over q and k, aten._safe_softmax
    q, k, v = _bshd(q, k, v)
    root = 1 / math.sqrt(SCALE)
    weights = (torch.ops.aten.mul.Scalar(q, root) @ torch.ops.aten.mul.Scalar(k.transpose(-2, -1), root))
    weights = weights + torch.where(_causal(S), 0.0, float("-inf")).to(q.dtype)
    return torch.ops.aten._safe_softmax(weights, -1) @ v


# name: (program, dtype, causal, padding)
PROGRAMS = {
    "div_softmax": (div_softmax, torch.bfloat16, False, False),
    "mul_softmax_dropout": (mul_softmax_dropout, torch.bfloat16, False, False),
    "additive_mask": (additive_mask, torch.bfloat16, True, False),
    "float32_softmax_half_cast": (float32_softmax_half_cast, torch.float16, False, False),
    "bmm_heads_in_batch": (bmm_heads_in_batch, torch.bfloat16, False, False),
    "mbart_bmm": (mbart_bmm, torch.bfloat16, True, False),
    "xglm_bmm": (xglm_bmm, torch.bfloat16, True, False),
    "bert_extended_mask": (bert_extended_mask, torch.bfloat16, False, True),
    "distilbert": (distilbert, torch.bfloat16, False, True),
    "distilbert_scaled_query": (distilbert_scaled_query, torch.bfloat16, False, True),
    "gpt2": (gpt2, torch.bfloat16, True, False),
    "t5": (t5, torch.bfloat16, True, False),
    "math_decomposition": (math_decomposition, torch.bfloat16, True, False),
}
PERMUTED = {"float32_softmax_half_cast", "bert_extended_mask", "distilbert", "distilbert_scaled_query", "t5",
            "math_decomposition"}


@pytest.mark.parametrize("name", PROGRAMS)
def test_fuse_attention_spelling_runs_fa4_and_matches_eager(name):
    fn, dtype, causal, padding = PROGRAMS[name]
    shape = (B, S, H, D) if name in PERMUTED else (B, H, S, D)
    generator = torch.Generator().manual_seed(0)
    qkv = [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for _ in range(3)]
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(fn, torch.compile(fn, fullgraph=True), qkv, (_keep(),), label=name)
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    assert (record.features["causal"], record.features["padding"]) == (causal, padding)


def test_a_floor_on_the_scores_that_changes_them_keeps_the_site():
    """``max(scores, c)`` is XGLM's no-op only for ``c`` at or below -1e30 (a hidden key stays hidden); a higher floor
    changes the scores it raises: the site stays, with its reason."""
    def floored(q, k, v, keep):
        return F.softmax(torch.max(q @ k.transpose(-1, -2) / SCALE, torch.full((), -0.5)), dim=-1) @ v
    qkv = [torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(floored, torch.compile(floored, fullgraph=True), qkv, (_keep(),))
    (record,) = stats.site_records()
    assert record.decision == "fallback" and "not attention" in record.reason, record.reason
