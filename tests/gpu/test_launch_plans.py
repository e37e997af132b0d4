"""Launch plans and the C++ launcher: replays bit for bit against FA4, on the caller's stream; a plan that would replay wrong fails its check."""

from __future__ import annotations
import dataclasses
import pytest
import torch
from fa4_inductor.runtime import fa4_call, launch_plan, native
from fa4_inductor import stats
from tests.gpu.common import WARM_CALLS, _behind_slow_work_on_a_side_stream, _report, require_fa4_gpu

pytestmark = pytest.mark.gpu
require_fa4_gpu()


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
