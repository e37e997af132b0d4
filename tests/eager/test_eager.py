"""Eager override and the public enable/disable API (CPU routing to the reference)."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config

import fa4_inductor
from fa4_inductor.eager import override
from fa4_inductor.runtime import fa4_binding
from fa4_inductor import stats


def _qkv(dtype=torch.bfloat16, heads_kv=4):
    torch.manual_seed(0)
    shapes = [(2, 4, 9, 16), (2, heads_kv, 9, 16), (2, heads_kv, 9, 16)]
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def _sdpa_with_grads(q, k, v, **kwargs):
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    return out, grads


@pytest.mark.parametrize("kwargs", [dict(), dict(is_causal=True), dict(scale=0.3), dict(enable_gqa=True)], ids=str)
def test_eager_sdpa_routes_to_fa4_and_matches_stock(kwargs):
    q, k, v = _qkv(heads_kv=2 if kwargs.get("enable_gqa") else 4)
    want, want_grads = _sdpa_with_grads(q, k, v, **kwargs)
    with fa4_inductor.enabled(compile=False, devices=("cpu",)):
        got, got_grads = _sdpa_with_grads(q, k, v, **kwargs)
    assert stats.counters["eager.fa4"] == 1 and stats.counters["eager.fallback"] == 0
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 9), (1, 1, 9)], ids=str)
def test_eager_key_padding_mask_routes_to_fa4(mask_shape):
    """A bool mask varying along batch and keys only (a decoding step's) runs FA4 as key padding."""
    q, k, v = _qkv()
    mask = torch.ones(mask_shape, dtype=torch.bool)
    mask[..., :3] = False
    if len(mask_shape) == 4:
        mask[1, ..., 7:] = False
    want, want_grads = _sdpa_with_grads(q, k, v, attn_mask=mask)
    with fa4_inductor.enabled(compile=False, devices=("cpu",)):
        got, got_grads = _sdpa_with_grads(q, k, v, attn_mask=mask)
    assert stats.counters["eager.fa4"] == 1 and stats.counters["eager.fallback"] == 0
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=5e-2, rtol=5e-2)


def test_cuda_flash_op_on_cpu_runs_reference_or_says_why_not():
    """The aten flash pair (what context parallelism's ring calls per shard) has no stock CPU kernel; with
    CPU routed the override serves it, returning FA4's (B, H, S) lse, and raises with the reason otherwise."""
    q, k, v = (t.detach() for t in _qkv())
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    with fa4_inductor.enabled(compile=False, devices=("cpu",)):
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)
        with pytest.raises(NotImplementedError, match="dropout"):
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.5, True)
    assert stats.counters["eager.fa4._scaled_dot_product_flash_attention"] == 1
    assert stats.counters["eager.fallback._scaled_dot_product_flash_attention"] == 1
    assert out.shape == q.shape and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_eager_mask_with_is_causal_keeps_stock_error():
    q, k, v = _qkv()
    with fa4_inductor.enabled(compile=False, devices=("cpu",)), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(1, 1, 9, dtype=torch.bool), is_causal=True)
    assert stats.counters["eager.fa4"] == 0


@pytest.mark.parametrize("kwargs, dtype, reason", [
    (dict(dropout_p=0.3), torch.bfloat16, "dropout"),
    (dict(), torch.float32, "dtype torch.float32"),
    (dict(attn_mask=torch.ones(9, 9, dtype=torch.bool)), torch.bfloat16, "attn_mask"),
])
def test_eager_falls_back_with_reason(kwargs, dtype, reason):
    q, k, v = _qkv(dtype)
    with fa4_inductor.enabled(compile=False, devices=("cpu",)):
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.isfinite(out).all()
    assert stats.counters["eager.fa4"] == 0 and stats.counters["eager.fallback"] >= 1
    assert any(reason in r for (_, r) in stats.fallback_reasons), stats.fallback_reasons


def test_sdpa_kernel_restriction_is_respected():
    q, k, v = _qkv()
    with fa4_inductor.enabled(compile=False, devices=("cpu",)):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            F.scaled_dot_product_attention(q, k, v)
    assert any("sdpa_kernel" in r for (_, r) in stats.fallback_reasons)


def test_direct_aten_flash_call_is_overridden():
    q, k, v = (t.detach() for t in _qkv())
    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)
    with fa4_inductor.enabled(compile=False, devices=("cpu",)):
        got = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)
    assert stats.counters["eager.fa4"] == 1
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=2e-2)
    assert got[0].stride() == want[0].stride() and got[1].stride() == want[1].stride()


def test_direct_aten_flash_backward_call_gives_the_stock_kernels_layouts():
    """Compiled graphs assert the strides the stock kernel's meta promises (B,S,H,D memory on CPU)."""
    q, k, v = (t.detach() for t in _qkv())
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)[:2]
    args = (torch.randn_like(out), q, k, v, out, lse, 0.0, True)
    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args)
    with fa4_inductor.enabled(compile=False, devices=("cpu",)):
        got = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args)
    assert stats.counters["eager.fa4"] == 1
    for g, w in zip(got, want):
        assert g.stride() == w.stride()
        torch.testing.assert_close(g, w, atol=3e-2, rtol=3e-2)


def test_enable_disable_round_trip_restores_pytorch():
    q, k, v = _qkv()
    before = torch.library.get_kernel("aten::scaled_dot_product_attention", "AutogradCPU")
    user_pass = inductor_config.pre_grad_custom_pass
    timing = getattr(inductor_config, "pre_grad_pass_timing", None)  # torch >= 2.12
    for _ in range(3):
        assert fa4_inductor.enable(devices=("cpu",)) is True
        assert fa4_inductor.enable(devices=("cpu",)) is True  # idempotent
        assert inductor_config.pre_grad_custom_pass is not user_pass
        assert timing is None or inductor_config.pre_grad_pass_timing == "early"
        fa4_inductor.disable()
        fa4_inductor.disable()
        assert inductor_config.pre_grad_custom_pass is user_pass
        assert getattr(inductor_config, "pre_grad_pass_timing", None) == timing
    F.scaled_dot_product_attention(q, k, v)
    assert stats.counters["eager.fa4"] == 0
    after = torch.library.get_kernel("aten::scaled_dot_product_attention", "AutogradCPU")
    assert repr(before) == repr(after)


def test_a_stock_compile_after_the_override_keeps_its_gradients():
    """A compile traced through the override leaves PyTorch's Python dispatcher routing SDPA to the override's C++
    slot; once the override is gone that stale routing must not survive (it disconnected the gradients of the
    next stock compile)."""
    def fn(x, w1, w2):
        h = x
        for w in (w1, w2):
            q = (h @ w).view(2, 16, 4, 16).transpose(1, 2)
            h = h + F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(2, 16, 64)
        return h

    torch.manual_seed(0)
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    weights = [torch.randn(64, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]

    def grads(run):
        return torch.autograd.grad(run(x, *weights).float().square().sum(), weights)

    want = grads(fn)
    with inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        with fa4_inductor.enabled(compile=False, devices=("cpu",)):
            grads(torch.compile(fn))
        torch._dynamo.reset()
        got = grads(torch.compile(fn))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-2 * w.abs().max().item(), rtol=0)


def test_enabled_context_restores_previous_settings():
    fa4_inductor.enable(compile=False, devices=("cpu",))
    with fa4_inductor.enabled(compile=True, eager=False, devices=("cpu",)):
        assert fa4_inductor.settings() == fa4_inductor.Settings(True, False, ("cpu",))
    assert fa4_inductor.settings() == fa4_inductor.Settings(False, True, ("cpu",))


def test_enable_is_thread_safe():
    errors = []

    def toggle():
        try:
            for _ in range(20):
                fa4_inductor.enable(devices=("cpu",))
                fa4_inductor.disable()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=toggle) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and fa4_inductor.settings() is None


def test_without_fa4_cuda_only_enable_warns_once_and_changes_nothing(monkeypatch, caplog):
    monkeypatch.setattr(fa4_binding, "unavailable_reason", lambda: "flash-attn-4 is not importable (test)")
    monkeypatch.setattr(fa4_inductor.api, "_warned_unavailable", False)
    pass_before = inductor_config.pre_grad_custom_pass
    with caplog.at_level("WARNING", logger="fa4_inductor"):
        assert fa4_inductor.enable() is False
        assert fa4_inductor.enable() is False
    assert sum("not importable" in r.message for r in caplog.records) == 1
    assert fa4_inductor.settings() is None and inductor_config.pre_grad_custom_pass is pass_before


def test_unknown_device_is_a_value_error():
    with pytest.raises(ValueError, match="unknown"):
        fa4_inductor.enable(devices=("tpu",))


def test_registered_in_pytorch_flash_registry():
    assert override.REGISTRY_NAME in torch.nn.attention.list_flash_attention_impls()
