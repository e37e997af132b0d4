"""Mask spellings read at compile time, on a GPU: fixed blocks (FA4 documents from ``arange(S) // c``), meta-llama's
chunk after a cache (bottom-right causal over a longer key sequence) and a learned temperature per head (written into
q), trained on FA4 kernels; outputs and gradients against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats
from tests.gpu.common import FA2_OR_CUDNN, _attention_kernels, _grads, _kernel_names, _leaves, _report, require_fa4_gpu

pytestmark = pytest.mark.gpu
require_fa4_gpu()

B, H, S, D, CACHED, BLOCK = 2, 8, 1024, 128, 256, 128


def fixed_blocks(q, k, v):
    i, j = torch.arange(q.shape[2], device=q.device)[:, None], torch.arange(k.shape[2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i // BLOCK) == (j // BLOCK))


def meta_llama_chunk(q, k, v):
    start_pos = k.shape[2] - q.shape[2]
    mask = torch.full((q.shape[2], q.shape[2]), float("-inf"), device=q.device).triu(1)
    mask = torch.hstack([torch.zeros((q.shape[2], start_pos), device=q.device), mask]).type_as(q)
    scores = torch.matmul(q, k.transpose(2, 3)) / D ** 0.5 + mask
    return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v)


def head_temperature(q, k, v, temperature):
    return ((q @ k.transpose(-2, -1)) * temperature).softmax(-1).to(v.dtype) @ v


def _visible(q_len, kv_len, program, device):
    i, j = torch.arange(q_len, device=device)[:, None], torch.arange(kv_len, device=device)[None, :]
    if program is fixed_blocks:
        return (i // BLOCK) == (j // BLOCK)
    return j - i <= kv_len - q_len  # bottom-right causal; the temperature program has no mask: all kept there


@pytest.mark.parametrize("program", [fixed_blocks, meta_llama_chunk, head_temperature], ids=lambda p: p.__name__)
def test_mask_spelling_trains_on_fa4(program):
    torch.manual_seed(0)
    kv_len = S + CACHED if program is meta_llama_chunk else S
    q, k, v = _leaves((B, H, S, D), (B, H, kv_len, D), (B, H, kv_len, D))
    extra = []
    if program is head_temperature:
        extra = [(D ** -0.5 * (1 + 0.1 * torch.arange(H, device="cuda"))).view(H, 1, 1).requires_grad_()]
    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(program, fullgraph=True)
        out = compiled(q, k, v, *extra)
        names = _kernel_names(lambda: compiled(q, k, v, *extra).float().square().mean().backward())
    dout = torch.randn_like(out)
    got = _grads(out, [q, k, v, *extra], dout)
    q64, k64, v64, *extra64 = (t.detach().double().requires_grad_() for t in (q, k, v, *extra))
    if program is head_temperature:
        ref = F.softmax(q64 @ k64.transpose(-1, -2) * extra64[0], dim=-1) @ v64
    else:
        ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=_visible(S, kv_len, program, "cuda"))
    want = _grads(ref, [q64, k64, v64, *extra64], dout.double())
    errors = [((g.double() - w).norm() / w.norm()).item() for g, w in zip([out, *got], [ref, *want])]
    _report(f"mask_spelling_{program.__name__}", rel_errors=errors, kernels=sorted(set(_attention_kernels(names))))
    assert [r.decision for r in stats.site_records()] == ["fa4"], [r.reason for r in stats.site_records()]
    assert not any(t in n.lower() for n in names for t in FA2_OR_CUDNN if "cute" not in n.lower()), names
    assert max(errors) < 2e-2, errors
