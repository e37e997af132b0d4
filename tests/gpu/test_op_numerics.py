"""FA4's ops against a float64 reference: every mask and feature, block-sparse replays, split-KV decoding."""

from __future__ import annotations
import math
import pytest
import torch
from fa4_inductor.runtime import fa4_call, fa4_binding, mask_routes
from tests.gpu.common import WARM_CALLS, _grads, _key_padding, _leaves, _math_attention, _report, _segment_ids, require_fa4_gpu

pytestmark = pytest.mark.gpu
require_fa4_gpu()


CASES = [
    dict(d=64, causal=False), dict(d=128, causal=True), dict(d=128, causal=False, hkv=2),
    dict(d=64, window=(64, 0)), dict(d=128, window=(32, 16)), dict(d=128, softcap=30.0, causal=True),
    dict(d=256, causal=True),
    dict(d=128, causal=True, padding="left"), dict(d=128, hkv=2, padding="right"),
    dict(d=64, window=(64, 0), hkv=2, padding="left"),
    dict(d=128, hkv=2, sq=1), dict(d=128, hkv=2, sq=1, padding="left"),  # decoding steps
    # Block-sparse masks: lengths that are no multiple of FA4's tiles, random padding with an empty row, documents.
    dict(d=128, causal=True, padding="random", s=1000), dict(d=64, hkv=2, padding="left", causal=True, s=1000),
    dict(d=128, causal=True, documents=4, s=1000), dict(d=128, hkv=2, documents=3, padding="right", s=777),
    dict(d=64, window=(100, 0), documents=5, s=1000),
]


def _op_against_fp64(case: dict) -> dict:
    """Run the fa4 op forward and backward on random inputs for ``case``; assert it is as close to an fp64
    reference as bf16 math is; return the errors."""
    b, s, h, d = 2, case.get("s", 512), 8, case["d"]
    hkv, sq = case.get("hkv", h), case.get("sq", s)
    q, k, v = _leaves((b, sq, h, d), (b, s, hkv, d), (b, s, hkv, d))
    scale = 1 / math.sqrt(d)
    window = case.get("window", (-1, -1))
    key_padding = _key_padding(b, s, case.get("padding"))
    segment_ids = _segment_ids(b, s, case.get("documents"))
    params = dict(scale=scale, causal=case.get("causal", False), window=window, softcap=case.get("softcap", 0.0),
                  key_padding=key_padding, segment_ids=segment_ids)
    out, lse = torch.ops.fa4.flash_attn_fwd(q, k, v, scale, params["causal"], window[0], window[1], params["softcap"],
                                           key_padding=key_padding, segment_ids=segment_ids)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, k, v), dout)
    ref = _math_attention(q, k, v, torch.float64, **params)
    ref_grads = _grads(ref, (q, k, v), dout.double())
    low = _math_attention(q, k, v, torch.bfloat16, **params)
    low_grads = _grads(low, (q, k, v), dout)
    errors = {}
    for name, got, want, lowp in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), (low, *low_grads)):
        err = (got.double() - want).abs().max().item()
        err_low = (lowp.double() - want).abs().max().item()
        rel = ((got.double() - want).norm() / want.norm()).item()
        errors[name] = dict(max_err=err, bf16_math_max_err=err_low, rel_err=rel)
        assert math.isfinite(err) and not got.isnan().any()
        assert err <= 3 * err_low + 1e-3, (name, err, err_low)
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    return errors


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fa4_op_matches_fp64_reference(case):
    torch.manual_seed(0)
    _report("fa4_vs_fp64", case=case, errors=_op_against_fp64(case))


@pytest.mark.parametrize("case", [dict(d=128, causal=True, padding="left", s=1000),
                                  dict(d=128, hkv=2, documents=3, padding="right", s=777),
                                  dict(d=64, padding="random", window=(100, 0), s=4096),
                                  dict(d=128, hkv=2, padding="right")],  # small padding-only: mask_mod, no lists
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_block_sparse_calls_replay_their_launch_plans_exactly(case, monkeypatch):
    """A second call with new padding / documents and the same shapes skips FA4's entry points and the masking
    keywords (its buffer is made anew, cut at the views learned, the kernels replayed) and still matches fp64.
    The first three cases run block sparsity, the last the mask_mod on every tile."""
    torch.manual_seed(1)
    for _ in range(WARM_CALLS):
        _op_against_fp64(case)
    entered = []
    for module, name in ((fa4_binding, "flash_forward"), (fa4_binding, "flash_backward"), (mask_routes, "fa4_masking")):
        monkeypatch.setattr(module, name, lambda *args, _name=name, _real=getattr(module, name), **kwargs: (
            entered.append(_name), _real(*args, **kwargs))[1])
    errors = _op_against_fp64(case)
    assert entered == [], "a replayable block-sparse call went through FA4's entry point or made its keywords"
    _report("block_sparse_replay_vs_fp64", case=case, errors=errors)


@pytest.mark.parametrize("batch, padded, seqlen_k", [(1, False, 4096), (1, True, 4096), (2, True, 4096),
                                                     (1, True, 4095)])  # 4095: chunks end in a partial key tile
def test_split_kv_decoding_matches_fp64_reference(batch, padded, seqlen_k):
    """sm90 decoding steps run split-KV (chunks of a (B, H, S, D) cache as extra KV heads, merged by lse):
    output, lse and gradients (FA4's backward on the merged lse) match float64."""
    torch.manual_seed(0)
    heads, heads_kv, d = 32, 8, 128
    q = torch.randn(batch, 1, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cache_k, cache_v = (torch.randn(batch, heads_kv, seqlen_k, d, device="cuda", dtype=torch.bfloat16)
                        .requires_grad_(True) for _ in range(2))
    k, v = cache_k.transpose(1, 2), cache_v.transpose(1, 2)
    key_padding = None
    if padded:
        key_padding = torch.ones(batch, seqlen_k, dtype=torch.bool, device="cuda")
        key_padding[:, 3000:] = False  # unfilled cache tail: whole chunks see no key
        key_padding[0, :100] = False  # left padding
    scale = d ** -0.5
    params = dict(softmax_scale=scale, causal=False, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None,
                  key_padding=key_padding)
    splits = fa4_call.split_count(q, k, v, params) if torch.cuda.get_device_capability()[0] == 9 else 1
    out, lse = torch.ops.fa4.flash_attn_fwd(q, k, v, scale, key_padding=key_padding)
    dout = torch.randn_like(out)
    grads = _grads(out, (q, cache_k, cache_v), dout)
    ref = _math_attention(q, k, v, torch.float64, scale=scale, key_padding=key_padding)
    ref_grads = _grads(ref, (q, cache_k, cache_v), dout.double())
    low = _math_attention(q, k, v, torch.bfloat16, scale=scale, key_padding=key_padding)
    low_grads = _grads(low, (q, cache_k, cache_v), dout)
    errors = {}
    for name, got, want, lowp in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), (low, *low_grads)):
        err, err_low = (got.double() - want).abs().max().item(), (lowp.double() - want).abs().max().item()
        errors[name] = dict(max_err=err, bf16_math_max_err=err_low)
        assert err <= 3 * err_low + 1e-3, (name, err, err_low)
    s = (q.double().transpose(1, 2) @ k.double().repeat_interleave(4, 2).permute(0, 2, 3, 1)) * scale
    if padded:
        s = s.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    lse_err = (lse.double() - torch.logsumexp(s, dim=-1)).abs().max().item()
    _report("split_kv_decoding", batch=batch, padded=padded, seqlen_k=seqlen_k, splits=splits, errors=errors,
            lse_max_err=lse_err)
    assert splits > 1 or torch.cuda.get_device_capability()[0] != 9
    assert lse_err < 1e-2
