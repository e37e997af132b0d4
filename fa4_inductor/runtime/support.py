"""Can FA4 serve this attention call? One answer for eager and compiled paths.

:func:`unsupported_reason` returns ``None`` when the call can run on FA4 (or,
for CPU tensors with CPU routing enabled, on the reference implementation
under the same rules as sm90), else a short reason naming the argument.
The compiled path calls it at graph-rewrite time with fake tensors and
symbolic shapes, the eager override at call time with real tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from fa4_inductor.runtime import cuda_arch, fa4_binding

FA4_DTYPES = (torch.float16, torch.bfloat16)
# The CPU reference mirrors FA4's rules as they stand on this architecture.
REFERENCE_ARCH_MAJOR = 9


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What the support rules need to know about one SDPA-style call.

    Shapes are in SDPA's B,H,S,D order and may hold SymInts.
    """

    device: torch.device
    dtype: torch.dtype
    q_shape: Sequence
    k_shape: Sequence
    v_shape: Sequence
    dropout_p: float = 0.0
    has_attn_mask: bool = False
    is_causal: bool = False
    enable_gqa: bool = False
    last_dim_strides: Sequence = (1, 1, 1)
    k_dtype: torch.dtype | None = None
    v_dtype: torch.dtype | None = None
    needs_backward: bool = False

    @staticmethod
    def from_tensors(q, k, v, **flags) -> "AttentionCall":
        """Describe a call from (real or fake) B,H,S,D tensors. It needs a backward when grad mode is on and one
        requires grad: AOTAutograd's own test for tracing a backward, and the eager autograd's."""
        devices = {t.device for t in (q, k, v)}
        if len(devices) != 1:
            raise ValueError(
                f"query, key and value must be on one device, got {sorted(map(str, devices))}"
            )
        return AttentionCall(
            device=q.device, dtype=q.dtype, k_dtype=k.dtype, v_dtype=v.dtype,
            q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
            last_dim_strides=tuple(t.stride(-1) if t.dim() else 1 for t in (q, k, v)),
            needs_backward=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
            **flags,
        )


def is_dtensor(tensor) -> bool:
    """Is this (possibly fake) tensor a DTensor, as context or tensor parallelism makes them?"""
    if type(tensor) is torch.Tensor or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _static_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _arch_reason(device: torch.device, arch_major: int | None) -> tuple[str | None, int]:
    """Device-level reason (FA4 missing, wrong arch) and the arch the rules follow."""
    if device.type == "cpu":
        return None, REFERENCE_ARCH_MAJOR
    if arch_major is None:
        reason = fa4_binding.unavailable_reason()
        if reason:
            return reason, 0
        if not torch.cuda.is_available():
            return "CUDA is not available", 0
        arch_major = cuda_arch.major(device.index)
    if arch_major not in fa4_binding.SUPPORTED_ARCH_MAJORS:
        return f"FA4 needs sm90/sm100/sm110, this GPU is sm{arch_major}x", arch_major
    return None, arch_major


def unsupported_reason(
    call: AttentionCall,
    devices: Sequence[str],
    *,
    arch_major: int | None = None,
) -> str | None:
    """Why FA4 can't serve ``call``, or None if it can.

    ``devices`` are the device types routed to FA4 (``"cuda"``; ``"cpu"``
    selects the reference implementation). ``arch_major`` overrides the
    detected GPU architecture, to ask "would this run on sm90?" on any
    machine; FA4 availability is then not checked.
    """
    if call.device.type not in devices:
        return f"device '{call.device.type}' is not routed to FA4 (devices={tuple(devices)})"
    if call.device.type not in ("cuda", "cpu"):
        return f"device '{call.device.type}' has no FA4 kernel"
    reason, arch = _arch_reason(call.device, arch_major)
    if reason:
        return reason
    if call.dtype not in FA4_DTYPES:
        return f"dtype {call.dtype} unsupported: FA4 runs float16/bfloat16"
    if any(d is not None and d != call.dtype for d in (call.k_dtype, call.v_dtype)):
        return f"query/key/value dtypes differ ({call.dtype}, {call.k_dtype}, {call.v_dtype})"
    if not (len(call.q_shape) == len(call.k_shape) == len(call.v_shape) == 4):
        return "query, key and value must be 4-D (B, H, S, D)"
    if not (isinstance(call.dropout_p, (int, float)) and call.dropout_p == 0.0):
        return f"dropout_p={call.dropout_p}: FA4 has no dropout"
    if call.has_attn_mask:
        return "attn_mask is not a mask FA4 can express"
    (b, hq, sq, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = call.q_shape, call.k_shape, call.v_shape
    dims = [_static_int(x) for x in (d, dk, dv, hq, hk, hv)]
    if None in dims:
        return "head counts and head dims must be static"
    d, dk, dv, hq, hk, hv = dims
    if d != dk:
        return f"query head dim {d} != key head dim {dk}"
    if hk != hv:
        return f"key heads {hk} != value heads {hv}"
    if hq != hk and not call.enable_gqa:
        return f"query heads {hq} != key heads {hk} without enable_gqa"
    if hq % hk:
        return f"query heads {hq} not a multiple of key heads {hk}"
    # Separate size symbols under dynamic shapes (from separate inputs) are equal whenever the program is valid;
    # a guard makes the compiled graph conditional on that.
    if not (guard_or_false(b == bk) and guard_or_false(b == bv)):
        return "batch sizes of query, key and value differ"
    if not guard_or_false(sk == sv):
        return "key and value sequence lengths differ"
    # The CPU reference has no kernel bugs to mirror: only CUDA calls (real or assumed) avoid FA4's.
    reason = fa4_binding.head_dim_reason(arch, d, dv, call.dtype.itemsize,
                                     backward=call.needs_backward and call.device.type == "cuda")
    if reason:
        return reason
    # Under dynamic shapes the two lengths may be separate symbols (self attention: equal whenever it runs).
    if call.is_causal and not guard_or_false(sq == sk):
        return "is_causal with S_q != S_kv: SDPA aligns top-left, FA4 bottom-right"
    if any(_static_int(s) != 1 for s in call.last_dim_strides):
        return "query/key/value last dim is not contiguous"
    return None
