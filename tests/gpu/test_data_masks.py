"""Masks given as data on a GPU: a causal + padding mask made outside the graph (and an ALiBi laid under it, FA4's
key-bias op) runs FA4's kernels (and no other attention kernel) once its verdict is remembered, within bf16 noise of
float64; a mask FA4 can't express runs
PyTorch's kernel; CUDA-graph capture takes PyTorch's route and replays right after the mask changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats
from fa4_inductor.runtime import mask_verdict
from tests.gpu.common import _attention_kernels, _kernel_names, _report, require_fa4_gpu

pytestmark = pytest.mark.gpu
require_fa4_gpu()

B, H, S, D = 2, 8, 1024, 128


def _inputs():
    torch.manual_seed(0)
    qkv = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    i, j = torch.arange(S, device="cuda")[:, None], torch.arange(S, device="cuda")[None, :]
    padding = torch.ones(B, 1, 1, S, dtype=torch.bool, device="cuda")
    padding[1, ..., : S // 3] = False
    return qkv, (j <= i) & padding


def _layer(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _relative(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def _alibi_under(mask: torch.Tensor) -> torch.Tensor:
    """An ALiBi per head and key under a kept-keys mask, -inf where it hides, in bf16 (B, H, S, S)."""
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device="cuda").view(1, H, 1, 1)
    alibi = slopes * torch.arange(S, device="cuda")
    return torch.where(mask, alibi, float("-inf")).to(torch.bfloat16)


@pytest.mark.parametrize("alibi", [False, True], ids=["causal_padding", "alibi_causal_padding"])
def test_a_causal_padding_mask_given_as_data_runs_fa4_kernels(alibi):
    (q, k, v), mask = _inputs()
    mask = _alibi_under(mask) if alibi else mask
    mask_verdict.CACHE.clear()
    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(eager=False):
        compiled = torch.compile(_layer, fullgraph=True)
        out = compiled(q, k, v, mask)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        names = _kernel_names(lambda: torch.autograd.grad(compiled(q, k, v, mask), (q, k, v), dout))
    assert [r.features.get("mask") for r in stats.site_records()] == ["data, checked at run time"]
    assert stats.counters["data_mask.pytorch"] == 0 and stats.counters["data_mask.read"] == 1
    attention = _attention_kernels(names)
    assert attention and all("flash" in n.lower() or "fmha" in n.lower() for n in attention), attention
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask if mask.dtype == torch.bool else mask.double())
    want_grads = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    bf16_grads = torch.autograd.grad(bf16, (q, k, v), dout)
    errors = [_relative(out, want)] + [_relative(g, w) for g, w in zip(grads, want_grads)]
    floors = [_relative(bf16, want)] + [_relative(g, w) for g, w in zip(bf16_grads, want_grads)]
    _report("data_mask_alibi_causal_padding" if alibi else "data_mask_causal_padding", errors=errors,
            bf16_errors=floors)
    assert all(e <= 3 * f + 1e-3 for e, f in zip(errors, floors)), (errors, floors)


def test_a_mask_fa4_does_not_express_runs_pytorchs_kernel():
    (q, k, v), _ = _inputs()
    mask = torch.rand(B, 1, S, S, device="cuda") > 0.2
    mask_verdict.CACHE.clear()
    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(eager=False), torch.no_grad():
        out = torch.compile(_layer, fullgraph=True)(q, k, v, mask)
    assert stats.counters["data_mask.pytorch"] == 1 and stats.counters["data_mask.fa4"] == 0
    torch.testing.assert_close(out, _layer(q, k, v, mask), atol=2e-2, rtol=2e-2)


def test_cuda_graphs_capture_pytorchs_route_and_replay_a_changed_mask_right():
    (q, k, v), mask = _inputs()
    mask_verdict.CACHE.clear()
    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(eager=False), torch.no_grad():
        compiled = torch.compile(_layer, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            compiled(q, k, v, mask)
        changed = mask.clone()
        changed[0, ..., 5] = True  # no band any more
        out = compiled(q, k, v, changed)
    torch.testing.assert_close(out, _layer(q, k, v, changed), atol=2e-2, rtol=2e-2)


def test_the_verdict_costs_little_beside_the_attention():
    """One read of a (B, 1, S, S) mask against the FA4 forward it guards; a remembered verdict costs no sync."""
    import triton.testing

    (q, k, v), mask = _inputs()
    fresh = triton.testing.do_bench(lambda: mask_verdict.verdict(mask, False, B, S, S), return_mode="median")
    cache = mask_verdict.VerdictCache()
    cache.verdict(mask, False, B, S, S)
    remembered = triton.testing.do_bench(lambda: cache.verdict(mask, False, B, S, S), return_mode="median")
    qb = q.detach().transpose(1, 2).contiguous()
    attention = triton.testing.do_bench(lambda: torch.ops.fa4.flash_attn_fwd_kernel(
        qb, qb, qb, D ** -0.5, True, -1, -1, 0.0, None, mask[:, 0, -1].contiguous(), None), return_mode="median")
    _report("data_mask_verdict_cost", fresh_ms=fresh, remembered_ms=remembered, fa4_forward_ms=attention)
    assert remembered < fresh
