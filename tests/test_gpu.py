"""GPU tests: real FA4 kernels on sm90+ (skipped without a GPU and FA4).

Numerics follow PyTorch's flash-attention tests: FA4's error against a
float64 reference must stay within a small multiple of the error of the
same math done in bf16. Results are also written to $FA4_GPU_RESULTS (JSON
lines) when set, for the closing notes.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from examples.attention_block import AttentionBlock
from fa4_inductor.runtime import fa4_call, fa4_binding, launch_plan, mask_routes, native
from fa4_inductor import stats
from fa4_inductor.runtime.reference import visible_keys

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or fa4_binding.unavailable_reason():
    pytest.skip("needs a CUDA GPU and flash-attn-4", allow_module_level=True)
if torch.cuda.get_device_capability()[0] not in fa4_binding.SUPPORTED_ARCH_MAJORS:
    pytest.skip("FA4 needs sm90/sm100", allow_module_level=True)

FA2_OR_CUDNN = ("pytorch_flash", "flash_fwd_kernel", "flash_bwd", "cudnn", "fmha_cutlass", "efficient")


def _report(name: str, **values) -> None:
    path = os.environ.get("FA4_GPU_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **values}) + "\n")


def _math_attention(q, k, v, dtype, *, scale, causal=False, window=(-1, -1), softcap=0.0, key_padding=None,
                    segment_ids=None):
    """B,S,H,D attention in ``dtype`` with autograd (the bf16 / fp64 yardsticks); empty rows give zeros."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = visible_keys(q.shape[0], q.shape[1], k.shape[1], causal=causal, window_left=window[0],
                           window_right=window[1], seqused_k=None, device=q.device, key_padding=key_padding,
                           segment_ids=segment_ids)
    empty = ~visible.any(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return (p @ vh).transpose(1, 2)


def _math_logsumexp(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0, key_padding=None,
                    segment_ids=None):
    """B,H,S logsumexp of the scaled (soft-capped) visible scores of B,S,H,D inputs, in fp64."""
    q, k = (t.double().transpose(1, 2) for t in (q, k))
    s = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = visible_keys(q.shape[0], q.shape[2], k.shape[2], causal=causal, window_left=window[0],
                           window_right=window[1], seqused_k=None, device=q.device, key_padding=key_padding,
                           segment_ids=segment_ids)
    return s.masked_fill(~visible, float("-inf")).logsumexp(-1).float()


def _leaves(*shapes, dtype=torch.bfloat16):
    return [torch.randn(s, device="cuda", dtype=dtype).requires_grad_(True) for s in shapes]


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


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


def _key_padding(b, s, side):
    """Batch row 1 padded on ``side`` (a quarter of its keys), row 0 full; "random": row 0 random, row 1 empty;
    None without padding."""
    if side is None:
        return None
    if side == "random":
        pad = torch.rand(b, s, device="cuda") < 0.5
        pad[1] = False
        return pad
    pad = torch.ones(b, s, dtype=torch.bool, device="cuda")
    pad[1, : s // 4] = side != "left"
    pad[1, -(s // 4):] = side == "left"
    return pad


def _segment_ids(b, s, documents):
    """Sorted ids of ``documents`` packed sequences per row, at random cut points; None without documents."""
    if not documents:
        return None
    cuts = torch.sort(torch.randint(1, s, (b, documents - 1), device="cuda"), dim=1).values
    return (torch.arange(s, device="cuda")[None, None, :] >= cuts[:, :, None]).sum(dim=1)


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


# Calls until a call signature replays its trusted plan: one that compiles FA4's kernels (not learned from), one that
# learns, one whose replay is checked against FA4's own call.
WARM_CALLS = 3


def _steady(step):
    """``step`` after :data:`WARM_CALLS` calls: what it launches from now on is what every later call launches."""
    for _ in range(WARM_CALLS):
        result = step()
    return result


def _kernel_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _attention_kernels(names):
    return [n for n in names if any(t in n.lower() for t in ("flash", "fmha", "attention", "cudnn"))]


@pytest.mark.parametrize("heads_kv, causal, window", [(8, False, -1), (2, True, -1), (8, False, 1500)])
def test_launch_plan_replays_are_bitwise_fa4(heads_kv, causal, window):
    """Each call signature's plan is learned, checked against FA4 on its first replay, then replayed, with FA4's
    own results bit for bit at every step (a window longer than some sequences: FA4 4.0.0b40 clamps it to the
    length it launches with)."""
    params = dict(softmax_scale=0.1, causal=causal, window_left=window, window_right=-1 if window < 0 else 0,
                  softcap=0.0, seqused_k=None)
    fa4_call.forward_plans().clear()
    stats.reset()
    for seqlen in (1000, 2048, 3001):
        q = torch.randn(2, seqlen, 8, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, seqlen, heads_kv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            out, lse = fa4_call.forward(q, k, v, **params)
            ref_out, ref_lse = (torch.empty_like(out), torch.empty_like(lse))
            fa4_call._fa4_forward(q, k, v, ref_out, ref_lse, **params)
            assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    plans = fa4_call.forward_plans()
    assert len(plans.keys()) == 3 and all(plans.get(key) for key in plans.keys())
    assert stats.counters["plans.checked"] == 3 and not stats.counters["plans.check_failed"], dict(stats.counters)


def _behind_slow_work_on_a_side_stream(call):
    """``call()`` on a side stream behind slow work, its input made there first (``call`` makes it): a launcher
    that used another stream would race that input. Returns what ``call`` returns, synchronized back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):
            busy = busy @ busy
        result = call()
    torch.cuda.current_stream().wait_stream(side)
    return result


@pytest.mark.parametrize("heads_kv, causal, seqused", [(8, False, False), (2, True, False), (8, False, True)])
def test_native_launcher_replays_bitwise_on_the_current_stream(heads_kv, causal, seqused):
    """The op's C++ kernel: a planned signature launches FA4's kernel from C++, with FA4's own results
    bit for bit, on the caller's stream. (FA4 4.0.0b40 allocates a workspace per ``seqused_k`` call: that plan
    replays from Python, with a fresh workspace.)"""
    assert native.PLANS.enabled, native.load()
    q = torch.randn(2, 700, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 700, heads_kv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seqused_k = torch.tensor([300, 700], device="cuda", dtype=torch.int32) if seqused else None
    params = dict(softmax_scale=0.1, causal=causal, window_left=-1, window_right=-1, softcap=0.0, seqused_k=seqused_k)
    before = native.PLANS.count()
    for _ in range(WARM_CALLS):  # learns the plan through Python, then checks it against FA4's own call
        torch.ops.fa4.flash_attn_fwd_kernel(q, k, v, *params.values())
    planned = native.PLANS.count()
    out, lse = _behind_slow_work_on_a_side_stream(
        lambda: torch.ops.fa4.flash_attn_fwd_kernel(q * 1.0, k, v, *params.values()))
    ref_out, ref_lse = torch.empty_like(out), torch.empty_like(lse)
    fa4_call._fa4_forward(q, k, v, ref_out, ref_lse, **params)
    sequence = fa4_call.forward_plans().get(launch_plan.call_signature(q, k, v, *params.values()))
    assert sequence, "no trusted plan"
    assert native.PLANS.count() == planned == before + (sequence.single() is not None)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize("heads_kv, causal, layout, deterministic",
                         [(8, False, "bshd", True), (2, True, "bhsd", True), (2, True, "bshd", False)])
def test_native_backward_replays_fa4s_gradients_on_the_current_stream(heads_kv, causal, layout, deterministic):
    """The backward op's C++ kernel: a checked launch sequence runs FA4's three kernels from C++ on fresh scratch,
    with FA4's own gradients (bit for bit where deterministic, else within atomic-add reordering), in the layout
    the Python kernel gives, on the caller's stream."""
    assert native.BACKWARD_PLANS.enabled, native.load()
    params = dict(softmax_scale=0.1, causal=causal, window_left=-1, window_right=-1, softcap=0.0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        def leaf(heads):
            if layout == "bhsd":  # B,S,H,D views of B,H,S,D memory, as a model's transposes give
                return torch.randn(2, heads, 900, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            return torch.randn(2, 900, heads, 128, device="cuda", dtype=torch.bfloat16)

        q, k, v = leaf(8), leaf(heads_kv), leaf(heads_kv)
        out, lse = torch.ops.fa4.flash_attn_fwd_kernel(q, k, v, *params.values())
        dout = torch.randn_like(out)
        before = native.BACKWARD_PLANS.count()
        for _ in range(WARM_CALLS):  # learns the sequence through Python, then checks it against FA4's own call
            torch.ops.fa4.flash_attn_bwd(dout, q, k, v, out, lse, *params.values())
        assert native.BACKWARD_PLANS.count() == before + 1, "the checked sequence was not mirrored"
        grads = _behind_slow_work_on_a_side_stream(
            lambda: torch.ops.fa4.flash_attn_bwd(dout * 1.0, q, k, v, out, lse, *params.values()))
        want = [fa4_call.gradient_like(t) for t in (q, k, v)]
        fa4_call._fa4_backward(dout, q, k, v, out, lse, *want, **params, seqused_k=None,
                                  deterministic=deterministic)
    finally:
        torch.use_deterministic_algorithms(previous)
    errors = []
    for got, ref in zip(grads, want):
        assert got.stride() == ref.stride()
        if deterministic:
            assert torch.equal(got, ref)
        errors.append(((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
    assert max(errors) < 1e-2, errors
    _report("native_backward", heads_kv=heads_kv, causal=causal, layout=layout, deterministic=deterministic,
            max_rel_err=max(errors))


@pytest.mark.parametrize("heads_kv, causal", [(8, False), (2, True)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_launch_sequence_replays_match_fa4(heads_kv, causal, deterministic):
    """A replayed backward (scratch allocated per call, FA4's kernels launched in order) gives FA4's gradients:
    bit for bit with deterministic kernels, within atomic-add reordering otherwise."""
    params = dict(softmax_scale=0.1, causal=causal, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None)
    fa4_call.backward_plans().clear()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        q = torch.randn(2, 1500, 8, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 1500, heads_kv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out, lse = fa4_call.forward(q, k, v, **params)
        errors = []
        for _ in range(3):  # the first call learns through FA4, the others replay
            dout = torch.randn_like(out)
            grads = [torch.empty_like(t) for t in (q, k, v)]
            fa4_call.backward(dout, q, k, v, out, lse, **params, dq=grads[0], dk=grads[1], dv=grads[2])
            want = [torch.empty_like(t) for t in (q, k, v)]
            fa4_call._fa4_backward(dout, q, k, v, out, lse, *want, **params, key_padding=None,
                                      deterministic=deterministic)
            for got, ref in zip(grads, want):
                if deterministic:
                    assert torch.equal(got, ref)
                errors.append(((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item())
    finally:
        torch.use_deterministic_algorithms(previous)
    plans = fa4_call.backward_plans()
    sequence = plans.get(plans.keys()[0])
    assert len(plans.keys()) == 1 and sequence, "no launch sequence was learned"
    assert max(errors) < 1e-2, errors
    _report("backward_launch_sequence", heads_kv=heads_kv, causal=causal, deterministic=deterministic,
            launches=len(sequence.launches), scratch=[(str(r.dtype), r.zeroed) for r in sequence.scratch],
            max_rel_err=max(errors))


def _tampered_backward(sequence: launch_plan.LaunchSequence, how: str) -> launch_plan.LaunchSequence:
    """A backward launch sequence changed the way a new FA4 could change what a replay sees: its main kernel
    missed (4.0.0b40 fetched it past the recorder), or its accumulators allocated without the zero-fill FA4 does."""
    if how == "main_kernel_missed":
        return dataclasses.replace(sequence, launches=sequence.launches[:1] + sequence.launches[2:])
    return dataclasses.replace(sequence, scratch=tuple(dataclasses.replace(r, zeroed=False) for r in sequence.scratch))


@pytest.mark.parametrize("how", ["main_kernel_missed", "accumulators_not_zeroed"])
def test_a_plan_that_would_replay_wrong_fails_its_check_and_the_call_keeps_fa4s_gradients(how):
    """The check of a plan's first replay is what stands between a changed FA4 and a wrong gradient."""
    params = dict(softmax_scale=0.1, causal=True, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None)
    torch.manual_seed(0)
    q = torch.randn(2, 1500, 8, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1500, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = fa4_call.forward(q, k, v, **params)
    plans = fa4_call.backward_plans()
    plans.clear()
    stats.reset()

    def backward():
        dout = torch.randn_like(out)
        grads = [torch.empty_like(t) for t in (q, k, v)]
        fa4_call.backward(dout, q, k, v, out, lse, **params, dq=grads[0], dk=grads[1], dv=grads[2])
        want = [torch.empty_like(t) for t in (q, k, v)]
        fa4_call._fa4_backward(dout, q, k, v, out, lse, *want, **params, deterministic=False)
        return max(((g.float() - w.float()).abs().max() / w.float().abs().max()).item() for g, w in zip(grads, want))

    errors = [backward()]  # learned (unless the call compiled FA4's kernels: then on the next)
    if not plans.keys():
        errors.append(backward())
    (signature,) = plans.keys()
    learned, _ = plans._plans[signature]
    plans._put(signature, _tampered_backward(learned, how), trusted=False)
    # Freed blocks of the accumulators' sizes hold NaN, so an allocation that skips the zero-fill sees garbage.
    garbage = [torch.full(r.size, float("nan"), dtype=r.dtype, device="cuda") if r.dtype.is_floating_point
               else torch.full(r.size, -7, dtype=r.dtype, device="cuda") for r in learned.scratch]
    del garbage
    errors += [backward() for _ in range(2)]  # the checked first replay, then FA4's own path
    _report("tampered_plan_check", how=how, errors=errors, counters=dict(stats.counters))
    assert stats.counters["plans.check_failed.backward"] == 1 and plans.get(signature) is None
    assert max(errors) < 1e-2, errors


def test_stock_compile_after_the_plugin_is_disabled_gives_right_gradients():
    """After compiling and training with the plugin (compile and eager routing on), a stock torch.compile of the
    same model, the plugin off, must give eager's gradients (once seen: h.1.ln_1 gradients exactly zero)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_embd=512, n_layer=2, n_head=8, n_positions=512,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).cuda().bfloat16()
    ids = torch.randint(0, 256, (2, 512), device="cuda")

    def gradients(run):
        model.zero_grad(set_to_none=True)
        run(ids).logits.float().square().mean().backward()
        return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}

    want = gradients(model)
    torch._dynamo.reset()
    with fa4_inductor.enabled(devices=("cuda", "cpu")):
        for _ in range(3):
            gradients(torch.compile(model))
    errors = []
    for _ in range(3):
        got = gradients(torch.compile(model))
        errors.append(max(((got[n] - w).norm() / w.norm().clamp_min(1e-6)).item() for n, w in want.items()))
    _report("stock_after_disable", errors=errors)
    assert max(errors) < 5e-2, errors


@pytest.mark.parametrize("name", ["bart", "whisper"])
def test_seq2seq_training_runs_every_site_on_fa4_kernels(name):
    """BART and Whisper (LayerDrop at 0: ``torch.rand([]) < self.layerdrop`` per layer) train with every encoder,
    causal and cross site on FA4 kernels only, the padding mask as FA4 key padding, and no graph break at the
    draw; logits and gradients against a float64 copy. (torch 2.11's Dynamo still breaks at transformers'
    ``copy.deepcopy`` of the config, outside the layers.)"""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    sizes = dict(vocab_size=256, d_model=512, encoder_layers=2, decoder_layers=2, encoder_attention_heads=8,
                 decoder_attention_heads=8, encoder_ffn_dim=1024, decoder_ffn_dim=1024, dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, attn_implementation="sdpa")
    ids = torch.randint(3, 256, (2, 384), device="cuda")
    mask = torch.ones(2, 384, dtype=torch.long, device="cuda")
    mask[1, 300:] = 0
    if name == "bart":
        model = transformers.BartForConditionalGeneration(transformers.BartConfig(**sizes, max_position_embeddings=512))
        inputs = dict(input_ids=ids, decoder_input_ids=ids, attention_mask=mask)
    else:
        model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            **sizes, num_mel_bins=16, max_source_positions=256, max_target_positions=512, pad_token_id=1,
            bos_token_id=2, eos_token_id=2, decoder_start_token_id=2))
        inputs = dict(input_features=torch.randn(2, 16, 512, device="cuda"), decoder_input_ids=ids,
                      decoder_attention_mask=mask)
    model64 = copy.deepcopy(model).cuda().double().train()
    model = model.cuda().bfloat16().train()
    weights = torch.randn(2, 384, 256, device="cuda")

    def logits_and_grads(m, call, dtype):
        m.zero_grad(set_to_none=True)
        logits = call(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}).logits
        (logits.double() * weights).mean().backward()
        return {"logits": logits.double(), **{n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}}

    stats.reset()
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    graphs.clear()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(model)
        got = logits_and_grads(model, compiled, torch.bfloat16)
        names = _kernel_names(lambda: logits_and_grads(model, compiled, torch.bfloat16))
    want = logits_and_grads(model64, model64, torch.float64)
    records = stats.site_records()

    def errors(result):
        return {key: ((result[key] - w).norm() / w.norm()).item() for key, w in want.items() if w.norm() > 1e-5}

    # Each within bf16 eager's rounding error or, where Inductor's own rounding moves it, stock compile's.
    got_errors, eager_errors = errors(got), errors(logits_and_grads(model, model, torch.bfloat16))
    worse = {key: e for key, e in got_errors.items() if e > 1.25 * eager_errors[key] + 1e-2}
    if worse:
        torch._dynamo.reset()
        stock_errors = errors(logits_and_grads(model, torch.compile(model), torch.bfloat16))
        worse = {key: (got_errors[key], eager_errors[key], stock_errors[key]) for key in worse
                 if got_errors[key] > 1.25 * max(eager_errors[key], stock_errors[key]) + 1e-2}
    _report("seq2seq_training", model=name, graphs=graphs["unique_graphs"], max_rel_error=max(got_errors.values()),
            drawn_branches_decided=stats.counters["compile.drawn_branches_decided"], worse=worse,
            max_eager_rel_error=max(eager_errors.values()),
            sites=[(r.decision, r.features.get("causal"), r.features.get("padding")) for r in records],
            kernels=sorted(set(_attention_kernels(names))))
    assert stats.counters["compile.drawn_branches_decided"] > 0 or "self.layerdrop > 0" in inspect.getsource(
        transformers.models.bart.modeling_bart.BartEncoder.forward)
    assert len(records) == 6 and all(r.decision == "fa4" for r in records), [(r.decision, r.reason) for r in records]
    convolution = ("conv", "nhwc", "nchw", "fprop", "dgrad", "wgrad")  # Whisper's encoder convolutions run cuDNN
    stock_attention = [n for n in names if any(t in n.lower() for t in FA2_OR_CUDNN) and "cute" not in n.lower()
                       and not any(c in n.lower() for c in convolution)]
    assert not stock_attention, stock_attention
    assert not worse, worse


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


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decoding_step_splits_kv_and_matches(mode):
    """A compiled static-cache decoding step (its (B, 1, 1, S) mask a graph input) runs FA4 split-KV with
    key padding on sm90, in and out of CUDA graphs; the graph compiles its kernels without launching any."""
    torch.manual_seed(0)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(1, 1, 1, 4096, dtype=torch.bool, device="cuda")
    mask[..., 3000:] = False

    def step(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    torch._dynamo.reset()
    stats.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(step, mode=mode, fullgraph=True)
        outs = [compiled(q, k, v, mask).clone() for _ in range(3)]
        torch.cuda.synchronize()
        names = _kernel_names(lambda: compiled(q, k, v, mask))
    ref = step(q.double(), k.double(), v.double(), mask)
    rel = max(((out.double() - ref).norm() / ref.norm()).item() for out in outs)
    splits = fa4_call.split_count(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dict(
        causal=False, window_left=-1, window_right=-1, seqused_k=None))
    _report("compiled_decode_step", mode=mode, splits=splits, rel_err=rel, counters=dict(stats.counters),
            kernels=sorted(set(_attention_kernels(names))))
    assert stats.counters["compile.fa4"] == 1, stats.site_records()
    assert torch.cuda.get_device_capability()[0] != 9 or splits > 1
    assert rel < 1e-2


def test_compiled_block_runs_fa4_forward_and_backward():
    torch.manual_seed(0)
    block = AttentionBlock(1024, 8).cuda().bfloat16()
    x = torch.randn(2, 2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(block, fullgraph=True)

        def step():
            out = compiled(x)
            out.float().square().mean().backward()
            return out
        _steady(step)
        names = _kernel_names(step)
    ref = block.double()(x.double())
    block.bfloat16()
    out = compiled(x)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    _report("compiled_block", kernels=sorted(set(_attention_kernels(names))), rel_err=rel,
            counters=dict(stats.counters))
    assert stats.counters["compile.fa4"] >= 1
    assert not any(t in n.lower() for n in names for t in FA2_OR_CUDNN if "cute" not in n.lower()), names
    assert rel < 2e-2


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "key_padding"])
def test_compiled_multihead_attention_runs_fa4_forward_and_backward(padded):
    """nn.MultiheadAttention (F.multi_head_attention_forward, one node in Dynamo's graph) trains on FA4 kernels
    only, its key_padding_mask as FA4 key padding; output and gradients against float64."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(1024, 8, batch_first=True).cuda().bfloat16()
    x = torch.randn(4, 1000, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    padding = torch.zeros(4, 1000, dtype=torch.bool, device="cuda")
    padding[1, 700:] = padding[3, 31:] = padded

    def fn(module, x):
        return module(x, x, x, key_padding_mask=padding if padded else None, need_weights=False)[0]

    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(lambda x: fn(mha, x), fullgraph=True)
        out = compiled(x)
        names = _kernel_names(lambda: compiled(x).float().square().mean().backward())
    dout = torch.randn_like(out)
    got = _grads(out, [x, mha.in_proj_weight], dout)
    mha64 = copy.deepcopy(mha).double()
    x64 = x.detach().double().requires_grad_()
    ref = fn(mha64, x64)
    want = _grads(ref, [x64, mha64.in_proj_weight], dout.double())
    errors = [((g.double() - w).norm() / w.norm()).item() for g, w in zip([out, *got], [ref, *want])]
    _report("compiled_multihead_attention", padded=padded, rel_errors=errors,
            kernels=sorted(set(_attention_kernels(names))), sites=[r.decision for r in stats.site_records()])
    assert [(r.pattern, r.decision) for r in stats.site_records()] == [("multihead_attention", "fa4")]
    assert not any(t in n.lower() for n in names for t in FA2_OR_CUDNN if "cute" not in n.lower()), names
    assert max(errors) < 2e-2, errors


def test_compiled_bmm_attention_runs_fa4_forward_and_backward():
    """The (B * H, S, D) bmm form (diffusers' classic AttnProcessor: baddbmm on an empty tensor with beta=0) trains
    on FA4 kernels only; output and gradients against float64."""
    def attention(q, k, v):
        empty = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
        scores = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=q.shape[-1] ** -0.5)
        return torch.bmm(scores.softmax(dim=-1).to(v.dtype), v)

    torch.manual_seed(0)
    q, k, v = _leaves(*[(4 * 16, 1024, 64)] * 3)
    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(attention, fullgraph=True)
        out = compiled(q, k, v)
        names = _kernel_names(lambda: compiled(q, k, v).float().square().mean().backward())
    dout = torch.randn_like(out)
    got = _grads(out, [q, k, v], dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.softmax(q64 @ k64.transpose(-1, -2) * 0.125, dim=-1) @ v64
    want = _grads(ref, [q64, k64, v64], dout.double())
    errors = [((g.double() - w).norm() / w.norm()).item() for g, w in zip([out, *got], [ref, *want])]
    _report("compiled_bmm_attention", rel_errors=errors, kernels=sorted(set(_attention_kernels(names))))
    assert [(r.pattern, r.decision) for r in stats.site_records()] == [("eager_attention", "fa4")]
    assert not any(t in n.lower() for n in names for t in FA2_OR_CUDNN if "cute" not in n.lower()), names
    assert max(errors) < 2e-2, errors


def test_encoder_layer_inference_fast_path_runs_fa4():
    """nn.TransformerEncoderLayer in inference hands its forward to one fused op; with the plugin it runs FA4."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(1024, 16, 4096, dropout=0.0, batch_first=True, norm_first=True,
                                             activation="gelu").cuda().bfloat16().eval()
    x = torch.randn(4, 1000, 1024, device="cuda", dtype=torch.bfloat16)
    padding = torch.zeros(4, 1000, dtype=torch.bool, device="cuda")
    padding[1, 700:] = True
    stats.reset()
    torch._dynamo.reset()
    with torch.no_grad(), fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(lambda x: layer(x, src_key_padding_mask=padding), fullgraph=True)
        out = compiled(x)
        names = _kernel_names(lambda: compiled(x))
        want = layer(x, src_key_padding_mask=padding)  # eager: torch._transformer_encoder_layer_fwd
    rel = ((out.float() - want.float()).norm() / want.float().norm()).item()
    _report("encoder_layer_fast_path", rel_err=rel, kernels=sorted(set(_attention_kernels(names))))
    assert [(r.pattern, r.decision) for r in stats.site_records()] == [("transformer_encoder_layer", "fa4")]
    assert any("cute" in n.lower() or "flash" in n.lower() for n in _attention_kernels(names)), names
    assert rel < 2e-2


def test_compiled_dynamic_lengths_reuse_graph_and_kernel():
    torch.manual_seed(0)
    block = AttentionBlock(512, 4).cuda().bfloat16()
    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(block, dynamic=True, fullgraph=True)
        compiled(torch.randn(1, 256, 512, device="cuda", dtype=torch.bfloat16))
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        import time
        start = time.perf_counter()
        for s in (384, 1000, 2048):
            compiled(torch.randn(1, s, 512, device="cuda", dtype=torch.bfloat16))
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    _report("dynamic_lengths", new_lengths_seconds=elapsed)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert elapsed < 1.0, "a new sequence length recompiled the graph or the FA4 kernel"


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_reduce_overhead_captures_fa4_in_cuda_graphs(training):
    """CUDA graphs replay FA4, forward and backward, in a real training loop.

    Gradients are set to None before each step, as ``optimizer.zero_grad()``
    does: accumulating into a ``.grad`` that a previous replay produced
    touches memory CUDA graphs have since overwritten (stock PyTorch raises
    the same error there).
    """
    torch.manual_seed(0)
    block = AttentionBlock(1024, 8).cuda().bfloat16()
    x = torch.randn(2, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.set_grad_enabled(training):
        ref = block(x)
    if training:
        ref.float().square().mean().backward()
    ref = ref.detach()
    ref_grads = [p.grad.clone() for p in block.parameters()] if training else []
    torch._dynamo.reset()
    stats.reset()
    with fa4_inductor.enabled(compile=True, eager=False), torch.set_grad_enabled(training):
        compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)

        def step():
            block.zero_grad(set_to_none=True)
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(x)
            if training:
                out.float().square().mean().backward()
            return out

        for _ in range(3):  # warm-up, record, replay
            out = step().detach().clone()
        names = _kernel_names(step)
    skipped = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    grad_rel = max((((p.grad.double() - g.double()).norm() / g.double().norm()).item()
                    for p, g in zip(block.parameters(), ref_grads)), default=0.0)
    _report("reduce_overhead", training=training, cudagraph_skips=skipped, rel_err=rel, grad_rel_err=grad_rel,
            kernels=sorted(set(_attention_kernels(names))))
    assert stats.counters["compile.fa4"] >= 1
    assert skipped == 0, "Inductor skipped CUDA graphs"
    assert any("fa4" in n.lower() or "flash" in n.lower() for n in _attention_kernels(names))
    assert rel < 1e-2 and grad_rel < 2e-2


@pytest.mark.parametrize("mask", ["padding", "documents"])
def test_reduce_overhead_captures_block_sparse_calls(mask):
    """Padded and packed batches under CUDA graphs: the tile lists are computed on the device inside the graph,
    so replays with new padding (same shapes) stay exact, forward and backward."""
    torch.manual_seed(0)
    b, h, s, d = 2, 8, 1000, 128

    def fn(q, k, v, tensor):
        i, j = torch.arange(s, device="cuda")[:, None], torch.arange(s, device="cuda")[None, :]
        keep = (i >= j)[None, None]
        if mask == "padding":
            keep = keep & tensor[:, None, None, :]
        else:
            keep = keep & (tensor[:, None, :, None] == tensor[:, None, None, :])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    q, k, v = _leaves(*[(b, h, s, d)] * 3)
    torch._dynamo.reset()
    stats.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
        errors = []
        for step in range(4):  # warm-up, record, then replays with other padding / documents
            tensor = _key_padding(b, s, ("left", "right")[step % 2]) if mask == "padding" \
                else _segment_ids(b, s, 3 + step)
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(q, k, v, tensor)
            dout = torch.randn_like(out)
            grads = _grads(out, (q, k, v), dout)
            ref = fn(*(t.double() for t in (q, k, v)), tensor)
            ref_grads = _grads(ref, (q, k, v), dout.double())
            errors.append(max(((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-6)).item()
                              for x, y in zip((out, *grads), (ref, *ref_grads))))
    skipped = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    _report("reduce_overhead_block_sparse", mask=mask, relative_errors=errors, cudagraph_skips=skipped)
    assert stats.counters["compile.fa4"] >= 1 and skipped == 0
    assert max(errors) < 5e-2, errors  # a stale tile list would be off by O(1)


@pytest.mark.parametrize("training", [True, False])
def test_layers_with_one_padding_mask_share_one_masking_buffer(training):
    """Two compiled attention layers on one padding mask launch one masking-buffer kernel per step (training and
    inference) and both read it right: output (and gradients) match float64."""
    torch.manual_seed(0)
    b, h, s, d = 2, 8, 1000, 128

    def fn(x, pad):
        i, j = torch.arange(s, device="cuda")[:, None], torch.arange(s, device="cuda")[None, :]
        keep = (i >= j)[None, None] & pad[:, None, None, :]
        hidden = F.scaled_dot_product_attention(x, x, x, attn_mask=keep)
        return F.scaled_dot_product_attention(hidden, x, hidden, attn_mask=keep)

    (x,) = _leaves((b, h, s, d))
    pad = _key_padding(b, s, "left")
    torch._dynamo.reset()
    stats.reset()
    with fa4_inductor.enabled(compile=True, eager=False), torch.set_grad_enabled(training):
        compiled = torch.compile(fn, fullgraph=True)
        out = compiled(x, pad)
        torch.cuda.synchronize()  # no kernel of the first call may land in the profile
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            compiled(x, pad)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        fa4_ops = [e.name for e in prof.events() if e.name.startswith("fa4::")]  # which op launched what
        ref = fn(x.double(), pad)
        errors = [((out.double() - ref).abs().max() / ref.abs().max()).item()]
        if training:
            dout = torch.randn_like(out)
            (grad,), (ref_grad,) = _grads(out, (x,), dout), _grads(ref, (x,), dout.double())
            errors.append(((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item())
    buffers = names.count("_masking_buffer")  # the Triton kernel's own name: no Inductor kernel shares it
    _report("shared_masking_buffer", training=training, masking_buffer_launches=buffers, fa4_ops=fa4_ops,
            kernels=names, relative_errors=errors)
    assert stats.counters["compile.fa4"] == 2 and buffers == 1, (buffers, fa4_ops, names)
    assert max(errors) < 5e-2, errors


def test_compiled_causal_sdpa_on_transposed_views_keeps_right_gradients():
    """Stock torch.compile 2.11 returns wrong gradients (relative error ~1) for an is_causal SDPA on transposed
    (B, S, H, D) leaves; the plugin's FA4 rewrite must keep them right. Stock's error is reported, not judged."""
    torch.manual_seed(0)
    leaves = _leaves(*[(2, 1024, 8, 128)] * 3)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)

    ref = fn(*(t.double() for t in leaves))
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    errors = {}
    for name, plugin in (("stock", False), ("plugin", True)):
        torch._dynamo.reset()
        stats.reset()
        with fa4_inductor.enabled(compile=plugin, eager=False):
            grads = torch.autograd.grad(torch.compile(fn, fullgraph=True)(*leaves), leaves, dout.bfloat16())
        errors[name] = max(((g.double() - r.double()).norm() / r.double().norm()).item()
                           for g, r in zip(grads, ref_grads))
    _report("compiled_causal_sdpa_transposed_views", relative_grad_errors=errors)
    assert stats.counters["compile.fa4"] == 1 and errors["plugin"] < 2e-2, errors


@pytest.mark.parametrize("mask", ["prefix_lm", "chunked"])
def test_masked_sites_left_to_stock_keep_right_gradients_on_transposed_views(mask):
    """Masks FA4 can't express stay with stock SDPA; on (B, S, H, D) leaves seen transposed, the site the plugin
    leaves must still give float64's gradients (``docs/stock_sdpa_transposed_views.md``)."""
    torch.manual_seed(0)
    leaves = _leaves(*[(2, 1000, 8, 64)] * 3)

    def fn(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        i, j = torch.arange(q.shape[2], device=q.device)[:, None], torch.arange(k.shape[2], device=q.device)[None, :]
        keep = ((j <= i) | (j < 250)) if mask == "prefix_lm" else (i // 128 == j // 128)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    ref = fn(*(t.double() for t in leaves))
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    torch._dynamo.reset()
    stats.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        grads = torch.autograd.grad(torch.compile(fn, fullgraph=True)(*leaves), leaves, dout.bfloat16())
    errors = [((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)]
    _report("stock_site_transposed_views", mask=mask, relative_grad_errors=errors)
    assert stats.counters["compile.fallback"] == 1 and max(errors) < 2e-2, (errors, stats.site_records())


def test_compiled_sdpa_on_leaves_runs_only_fa4_kernels():
    """SDPA on (B, H, S, D) leaves, forward + backward: FA4's kernels (and the zero-fill of its accumulators) and
    no layout copies: the gradients land in the leaves' layout."""
    q, k, v = _leaves(*[(2, 8, 1024, 128)] * 3)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(fn, fullgraph=True)
        # A contiguous incoming gradient, as a loss on the output produces. (A strided one, like ones_like of the
        # transposed-view output, is copied to the traced layout by AOTAutograd, with or without the plugin.)
        grad = torch.ones(compiled(q, k, v).shape, device="cuda", dtype=q.dtype)

        def step():
            return torch.autograd.grad(compiled(q, k, v), (q, k, v), grad)
        grads = _steady(step)
        names = _kernel_names(step)
    assert [g.stride() for g in grads] == [t.stride() for t in (q, k, v)]
    others = [n for n in names if "flash_attncute" not in n and "fill" not in n.lower()]
    _report("leaf_sdpa_kernels", kernels=sorted(set(names)), others=others)
    assert not others, others


def test_compiled_attention_block_runs_no_copies_around_fa4():
    """A qkv-projection block, forward + backward: FA4's kernels, the projections' GEMMs and accumulator fills;
    no transpose/contiguous copy of q, k, v, the output or the gradients."""
    torch.manual_seed(0)
    block = AttentionBlock(1024, 8).cuda().bfloat16()
    x = torch.randn(2, 2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(block, fullgraph=True)
        grad = torch.ones_like(compiled(x))

        def step():
            return torch.autograd.grad(compiled(x), (x, *block.parameters()), grad)
        _steady(step)
        names = _kernel_names(step)
    # Allowed besides FA4 and the GEMMs: zero-fills of FA4's accumulators, and the stack that is the backward of
    # the model's own ``unbind`` of the qkv projection (FA4 called by hand in eager runs it too).
    gemm = ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "ampere_", "cublas")
    others = [n for n in names if "flash_attncute" not in n and "fill" not in n.lower() and "memset" not in n.lower()
              and "fused_stack" not in n and not any(t in n.lower() for t in gemm)]
    _report("block_kernels", kernels=sorted(set(names)), others=others)
    assert any("flash_attncute" in n for n in names)
    assert not others, others


def _flex_program(mask_mod, score_mod, batch, seqlen, gqa, **flex_kwargs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def program(q, k, v):
        block_mask = create_block_mask(mask_mod, batch, None, seqlen, seqlen, device="cuda")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa, **flex_kwargs)
    return program


FLEX_CASES = [
    dict(causal=True), dict(window=(255, 0), softcap=30.0, hkv=2), dict(causal=True, padding="left", hkv=2),
    dict(documents=4, causal=True, s=1000), dict(padding="random", s=1000),
]


@pytest.mark.parametrize("case", FLEX_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_flex_attention_rewrite_matches_fp64_reference_and_flex(case):
    """A compiled flex_attention program with the plugin runs FA4; output and gradients are within the bf16
    yardstick of an fp64 reference, the output equals FlexAttention FLASH's and the logsumexp (natural log, what
    flex_attention returns) the fp64 one."""
    from torch.nn.attention.flex_attention import AuxRequest

    torch.manual_seed(0)
    b, s, h, d = 2, case.get("s", 1024), 8, 128
    hkv, window, softcap = case.get("hkv", h), case.get("window", (-1, -1)), case.get("softcap", 0.0)
    pad, seg = _key_padding(b, s, case.get("padding")), _segment_ids(b, s, case.get("documents"))

    def mask_mod(b_, h_, q_idx, kv_idx):
        keep = (q_idx >= kv_idx) if case.get("causal") or window[1] == 0 else q_idx >= 0
        if window[0] >= 0:
            keep = keep & (q_idx - kv_idx <= window[0])
        if pad is not None:
            keep = keep & pad[b_, kv_idx]
        if seg is not None:
            keep = keep & (seg[b_, q_idx] == seg[b_, kv_idx])
        return keep

    def score_mod(score, b_, h_, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    q, k, v = _leaves((b, h, s, d), (b, hkv, s, d), (b, hkv, s, d))
    program = _flex_program(mask_mod, score_mod if softcap else None, b, s, hkv != h,
                            return_aux=AuxRequest(lse=True))
    torch._dynamo.reset()
    stats.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(program, fullgraph=True)
        out, aux = compiled(q, k, v)
        dout = torch.randn_like(out)
        grads = _grads(out, (q, k, v), dout)
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    params = dict(scale=d ** -0.5, causal=bool(case.get("causal")), window=window, softcap=softcap,
                  key_padding=pad, segment_ids=seg)
    bshd = [t.transpose(1, 2) for t in (q, k, v)]
    ref = _math_attention(*bshd, torch.float64, **params).transpose(1, 2)
    low = _math_attention(*bshd, torch.bfloat16, **params).transpose(1, 2)
    errors = {}
    for name, got, want, lowp in zip(("out", "dq", "dk", "dv"), (out, *grads),
                                     (ref, *_grads(ref, (q, k, v), dout.double())),
                                     (low, *_grads(low, (q, k, v), dout))):
        err, err_low = ((x.double() - want).abs().max().item() for x in (got, lowp))
        errors[name] = dict(max_err=err, bf16_math_max_err=err_low)
        assert math.isfinite(err) and err <= 3 * err_low + 1e-3, (name, err, err_low)
    lse_err = (aux.lse - _math_logsumexp(*bshd, **params)).nan_to_num(posinf=0, neginf=0).abs().max().item()
    out_err = None
    if pad is None and seg is None:  # torch 2.11 FLASH: its generated code frees these captured tensors too early
        torch._dynamo.reset()
        flash = torch.compile(_flex_program(mask_mod, score_mod if softcap else None, b, s, hkv != h,
                                            kernel_options={"BACKEND": "FLASH"}))
        out_err = (out - flash(*(t.detach() for t in (q, k, v)))).abs().max().item()
    _report("flex_vs_fp64", case=case, errors=errors, lse_vs_fp64=lse_err, out_vs_flex_flash=out_err)
    assert lse_err < 1e-2 and (out_err is None or out_err < 2e-2)

