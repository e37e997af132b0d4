"""The one support check: a reason for everything FA4 can't serve."""

import pytest
import torch

from fa4_inductor.runtime.support import AttentionCall, unsupported_reason


def _call(**overrides):
    base = dict(device=torch.device("cuda"), dtype=torch.bfloat16, q_shape=(2, 8, 128, 128),
                k_shape=(2, 8, 128, 128), v_shape=(2, 8, 128, 128))
    base.update(overrides)
    return AttentionCall(**base)


@pytest.mark.parametrize("overrides, arch, expected", [
    ({}, 9, None),
    ({}, 10, None),
    ({"k_shape": (2, 2, 128, 128), "v_shape": (2, 2, 128, 128), "enable_gqa": True}, 9, None),
    ({}, 8, "this GPU is sm8x"),
    ({"dtype": torch.float32}, 9, "dtype torch.float32"),
    ({"dropout_p": 0.1}, 9, "dropout_p=0.1"),
    ({"has_attn_mask": True}, 9, "attn_mask"),
    ({"q_shape": (2, 8, 128, 12), "k_shape": (2, 8, 128, 12), "v_shape": (2, 8, 128, 12)}, 9, "multiples of 8"),
    ({"q_shape": (2, 8, 128, 512), "k_shape": (2, 8, 128, 512), "v_shape": (2, 8, 128, 512)}, 9, "8..256"),
    ({"q_shape": (2, 8, 128, 256), "k_shape": (2, 8, 128, 256), "v_shape": (2, 8, 128, 192)}, 10, "sm100"),
    ({"k_shape": (2, 2, 128, 128), "v_shape": (2, 2, 128, 128)}, 9, "without enable_gqa"),
    ({"k_shape": (2, 3, 128, 128), "v_shape": (2, 3, 128, 128), "enable_gqa": True}, 9, "not a multiple"),
    ({"q_shape": (2, 8, 64, 128), "is_causal": True}, 9, "top-left"),
    ({"last_dim_strides": (2, 1, 1)}, 9, "last dim"),
    ({"q_shape": (8, 128, 128)}, 9, "4-D"),
    ({"k_dtype": torch.float16}, 9, "dtypes differ"),
])
def test_reasons(overrides, arch, expected):
    reason = unsupported_reason(_call(**overrides), ("cuda",), arch_major=arch)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_device_not_routed():
    assert "not routed" in unsupported_reason(_call(device=torch.device("cpu")), ("cuda",))


def test_cpu_reference_follows_sm90_rules():
    call = _call(device=torch.device("cpu"))
    assert unsupported_reason(call, ("cpu",)) is None
    assert "8..256" in unsupported_reason(
        _call(device=torch.device("cpu"), q_shape=(1, 1, 4, 512), k_shape=(1, 1, 4, 512), v_shape=(1, 1, 4, 512)),
        ("cpu",))


def test_mismatched_devices_raise_value_error():
    q = torch.empty(1, 1, 4, 8)
    with pytest.raises(ValueError, match="one device"):
        AttentionCall.from_tensors(q, q.to("meta"), q)


def _head_dims(d, dv=None):
    dv = d if dv is None else dv
    return {"q_shape": (2, 8, 128, d), "k_shape": (2, 8, 128, d), "v_shape": (2, 8, 128, dv)}


@pytest.mark.parametrize("d, dv, needs_backward, arch, wrong", [
    (16, None, True, 9, True), (8, None, True, 9, True), (80, None, True, 9, True), (64, 48, True, 9, True),
    (16, None, False, 9, False), (32, None, True, 9, False), (96, None, True, 9, False),
    (128, None, True, 9, False), (16, None, True, 10, False),
])
def test_sm90_head_dims_whose_fa4_gradients_are_wrong_fall_back_when_a_backward_is_needed(d, dv, needs_backward,
                                                                                          arch, wrong):
    call = _call(needs_backward=needs_backward, **_head_dims(d, dv))
    reason = unsupported_reason(call, ("cuda",), arch_major=arch)
    assert (reason is not None and "PR #2896" in reason) == wrong, reason
    cpu_call = _call(device=torch.device("cpu"), needs_backward=needs_backward, **_head_dims(d, dv))
    assert unsupported_reason(cpu_call, ("cpu",)) is None  # the CPU reference computes them right


def test_a_call_needs_a_backward_when_grad_mode_is_on_and_an_input_requires_grad():
    q = torch.randn(1, 2, 8, 16)
    assert not AttentionCall.from_tensors(q, q, q).needs_backward
    assert AttentionCall.from_tensors(q, q.requires_grad_(), q).needs_backward
    with torch.no_grad():
        assert not AttentionCall.from_tensors(q, q, q).needs_backward
