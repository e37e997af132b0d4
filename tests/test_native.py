"""The C++ forward launcher (``fa4_inductor.native``) on CPU tensors.

A Python TVM-FFI function stands in for FA4's compiled kernel: the launcher
must hand it the call's tensors in the plan's slots and the constants in
place, return the out/lse it wrote, and send unplanned calls to the Python
kernel (on CPU: the reference).
"""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from fa4_inductor import launch_plan, native

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
