"""``fa4.flash_attn_data_mask`` on CPU: every mask, served by FA4's route or the dense one, gives SDPA's output
and gradients (float64 math as the judge), and the route taken is the verdict's."""

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor  # noqa: F401  (registers torch.ops.fa4)
from fa4_inductor import stats
from fa4_inductor.runtime import mask_verdict

B, H, HKV, SQ, SK, D = 2, 4, 2, 24, 40, 16


def _masks():
    i, j = torch.arange(SQ)[:, None], torch.arange(SK)[None, :]
    padding = torch.ones(B, 1, 1, SK, dtype=torch.bool)
    padding[1, ..., :9] = False
    causal = j <= i + (SK - SQ)
    return {"causal": (causal, True), "causal_padding": (causal & padding, True),
            "window_additive": (torch.zeros(SQ, SK).masked_fill(~(causal & (j >= i + 10)), float("-inf")), True),
            "random": (torch.rand(B, 1, SQ, SK) > 0.3, False),
            # an ALiBi given as data: a bias per head and key under the causal mask and the padding (FA4's key bias)
            "key_bias_causal_padding": (torch.where(causal & padding, -0.1 * torch.arange(1.0, H + 1).view(1, H, 1, 1)
                                                    * j, float("-inf")), True),
            "relative_bias": ((j - i).float() * -0.05, True),  # FA4's relative-bias op
            "bias": ((j * i).float() * -0.005, False)}


def _sdpa(q, k, v, mask, scale):
    """SDPA in float64 on B,H,S,D (GQA repeated), a bool mask as kept keys."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(H // HKV, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if mask.dtype == torch.bool else mask.double(),
                                          scale=scale).transpose(1, 2)


@pytest.mark.parametrize("name", list(_masks()))
def test_forward_and_backward_match_sdpa_on_the_route_the_verdict_takes(name):
    mask, served = _masks()[name]
    torch.manual_seed(0)
    q = torch.randn(B, SQ, H, D, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, SK, HKV, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    stats.reset()
    mask_verdict.CACHE.clear()
    out, _ = torch.ops.fa4.flash_attn_data_mask(q, k, v, mask, 0.25)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert stats.counters["data_mask.fa4" if served else "data_mask.pytorch"] == 2  # forward and backward
    assert stats.counters["data_mask.read"] == 1 and stats.counters["data_mask.remembered"] == 1
    want = _sdpa(q, k, v, mask, 0.25)
    want_grads = torch.autograd.grad(want, (q, k, v), dout.double())
    assert (out.double() - want).abs().max() < 2e-2
    for got, expected in zip(grads, want_grads):
        assert (got.double() - expected).abs().max() < 3e-2 * max(1.0, expected.abs().max().item())
