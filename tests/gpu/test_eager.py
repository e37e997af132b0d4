"""The eager override on a GPU: FA4 where it serves, PyTorch's kernel with a reason elsewhere."""

from __future__ import annotations
import pytest
import torch
import torch.nn.functional as F
import fa4_inductor
from fa4_inductor import stats
from tests.gpu.common import _attention_kernels, _kernel_names, _leaves, _report, require_fa4_gpu

pytestmark = pytest.mark.gpu
require_fa4_gpu()


def test_eager_override_runs_fa4_and_falls_back_with_reason():
    torch.manual_seed(0)
    q, k, v = (t.transpose(1, 2) for t in _leaves(*[(2, 1024, 8, 128)] * 3))
    stats.reset()
    with fa4_inductor.enabled(compile=False, eager=True):
        def step():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.sum().backward()
            return out
        names = _kernel_names(step)
        out = step()
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            dropped = _kernel_names(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    _report("eager_override", kernels=sorted(set(names)), dropout_kernels=sorted(set(dropped)),
            counters=dict(stats.counters), rel_err=((out.double() - ref).norm() / ref.norm()).item())
    assert stats.counters["eager.fa4"] >= 2
    assert not any(t in n for n in names for t in ("pytorch_flash", "flash_fwd_kernel")), names
    assert any("dropout" in r for (_, r) in stats.fallback_reasons), stats.fallback_reasons
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.skipif(torch.cuda.get_device_capability()[0] != 9, reason="an sm90 FA4 bug")
@pytest.mark.parametrize("head_dim", [16, 80])
def test_head_dims_fa4_sm90_backward_gets_wrong_fall_back_in_training_and_run_fa4_in_inference(head_dim):
    torch.manual_seed(0)
    q, k, v = _leaves(*[(2, 4, 300, head_dim)] * 3)
    attention = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), fullgraph=True)
    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        out = attention(q, k, v)
        grads = torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))
        trained = list(stats.site_records())
        with torch.no_grad():
            inferred = attention(q.detach(), k.detach(), v.detach())
    assert trained and all(r.decision != "fa4" and "PR #2896" in r.reason for r in trained), trained
    assert any(r.decision == "fa4" for r in stats.site_records()[len(trained):])
    ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), is_causal=True)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2
    assert ((inferred.double() - ref).norm() / ref.norm()).item() < 1e-2
    with pytest.raises((ValueError, RuntimeError), match="PR #2896"):
        fa4_out, _ = torch.ops.fa4.flash_attn_fwd(*(t.transpose(1, 2) for t in (q, k, v)), 0.25)
        fa4_out.sum().backward()


def test_eager_decoding_step_mask_runs_fa4_key_padding():
    """SDPA with a (B, 1, 1, S_kv) bool mask (a static-cache decoding step) runs FA4, not a stock kernel."""
    torch.manual_seed(0)
    q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 1, 1, 2048, dtype=torch.bool, device="cuda")
    mask[0, ..., 1500:] = False
    mask[1, ..., :300] = False
    stats.reset()
    with fa4_inductor.enabled(compile=False, eager=True):
        names = _kernel_names(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    _report("eager_decode_key_padding", kernels=sorted(set(_attention_kernels(names))), rel_err=rel)
    assert stats.counters["eager.fa4"] == 2 and stats.counters["eager.fallback"] == 0, stats.fallback_reasons
    assert any("flash_attncute" in n.lower() for n in names), names
    assert rel < 1e-2
