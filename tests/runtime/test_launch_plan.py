"""Launch plans (CPU stand-ins for FA4): one per call signature, learned, checked on their first replay, replayed."""

import types

import pytest
import torch

from fa4_inductor.runtime import cuda_arch, fa4_binding, fa4_call, fa4_version, launch_plan

from fa4_inductor import stats


def _params(**overrides):
    params = dict(softmax_scale=0.125, causal=True, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None)
    return {**params, **overrides}


def _qkv(batch=2, seqlen=512, heads=8, heads_kv=2, head_dim=64, dtype=torch.bfloat16, seqlen_k=None):
    seqlen_k = seqlen if seqlen_k is None else seqlen_k
    return (torch.empty(batch, seqlen, heads, head_dim, dtype=dtype),
            torch.empty(batch, seqlen_k, heads_kv, head_dim, dtype=dtype),
            torch.empty(batch, seqlen_k, heads_kv, head_dim, dtype=dtype))


@pytest.mark.parametrize("other", [
    dict(seqlen=4096), dict(seqlen=300, seqlen_k=9000), dict(batch=7), dict(dtype=torch.float16),
    dict(head_dim=128), dict(heads=16), dict(heads_kv=8), dict(params=_params(causal=False)),
    dict(params=_params(softmax_scale=0.1)), dict(params=_params(window_left=128)),
    dict(params=_params(softcap=30.0)), dict(params=_params(seqused_k=torch.ones(2, dtype=torch.int32))),
], ids=lambda o: str({k: v for k, v in o.items()}))
def test_every_shape_dtype_and_option_gets_a_plan_of_its_own(other):
    """Plans are per exact call signature: FA4 may derive launch arguments from any of these (4.0.0b40 clamps
    windows to the sequence lengths)."""
    def signature(params=None, **shape):
        return launch_plan.call_signature(*_qkv(**shape), *(params or _params()).values())

    assert signature(**other) != signature() and signature() == signature()


def _stand_in_fa4(extra_buffer=False, unrecorded_kernel=False):
    """Mimics FA4's entry point: compute a key, compile once, launch with (q, k, v, out, lse, scale, ...) (and, with
    ``unrecorded_kernel``, finish ``out`` with a second kernel fetched past the compile cache, as FA4 4.0.0b40's
    backward fetched its main kernel with ``cache.get``, which the recorder did not wrap)."""
    fa4 = types.SimpleNamespace(compiles=0, launches=[], calls=0)

    def kernel(q, k, v, out, lse, scale, none, seqused_k, scratch):
        fa4.launches.append((q, k, v, out, lse, scale, seqused_k))
        out.copy_(q * scale)
        lse.fill_(1.0)

    def entry_point(q, k, v, *, softmax_scale, out, lse, seqused_k=None, **_):
        fa4.calls += 1
        cache = entry_point.compile_cache
        key = (q.dtype, q.shape[-1])
        if key not in cache:
            fa4.compiles += 1
            cache[key] = kernel
        scratch = torch.empty(1) if extra_buffer else None
        cache[key](q, k, v, out, lse, softmax_scale, None, seqused_k, scratch)
        if unrecorded_kernel:
            with launch_plan.outside_dispatch_modes():
                out.add_(k)

    entry_point.compile_cache = {}
    fa4._flash_attn_fwd = entry_point
    # Compiled before the test's calls: a call that compiles is not learned from.
    entry_point(*(torch.empty(1, 1, 1, 16) for _ in range(3)), softmax_scale=1.0, out=torch.empty(1, 1, 1, 16),
                lse=torch.empty(1, 1, 1))
    fa4.calls, fa4.launches = 0, []
    return fa4


@pytest.fixture
def plans(monkeypatch):
    monkeypatch.setattr(cuda_arch, "major", lambda index: 9)
    monkeypatch.setattr(fa4_call, "_FORWARD_PLANS", launch_plan.PlanCache())
    return lambda fa4: monkeypatch.setattr(fa4_binding, "module", lambda: fa4)


def _forward(q, k, v, **overrides):
    return fa4_call.forward(q, k, v, **_params(**overrides))


def test_adapter_learns_a_plan_checks_its_first_replay_then_replays_it_without_fa4(plans):
    stand_in = _stand_in_fa4()
    plans(stand_in)
    q, k, v = (torch.randn(2, 512, 4, 16) for _ in range(3))
    _forward(q, k, v)  # learns through FA4's entry point
    assert len(fa4_call.forward_plans().keys()) == 1 and stand_in.compiles == 1 and stand_in.calls == 1
    q2 = torch.randn_like(q)
    out2, _ = _forward(q2, k, v)  # the first replay, checked against FA4's own call on the same inputs
    assert stand_in.calls == 2 and stats.counters["plans.checked"] == 1 and not stats.counters["plans.check_failed"]
    torch.testing.assert_close(out2, q2 * 0.125)
    stand_in._flash_attn_fwd = None  # a trusted plan's replay must not go through FA4's entry point
    q3 = torch.randn_like(q)  # the bound plan allocates and launches
    out3, lse3 = _forward(q3, k, v)
    assert stand_in.launches[-1][0] is q3 and stand_in.launches[-1][3] is out3 and stand_in.launches[-1][4] is lse3
    torch.testing.assert_close(out3, q3 * 0.125)
    assert out3.is_contiguous() and lse3.is_contiguous() and lse3.dtype == torch.float32
    assert stats.counters["plans.checked"] == 1


def test_a_new_shape_learns_its_own_plan(plans):
    stand_in = _stand_in_fa4()
    plans(stand_in)
    for shape in ((2, 512, 4, 16), (3, 1024, 4, 16)):
        for _ in range(3):
            q, k, v = (torch.randn(shape) for _ in range(3))
            torch.testing.assert_close(_forward(q, k, v)[0], q * 0.125)
    assert len(fa4_call.forward_plans().keys()) == 2 and stand_in.compiles == 1
    assert stand_in.calls == 4 and stats.counters["plans.checked"] == 2  # per shape: learn, check, then replay


def test_a_replay_that_misses_a_kernel_fails_its_check_and_the_call_keeps_fa4s_outputs(plans, caplog):
    stand_in = _stand_in_fa4(unrecorded_kernel=True)
    plans(stand_in)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    for _ in range(4):
        out, _ = _forward(q, k, v)
        torch.testing.assert_close(out, q * 0.125 + k)
    signature = fa4_call.forward_plans().keys()[0]
    assert fa4_call.forward_plans().get(signature) is None and stand_in.calls == 4  # FA4's own calls after the check
    assert stats.counters["plans.check_failed"] == stats.counters["plans.check_failed.forward"] == 1
    assert [r.levelname for r in caplog.records if "disagreed with FA4" in r.getMessage()] == ["WARNING"]


def test_a_buffer_fa4_allocates_per_call_is_allocated_anew_for_each_replay(plans):
    stand_in = _stand_in_fa4(extra_buffer=True)
    plans(stand_in)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    for _ in range(3):
        _forward(q, k, v)
    plans = fa4_call.forward_plans()
    sequence = plans.get(plans.keys()[0])
    assert sequence and len(sequence.scratch) == 1 and stand_in.calls == 2 and len(stand_in.launches) == 4


@pytest.mark.parametrize("version, opt_in, plans_on", [("4.0.0b36", None, True), ("4.0.0b40", None, True),
                                                       ("4.0.0b99", None, False), ("4.0.0b99", "1", True)])
def test_an_untested_fa4_runs_its_own_entry_points_unless_the_user_opts_in(plans, monkeypatch, version, opt_in,
                                                                           plans_on):
    from fa4_inductor.runtime import plan_trust

    monkeypatch.setattr(fa4_version, "version", lambda: version)
    if opt_in:
        monkeypatch.setenv(plan_trust.OPT_IN, opt_in)
    plan_trust.off_reason.cache_clear()
    try:
        stand_in = _stand_in_fa4()
        plans(stand_in)
        q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
        for _ in range(3):
            torch.testing.assert_close(_forward(q, k, v)[0], q * 0.125)
        assert (stand_in.calls == 2) == plans_on and (stand_in.calls == 3) != plans_on
        assert (plan_trust.off_reason() is None) == plans_on
    finally:
        plan_trust.off_reason.cache_clear()


def test_one_tensor_in_three_slots_is_learned_on_copies_and_replays_for_any_inputs(plans):
    """``attention(x, x, x)``: the plan is learned on copies of k and v (else each launch argument would name
    three call tensors), then serves that call and calls with three tensors alike."""
    stand_in = _stand_in_fa4()
    plans(stand_in)
    x = torch.randn(1, 8, 2, 16)
    for _ in range(2):  # learned, then checked
        out, _ = _forward(x, x, x)
        torch.testing.assert_close(out, x * 0.125)
    assert len(fa4_call.forward_plans().keys()) == 1 and stand_in.compiles == 1
    stand_in._flash_attn_fwd = None  # replays only from here on
    for q, k, v in ((x, x, x), tuple(torch.randn(1, 8, 2, 16) for _ in range(3))):
        out, _ = _forward(q, k, v)
        assert [t is want for t, want in zip(stand_in.launches[-1][:3], (q, k, v))] == [True] * 3
        torch.testing.assert_close(out, q * 0.125)


def test_only_read_only_dense_inputs_that_alias_are_copied_for_learning():
    x = torch.randn(2, 8, 4, 16)
    expanded = torch.randn(2, 8, 1, 16).expand(2, 8, 4, 16)
    transposed = torch.randn(2, 4, 8, 16).transpose(1, 2)
    tensors = (x, x, transposed, expanded, expanded, x)
    distinct = launch_plan.distinct_inputs(tensors, 5)  # the last is an output: never copied
    assert distinct[0] is x and distinct[2] is transposed and distinct[3] is expanded and distinct[5] is x
    assert distinct[1] is not x and torch.equal(distinct[1], x) and distinct[1].stride() == x.stride()
    assert distinct[4] is expanded  # overlapping: a copy couldn't keep its layout
    assert launch_plan.distinct_inputs((transposed, transposed), 2)[1].stride() == transposed.stride()


def test_recorder_ignores_other_threads():
    import threading

    recorder = launch_plan.Recorder({"key": lambda *args: "launched"})
    result = []
    thread = threading.Thread(target=lambda: result.append(("key" in recorder, recorder["key"](1))))
    thread.start()
    thread.join()
    assert result == [(True, "launched")] and recorder.launches == []



class _DslKernel:
    """Shaped like a CuTe DSL kernel compiled for TVM-FFI: a Python ``__call__`` over a keyword wrapper
    over the C function."""

    def __init__(self, names=("q", "k", "aux"), defaults=(None,), unpack=(), pointer_args=False):
        from tvm_ffi.utils.kwargs_wrapper import make_kwargs_wrapper

        self.function = lambda *args: args
        self.execution_args = types.SimpleNamespace(has_pointer_address_arg_specs=pointer_args)
        self._kwargs_wrapper = make_kwargs_wrapper(self.function, list(names), arg_defaults=defaults,
                                                   map_dataclass_to_tuple=list(unpack))

    def __tvm_ffi_object__(self):
        return self.function

    def __call__(self, *args):
        return self._kwargs_wrapper(*args)


def test_a_plan_calls_the_tvm_ffi_function_when_the_wrapper_passes_arguments_through():
    kernel = _DslKernel()
    plan = launch_plan.LaunchPlan(kernel, (None, None, "aux"), ((0, 0), (1, 1)))
    assert plan.entry is kernel.function


@pytest.mark.parametrize("kernel, arg_count", [
    (_DslKernel(unpack=("aux",)), 3),  # a dataclass argument becomes a tuple on the way
    (_DslKernel(pointer_args=True), 3),  # pointer-address arguments are converted on the way
    (_DslKernel(), 2),  # a default is filled in on the way
    (lambda *args: args, 3),  # not a CuTe DSL kernel
], ids=["unpack", "pointer-args", "defaults", "plain"])
def test_a_plan_keeps_the_kernels_own_call_when_the_wrapper_changes_arguments(kernel, arg_count):
    assert launch_plan.direct_entry(kernel, arg_count) is kernel


def _stand_in_fa4_backward(zeroed_scratch=True, foreign_buffer=False, torch_op=False, main_by_get=False,
                           compiles_main=False):
    """Mimics FA4's backward: scratch buffers (one zero-filled), then preprocess, main and postprocess kernels
    from three compile caches."""
    fa4 = types.SimpleNamespace(calls=0, scratch_seen=[])

    def preprocess(out, dout, dpsum, accum, scale):
        dpsum.copy_((out * dout).sum(-1))
        accum.zero_()

    def main(q, k, v, dout, dpsum, accum, dk_accum, scale, extra):
        fa4.scratch_seen.append(dk_accum.clone())
        accum.add_(dout * scale)
        dk_accum.add_(k)

    def postprocess(accum, grad, scale):
        grad.copy_(accum)

    def cached(name, kernel):
        def entry(*args):
            return entry.compile_cache[name](*args)
        entry.compile_cache = {name: kernel}
        return entry

    fa4._bwd_preprocess = cached("pre", preprocess)
    fa4._bwd_postprocess_convert = cached("post", postprocess)

    def flash_attn_bwd(q, k, v, out, dout, lse, *, softmax_scale, dq, dk, dv, **_):
        fa4.calls += 1
        dpsum = torch.empty(dout.shape[:-1])
        accum = torch.empty(dq.shape)
        dk_accum = (torch.zeros if zeroed_scratch else torch.empty)(k.shape)
        fa4._bwd_preprocess(out, dout, dpsum, accum, softmax_scale)
        main_args = (q.detach(), k, v, dout, dpsum, accum, dk_accum, softmax_scale,
                     dout.contiguous().clone() if foreign_buffer else None)
        if compiles_main:  # FA4 4.0.0b40: fetch with get, compile on a miss, launch the local variable
            kernel = flash_attn_bwd.compile_cache.get("main")
            if kernel is None:
                kernel = main
                flash_attn_bwd.compile_cache["main"] = kernel
                with launch_plan.outside_dispatch_modes():  # a compiled kernel's work is no torch op
                    kernel(*main_args)
            else:
                kernel(*main_args)
        elif main_by_get:  # a compiled kernel's work is no torch op: a CallWatch doesn't see it
            with launch_plan.outside_dispatch_modes():
                flash_attn_bwd.compile_cache.get("main")(*main_args)
        else:
            flash_attn_bwd.compile_cache["main"](*main_args)
        fa4._bwd_postprocess_convert(accum, dq, softmax_scale)
        fa4._bwd_postprocess_convert(dk_accum, dk, 1.0)
        fa4._bwd_postprocess_convert(v, dv, 1.0)
        if torch_op:
            dv.mul_(1.0)

    flash_attn_bwd.compile_cache = {} if compiles_main else {"main": main}
    fa4._flash_attn_bwd = flash_attn_bwd
    return fa4


@pytest.fixture
def backward_plans(monkeypatch):
    monkeypatch.setattr(fa4_call, "_BACKWARD_PLANS", launch_plan.PlanCache())
    return lambda fa4: monkeypatch.setattr(fa4_binding, "module", lambda: fa4)


def _backward(tensors):
    dout, q, k, v, out, lse = tensors
    grads = [torch.empty_like(t) for t in (q, k, v)]
    fa4_call.backward(dout, q, k, v, out, lse, softmax_scale=0.5, causal=False, window_left=-1, window_right=-1,
                         softcap=0.0, seqused_k=None, dq=grads[0], dk=grads[1], dv=grads[2])
    return grads


def _backward_inputs():
    return [torch.randn(1, 8, 2, 16) for _ in range(5)] + [torch.randn(1, 2, 8)]


def test_backward_learns_a_launch_sequence_and_replays_it_with_fresh_zeroed_scratch(backward_plans):
    stand_in = _stand_in_fa4_backward()
    backward_plans(stand_in)
    first = _backward(_backward_inputs())  # learned
    _backward(_backward_inputs())  # its first replay, checked against FA4's own call
    sequence = fa4_call.backward_plans().get(fa4_call.backward_plans().keys()[0])
    assert [recipe.zeroed for recipe in sequence.scratch] == [False, False, True] and len(sequence.launches) == 5
    assert stand_in.calls == 2 and stats.counters["plans.checked"] == 1 and not stats.counters["plans.check_failed"]
    inputs = _backward_inputs()
    replayed = _backward(inputs)  # the same signature: no FA4 call, a fresh zero-filled dk accumulator
    assert stand_in.calls == 2 and torch.count_nonzero(stand_in.scratch_seen[-1]) == 0
    dout, q, k, v = inputs[:4]
    for got, want in zip(replayed, (dout * 0.5, k, v)):
        torch.testing.assert_close(got, want)
    assert not torch.equal(replayed[0], first[0])


def test_a_backward_main_kernel_fetched_past_the_recorder_fails_the_check(backward_plans, monkeypatch):
    """FA4 4.0.0b40 fetched its backward's main kernel with ``compile_cache.get``: a recorder that missed it learned
    pre/postprocess only, and every replay skipped the main kernel. The check of the first replay catches it."""
    monkeypatch.setattr(launch_plan.Recorder, "get", lambda self, key, default=None: self.inner.get(key, default))
    stand_in = _stand_in_fa4_backward(main_by_get=True)
    backward_plans(stand_in)
    for _ in range(3):
        inputs = _backward_inputs()
        dout, q, k, v = inputs[:4]
        for got, want in zip(_backward(inputs), (dout * 0.5, k, v)):
            torch.testing.assert_close(got, want)
    plans = fa4_call.backward_plans()
    assert plans.get(plans.keys()[0]) is None and stats.counters["plans.check_failed.backward"] == 1
    assert stand_in.calls == 3  # learned, checked (a replay and FA4's call), then FA4's own


def test_a_call_that_compiled_a_kernel_is_not_learned_from(backward_plans):
    """FA4 4.0.0b40 launches a backward kernel it has just compiled from its own variable, past the cache: the
    call that compiled is not learned from; the next one is, and its plan passes its check."""
    stand_in = _stand_in_fa4_backward(compiles_main=True)
    backward_plans(stand_in)
    plans = fa4_call.backward_plans()
    for call in range(4):
        inputs = _backward_inputs()
        dout, q, k, v = inputs[:4]
        for got, want in zip(_backward(inputs), (dout * 0.5, k, v)):
            torch.testing.assert_close(got, want)
        assert len(plans.keys()) == (0 if call == 0 else 1)
    assert plans.get(plans.keys()[0]) and stand_in.calls == 3  # compiled, learned, checked; then replayed
    assert stats.counters["plans.checked"] == 1 and not stats.counters["plans.check_failed"]


def test_the_recorder_records_kernels_fetched_with_get():
    recorder = launch_plan.Recorder({"key": lambda *args: "launched"})
    assert recorder.get("key")(1, 2) == "launched" and recorder.launches[0][1] == (1, 2)
    assert recorder.get("missing") is None


@pytest.mark.parametrize("unreplayable", ["foreign_buffer", "torch_op"])
def test_backward_that_a_kernel_replay_would_not_reproduce_is_never_replayed(backward_plans, unreplayable):
    stand_in = _stand_in_fa4_backward(**{unreplayable: True})
    backward_plans(stand_in)
    for _ in range(2):
        _backward(_backward_inputs())
    plans = fa4_call.backward_plans()
    assert plans.get(plans.keys()[0]) is None and stand_in.calls == 2


class _Aux(tuple):
    """Shaped like FA4's ``AuxData`` named tuple."""

    _fields = ("tensors", "scalars")

    @classmethod
    def _make(cls, values):
        return cls(values)


def _nested_launch(q, counts, pad, foreign=False):
    """A launch the way FA4 passes block sparsity: a tuple of lists (one expanded over heads) and aux data."""
    expanded = counts.expand(counts.shape[0], 4, counts.shape[2])
    lists = (expanded, counts.clone() if foreign else counts, None)
    return (q, lists, _Aux(([pad], None)), 0.5)


def test_tensors_inside_tuples_and_views_of_call_tensors_are_rebuilt_per_call():
    launched = []
    kernel = lambda *args: launched.append(args)  # noqa: E731
    q, counts, pad = torch.randn(1, 8, 4, 16), torch.zeros(1, 1, 3, dtype=torch.int32), torch.ones(1, 8)
    plan = launch_plan.sequence_from([(kernel, _nested_launch(q, counts, pad))], (q, counts, pad), ()).single()
    assert isinstance(plan, launch_plan.LaunchPlan) and len(plan.nested) == 2
    q2, counts2, pad2 = torch.randn_like(q), torch.ones_like(counts), torch.zeros_like(pad)
    plan.launch((q2, counts2, pad2))
    got_q, (expanded, got_counts, none), aux, scale = launched[-1]
    assert got_q is q2 and got_counts.data_ptr() == counts2.data_ptr() and none is None and scale == 0.5
    assert expanded.shape == (1, 4, 3) and expanded.stride() == (3, 0, 1) and expanded.data_ptr() == counts2.data_ptr()
    assert isinstance(aux, _Aux) and aux[0][0].data_ptr() == pad2.data_ptr() and aux[1] is None


def test_a_tensor_inside_a_tuple_that_fa4_allocated_is_never_replayed():
    q, counts, pad = torch.randn(1, 8, 4, 16), torch.zeros(1, 1, 3, dtype=torch.int32), torch.ones(1, 8)
    launch = _nested_launch(q, counts, pad, foreign=True)
    assert launch_plan.sequence_from([(lambda *args: None, launch)], (q, counts, pad), ()) is None


def _stand_in_masked_fa4():
    """Mimics FA4's entry points with aux tensors and block sparsity: views of the lists go in a tuple."""
    fa4 = types.SimpleNamespace(calls=0, launches=[])

    def forward_kernel(q, k, v, out, lse, lists, aux):
        fa4.launches.append((lists, aux))
        out.copy_(q * aux[0][0][:, :q.shape[1], None, None])
        lse.zero_()

    def entry(q, k, v, *, out, lse, aux_tensors, block_sparse_tensors, **_):
        fa4.calls += 1
        heads = q.shape[2]
        lists = tuple(t.expand(t.shape[0], heads, *t.shape[2:]) for t in masking_lists(block_sparse_tensors))
        entry.compile_cache["fwd"](q, k, v, out, lse, lists, _Aux((aux_tensors, None)))

    entry.compile_cache = {"fwd": forward_kernel}
    fa4._flash_attn_fwd = entry

    def backward_kernel(dout, dq, dk, dv, lists, aux):
        fa4.launches.append((lists, aux))
        dq.copy_(dout * aux[0][0][:, :dout.shape[1], None, None])
        dk.zero_()
        dv.zero_()

    def backward_entry(q, k, v, out, dout, lse, *, dq, dk, dv, aux_tensors, block_sparse_tensors, **_):
        fa4.calls += 1
        backward_entry.compile_cache["bwd"](dout, dq, dk, dv, masking_lists(block_sparse_tensors),
                                            _Aux((aux_tensors, None)))

    backward_entry.compile_cache = {"bwd": backward_kernel}
    fa4._flash_attn_bwd = backward_entry
    fa4._bwd_preprocess = fa4._bwd_postprocess_convert = types.SimpleNamespace(compile_cache={})
    return fa4


def _stand_in_masking_from_buffer(calls: list):
    """FA4 masking keywords as views of the call's masking buffer: the key padding (B, S) at its start, then four
    (B, 1, 2) lists 32 elements apart; ``calls`` notes each call (its ``backward``)."""
    def fa4_masking(q, k, v, params, backward=False, deterministic=False):
        calls.append(backward)
        buffer, (batch, seqlen) = params["masking_buffer"], q.shape[:2]
        base = buffer.storage_offset()
        keep = buffer.as_strided((batch, seqlen), (seqlen, 1), base)
        lists = [buffer.as_strided((batch, 1, 2), (2, 2, 1), base + 32 * (i + 1)) for i in range(4)]
        return dict(mask_mod="mask", aux_tensors=[keep], block_sparse_tensors=types.SimpleNamespace(
            mask_block_cnt=lists[0], mask_block_idx=lists[1], full_block_cnt=lists[2], full_block_idx=lists[3]))
    return fa4_masking


def test_masked_calls_given_their_buffer_replay_with_no_masking_work_after_their_first(monkeypatch):
    from fa4_inductor.runtime import masked_launch, mask_routes

    for cache in ("_MASKED_FORWARD_PLANS", "_BACKWARD_PLANS"):
        monkeypatch.setattr(fa4_call, cache, launch_plan.PlanCache())
    monkeypatch.setattr(fa4_call, "_BOUND_MASKED_CALLS", masked_launch.BoundMaskedCalls())
    keywords = []
    monkeypatch.setattr(mask_routes, "fa4_masking", _stand_in_masking_from_buffer(keywords))
    stand_in = _stand_in_masked_fa4()
    monkeypatch.setattr(fa4_binding, "module", lambda: stand_in)
    q, k, v = (torch.randn(2, 8, 4, 16) for _ in range(3))
    pool = torch.zeros(256, dtype=torch.int32)
    for offset, keep in enumerate([torch.ones(2, 8, dtype=torch.bool)] + [torch.rand(2, 8) > 0.5 for _ in range(3)]):
        buffer = pool[offset * 8:offset * 8 + 160]  # each call's buffer starts elsewhere in its storage
        buffer[:16] = keep.flatten()
        out, lse = fa4_call.forward(q, k, v, **_params(causal=False), key_padding=keep, masking_buffer=buffer)
        torch.testing.assert_close(out, q * keep[:, :, None, None])
        assert stand_in.launches[-1][1][0][0].data_ptr() == buffer.data_ptr()
        dout, dq = torch.randn_like(out), torch.empty_like(q)
        fa4_call.backward(dout, q, k, v, out, lse, **_params(causal=False), key_padding=keep, masking_buffer=buffer,
                             dq=dq, dk=torch.empty_like(k), dv=torch.empty_like(v))
        torch.testing.assert_close(dq, dout * keep[:, :, None, None])
    # A forward and a backward learned, then checked (a replay and FA4's call each), their masking keywords made
    # for those two calls only; the other calls replayed.
    assert stand_in.calls == 4 and len(stand_in.launches) == 10 and keywords == [False, True, False, True]
    assert len(fa4_call._BOUND_MASKED_CALLS) == 2


def masking_lists(sparse):
    return sparse.mask_block_cnt, sparse.mask_block_idx, sparse.full_block_cnt, sparse.full_block_idx


def _stand_in_masking(q, k, v, params, backward=False, deterministic=False):
    keep = params["key_padding"].to(torch.float32)
    lists = [torch.full((q.shape[0], 1, 2), i, dtype=torch.int32) for i in range(4)]
    return dict(mask_mod="mask", aux_tensors=[keep], block_sparse_tensors=types.SimpleNamespace(
        mask_block_cnt=lists[0], mask_block_idx=lists[1], full_block_cnt=lists[2], full_block_idx=lists[3]))


def test_a_call_masked_by_data_makes_its_masking_tensors_then_replays_its_plan(monkeypatch):
    from fa4_inductor.runtime import mask_routes

    monkeypatch.setattr(fa4_call, "_MASKED_FORWARD_PLANS", launch_plan.PlanCache())
    monkeypatch.setattr(mask_routes, "fa4_masking", _stand_in_masking)
    stand_in = _stand_in_masked_fa4()
    monkeypatch.setattr(fa4_binding, "module", lambda: stand_in)
    q, k, v = (torch.randn(2, 8, 4, 16) for _ in range(3))
    for keep in (torch.ones(2, 8, dtype=torch.bool), torch.rand(2, 8) > 0.5, torch.rand(2, 8) > 0.5):
        out, _ = fa4_call.forward(q, k, v, **_params(causal=False), key_padding=keep)
        torch.testing.assert_close(out, q * keep[:, :, None, None])
    assert stand_in.calls == 2 and len(stand_in.launches) == 4  # learned, checked, then the plan replayed alone
    lists, aux = stand_in.launches[-1]
    assert lists[0].shape == (2, 4, 2) and lists[0].stride()[1] == 0 and isinstance(aux, _Aux)


def test_a_masked_call_front_key_changes_with_what_decides_its_launches(monkeypatch):
    """The masks' geometry, the buffer's size and the block-sparsity switch all pick different launches."""
    from fa4_inductor.runtime import masked_launch

    q, k, v = (torch.empty(2, 8, 4, 16) for _ in range(3))
    keep, buffer = torch.ones(2, 8, dtype=torch.bool), torch.empty(160, dtype=torch.int32)

    def key(keep=keep, segment_ids=None, buffer=buffer):
        return masked_launch.forward_key(q, k, v, 0.25, True, -1, -1, 0.0, keep, segment_ids, buffer)

    base = key()
    assert key() == base
    others = [key(segment_ids=torch.zeros(2, 8, dtype=torch.int64)), key(keep=None, segment_ids=keep.long()),
              key(buffer=torch.empty(192, dtype=torch.int32))]
    monkeypatch.setenv("FA4_INDUCTOR_BLOCK_SPARSITY", "0")
    others.append(key())
    assert all(other != base for other in others) and len(set(others)) == len(others)
