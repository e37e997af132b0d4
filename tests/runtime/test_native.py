"""The C++ launcher (``fa4_inductor.runtime.native``) on CPU tensors, forward and backward.

Python TVM-FFI functions stand in for FA4's compiled kernels: the launcher
must hand them the call's tensors (and a backward's scratch buffers) in the
plan's slots and the constants in place, return the outputs they wrote, and
send unplanned calls to the Python kernel (on CPU: the reference).
"""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from fa4_inductor.runtime import fa4_call, launch_plan, native

if shutil.which("c++") is None:
    pytest.skip("no C++ compiler to build the native launcher", allow_module_level=True)

tvm_ffi = pytest.importorskip("tvm_ffi")
PARAMS = dict(softmax_scale=0.25, causal=False, window_left=-1, window_right=-1, softcap=0.0)


@pytest.fixture
def plans():
    assert native.load() is None  # a compiler is present: the launcher must build
    mirrored = native.NativePlans()
    mirrored.enabled = True
    mirrored.clear()
    yield mirrored
    mirrored.clear()


def _stand_in_kernel(calls: list, out_value: torch.Tensor | None = None):
    """A TVM-FFI function with FA4's forward argument layout: notes what it got (tensors as (address,
    shape, strides, dtype)) and copies ``out_value`` into out."""
    def kernel(*args):
        calls.append([(a.data_ptr(), a.shape, a.strides, str(a.dtype)) if isinstance(a, tvm_ffi.Tensor) else a
                      for a in args])
        if out_value is not None:
            ctypes.memmove(args[3].data_ptr(), out_value.data_ptr(), out_value.numel() * out_value.element_size())

    return tvm_ffi.convert(kernel)


def _view(t: torch.Tensor):
    return t.data_ptr(), tuple(t.shape), t.stride(), str(t.dtype).replace("torch.", "")


def _register(plans, kernel, q, k, v, constants=(None, (None, None), 7, True)):
    plan = launch_plan.LaunchPlan(kernel, (None,) * 5 + (PARAMS["softmax_scale"], *constants),
                                  tuple((i, i) for i in range(5)))
    signature = launch_plan.call_signature(q, k, v, *PARAMS.values(), None)
    return plans.add(signature, launch_plan.bind(plan, q, v))


def _call(q, k, v):
    return torch.ops.fa4_native.forward(q, k, v, *PARAMS.values())


@pytest.mark.parametrize("heads_kv", [4, 2])
def test_planned_call_launches_the_function_with_the_call_tensors(plans, heads_kv):
    calls = []
    q = torch.randn(2, 16, 4, 8)
    k, v = (torch.randn(2, 16, heads_kv, 8) for _ in range(2))
    q2 = torch.randn_like(q)  # the call: same signature, new data
    assert _register(plans, _stand_in_kernel(calls, out_value=q2 * 0.25), q, k, v) and plans.count() == 1
    out, lse = _call(q2, k, v)
    assert out.shape == (2, 16, 4, 8) and lse.shape == (2, 4, 16) and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()
    assert len(calls) == 1
    tensors, constants = calls[0][:5], calls[0][5:]
    assert tensors == [_view(t) for t in (q2, k, v, out, lse)]
    assert constants[:2] == [0.25, None] and tuple(constants[2]) == (None, None) and constants[3:] == [7, True]
    torch.testing.assert_close(out, q2 * 0.25)


def test_unplanned_call_goes_to_the_python_kernel(plans):
    calls = []
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    _register(plans, _stand_in_kernel(calls), q, k, v)
    for other in (torch.randn(1, 17, 2, 8), q.transpose(1, 2).contiguous().transpose(1, 2)):
        out, lse = _call(other, other, other)  # a new length, new strides: no plan
        ref_out, ref_lse = torch.ops.fa4.flash_attn_fwd_kernel(other, other, other, *PARAMS.values())
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(lse, ref_lse)
    assert calls == []
    plans.clear()
    assert plans.count() == 0
    _call(q, k, v)
    assert calls == []


def test_kernel_error_is_raised_with_its_message(plans):
    def failing(*args):
        raise ValueError("bad launch")

    q, k, v = (torch.randn(1, 8, 2, 8) for _ in range(3))
    _register(plans, tvm_ffi.convert(failing), q, k, v)
    with pytest.raises(RuntimeError, match="FA4 kernel call failed.*bad launch"):
        _call(q, k, v)


def test_plans_whose_kernel_is_not_a_tvm_ffi_function_stay_in_python(plans):
    q, k, v = (torch.randn(1, 8, 2, 8) for _ in range(3))
    assert not _register(plans, lambda *args: None, q, k, v)
    assert plans.count() == 0


def test_plan_cache_tells_its_mirror():
    events = []

    class Mirror:
        def add(self, signature, bound):
            events.append(("add", signature))

        def clear(self):
            events.append(("clear",))

    cache = launch_plan.PlanCache(max_signatures=2, mirror=Mirror())
    bound = object()
    cache.index("a", bound)
    cache.index("b", None)  # not replayable: nothing to mirror
    cache.index("c", bound)  # over the bound: cleared first
    cache.clear()
    assert events == [("add", "a"), ("clear",), ("add", "c"), ("clear",)]


BACKWARD_PARAMS = dict(softmax_scale=0.5, causal=True, window_left=-1, window_right=-1, softcap=0.0)


@pytest.fixture
def backward_plans():
    assert native.load() is None
    mirrored = native.NativeBackwardPlans()
    mirrored.enabled = True
    mirrored.clear()
    yield mirrored
    mirrored.clear()


def _backward_inputs(layout: str = "bshd"):
    """dout, q, k, v, out (B,S,H,D; "bhsd": views of B,H,S,D memory) and lse (B,H,S)."""
    def tensor():
        t = torch.randn(2, 2, 8, 4) if layout == "bhsd" else torch.randn(2, 8, 2, 4)
        return t.transpose(1, 2) if layout == "bhsd" else t
    return (*(tensor() for _ in range(5)), torch.randn(2, 2, 8))


def _backward_signature(inputs, **masks):
    """The exact signature fa4_call.backward gives this call (its gradients as the Python kernel makes them)."""
    grads = [fa4_call.gradient_like(t) for t in inputs[1:4]]
    params = dict(BACKWARD_PARAMS, seqused_k=None, key_padding=None, segment_ids=None, masking_buffer=None,
                  deterministic=torch.are_deterministic_algorithms_enabled())
    params.update(masks)
    return launch_plan.exact_signature((*inputs, *grads), params)


def _alias(a) -> torch.Tensor:
    """A torch view of a TVM-FFI tensor argument's float32 CPU memory (``torch.from_dlpack`` of the launcher's
    borrowed tensor views crashes)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(a.shape, a.strides))
    memory = (ctypes.c_float * extent).from_address(a.data_ptr())
    return torch.frombuffer(memory, dtype=torch.float32).as_strided(tuple(a.shape), tuple(a.strides))


def _stand_in_backward(seen: dict):
    """FA4's three backward kernels as TVM-FFI functions over slots (dout, q, k, v, out, lse, dq, dk, dv, then
    two scratch buffers, the first zero-filled): dq = dout * out * scale + 1, dk = k, dv = v."""
    def preprocess(dout, out, accum):
        accum = _alias(accum)
        seen.setdefault("accum_was_zero", []).append(bool((accum == 0).all()))
        accum.add_(_alias(dout) * _alias(out))

    def main(k, v, accum, dq, dk, dv, scale):
        seen.setdefault("scale", []).append(scale)
        _alias(dq).copy_(_alias(accum) * scale)
        _alias(dk).copy_(_alias(k))
        _alias(dv).copy_(_alias(v))

    def postprocess(dq, other):
        seen.setdefault("other", []).append(tuple(_alias(other).shape))
        _alias(dq).add_(1)

    launches = (launch_plan.LaunchPlan(tvm_ffi.convert(preprocess), (None,) * 3, ((0, 0), (1, 4), (2, 9))),
                launch_plan.LaunchPlan(tvm_ffi.convert(main), (None,) * 6 + (0.5,),
                                       ((0, 2), (1, 3), (2, 9), (3, 6), (4, 7), (5, 8))),
                launch_plan.LaunchPlan(tvm_ffi.convert(postprocess), (None, None), ((0, 6), (1, 10))))
    scratch = (launch_plan.Scratch((2, 8, 2, 4), (64, 8, 4, 1), torch.float32, True),
               launch_plan.Scratch((3, 5), (1, 3), torch.float32, False))
    return launch_plan.LaunchSequence(launches, scratch)


def _native_backward(inputs):
    return torch.ops.fa4_native.backward(*inputs, *BACKWARD_PARAMS.values())


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_planned_backward_launches_its_kernels_in_order_on_fresh_scratch(backward_plans, layout):
    seen = {}
    assert backward_plans.add(_backward_signature(_backward_inputs(layout)), _stand_in_backward(seen))
    assert backward_plans.count() == 1
    for _ in range(2):  # the second call gets a fresh zero-filled accumulator, not the first's
        inputs = _backward_inputs(layout)
        dout, q, k, v, out, _ = inputs
        dq, dk, dv = _native_backward(inputs)
        torch.testing.assert_close(dq, dout * out * 0.5 + 1)
        torch.testing.assert_close(dk, k)
        torch.testing.assert_close(dv, v)
        for grad, t in zip((dq, dk, dv), (q, k, v)):
            assert grad.stride() == fa4_call.gradient_like(t).stride()  # the Python kernel's layout
    assert seen == {"accum_was_zero": [True, True], "scale": [0.5, 0.5], "other": [(3, 5), (3, 5)]}


def test_unplanned_or_masked_backward_goes_to_the_python_kernel(backward_plans):
    seen = {}
    backward_plans.add(_backward_signature(_backward_inputs()), _stand_in_backward(seen))
    for inputs in (_backward_inputs("bhsd"), tuple(t[:1] for t in _backward_inputs())):  # new strides, new batch
        got = _native_backward(inputs)
        want = torch.ops.fa4.flash_attn_bwd(*inputs, *BACKWARD_PARAMS.values())  # CPU: the reference
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    inputs = _backward_inputs()
    padding = torch.ones(2, 8, dtype=torch.bool)
    got = torch.ops.fa4_native.backward(*inputs, *BACKWARD_PARAMS.values(), key_padding=padding)
    want = torch.ops.fa4.flash_attn_bwd(*inputs, *BACKWARD_PARAMS.values(), key_padding=padding)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert seen == {}


def test_backward_plans_the_launcher_cant_serve_stay_in_python(backward_plans):
    inputs = _backward_inputs()
    sequence = _stand_in_backward({})
    assert not backward_plans.add(_backward_signature(inputs, key_padding=torch.ones(1)), sequence)  # masked
    grads = [torch.empty_like(t).transpose(1, 2).contiguous().transpose(1, 2) for t in inputs[1:4]]
    params = dict(BACKWARD_PARAMS, seqused_k=None, key_padding=None, segment_ids=None, masking_buffer=None,
                  deterministic=False)
    other_layout = launch_plan.exact_signature((*inputs, *grads), params)
    assert not backward_plans.add(other_layout, sequence)  # gradients in a layout the launcher doesn't allocate
    python_kernel = _with_first_kernel(sequence, lambda *args: None)
    assert not backward_plans.add(_backward_signature(inputs), python_kernel)  # a kernel that isn't TVM-FFI
    assert backward_plans.count() == 0


def _with_first_kernel(sequence, kernel):
    """``sequence`` with its first launch calling ``kernel``."""
    first = sequence.launches[0]
    launches = (launch_plan.LaunchPlan(kernel, first.args, first.slots), *sequence.launches[1:])
    return launch_plan.LaunchSequence(launches, sequence.scratch)


def test_backward_kernel_error_is_raised_with_its_message(backward_plans):
    def failing(*args):
        raise ValueError("bad backward launch")

    sequence = _stand_in_backward({})
    broken = _with_first_kernel(sequence, tvm_ffi.convert(failing))
    inputs = _backward_inputs()
    assert backward_plans.add(_backward_signature(inputs), broken)
    with pytest.raises(RuntimeError, match="FA4 kernel call failed.*bad backward launch"):
        _native_backward(inputs)


def test_plan_cache_tells_its_trusted_mirror_of_checked_plans():
    events = []

    class Mirror:
        def add(self, signature, sequence):
            events.append(("add", signature))

        def clear(self):
            events.append(("clear",))

    cache = launch_plan.PlanCache(max_signatures=2, trusted_mirror=Mirror())
    plan = launch_plan.LaunchSequence((launch_plan.LaunchPlan(lambda out: out.fill_(1.0), (None,), ((0, 0),)),), ())
    tensors = (torch.zeros(1),)
    for signature in ("a", "b", "c"):
        cache._put(signature, plan, trusted=False)  # learned, not checked yet: not mirrored
        cache.replay_or_learn(signature, tensors, torch.device("cpu"), lambda call: call[0].fill_(1.0), None,
                              inputs=0, outputs={0: "out"}, kind="test")  # its check, which it passes
    cache.clear()
    assert events == [("add", "a"), ("add", "b"), ("clear",), ("add", "c"), ("clear",)], events


def test_first_cuda_call_installs_the_launcher_over_the_python_kernel(monkeypatch):
    """Import registers the Python CUDA kernels; the first CUDA call installs the C++ ones over them, silently, once."""
    import warnings

    assert native.load() is None
    dump = torch._C._dispatch_dump("fa4::flash_attn_fwd_kernel")
    assert "CUDA: registered at" in dump and "launcher.cpp" not in dump  # the Python kernel, nothing built at import
    monkeypatch.setattr(native, "_installable", lambda: True)
    monkeypatch.setattr(native.PLANS, "enabled", False)
    monkeypatch.setattr(native.BACKWARD_PLANS, "enabled", False)
    native.install_cuda_forward.cache_clear()
    native.install_cuda_backward.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.install_cuda_forward() and native.install_cuda_backward()
        assert native.install_cuda_forward()  # once: the second call is the cached answer
    for op in ("flash_attn_fwd_kernel", "flash_attn_bwd"):
        dump = torch._C._dispatch_dump(f"fa4::{op}")
        active = next(line for line in dump.splitlines() if line.startswith("CUDA:"))
        assert "launcher.cpp" in active and "CUDA (inactive)" in dump, dump
    assert native.PLANS.enabled and native.BACKWARD_PLANS.enabled
    native.install_cuda_forward.cache_clear()
    native.install_cuda_backward.cache_clear()
