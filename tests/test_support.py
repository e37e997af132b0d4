"""The one support check: a reason for everything FA4 can't serve."""

import pytest
import torch

from fa4_inductor.support import AttentionCall, unsupported_reason


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
