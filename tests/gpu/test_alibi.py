"""The ALiBi fa4 op on a GPU: FA4's score_mod adding ``slopes[h] * (j - i)``, forward and backward, against float64
attention with the bias written out (causal GQA and a window; one-row-constant equivalence means the reference may
use ``slopes[h] * j``)."""

from __future__ import annotations

import pytest
import torch

from tests.compare import band
from tests.gpu.common import _grads, _report, require_fa4_gpu

pytestmark = pytest.mark.gpu
require_fa4_gpu()


@pytest.mark.parametrize("causal, window, heads_kv", [(True, (-1, -1), 4), (False, (255, 0), 16)])
def test_alibi_op_equals_float64_with_the_bias_written_out(causal, window, heads_kv):
    torch.manual_seed(0)
    b, s, h, d = 2, 1024, 16, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, s, heads_kv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    slopes = -torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device="cuda")
    out, _ = torch.ops.fa4.flash_attn_alibi_fwd(q, k, v, slopes, d ** -0.5, causal, *window)
    q64, k64, v64 = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    group = h // heads_kv
    scores = q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2) * d ** -0.5
    scores = scores + slopes.double()[:, None, None] * torch.arange(s, device="cuda", dtype=torch.float64)
    keep = band(s, s, causal=causal, window=window).cuda()
    ref = (torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v64.repeat_interleave(group, 1))
    ref = ref.transpose(1, 2)
    dout = torch.randn_like(out)
    got = _grads(out, [q, k, v], dout)
    want = _grads(ref, [q64, k64, v64], dout.double())
    errors = [((g.double() - w).norm() / w.norm()).item() for g, w in zip([out, *got], [ref, *want])]
    _report(f"alibi_causal{causal}_window{window[0]}", rel_errors=errors)
    assert max(errors) < 2e-2, errors
