"""The ``fa4`` custom ops: FlashAttention-4 forward and backward.

``torch.ops.fa4.flash_attn_fwd(q, k, v, softmax_scale, causal, window_left,
window_right, softcap, seqused_k) -> (out, lse)`` and
``torch.ops.fa4.flash_attn_bwd(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``
take B,S,H,D tensors (H_q a multiple of H_kv for GQA/MQA). ``out`` is a new
contiguous B,S,H,Dv tensor in q's dtype, ``lse`` the float32 natural-log
logsumexp, contiguous B,H,S; the gradients are new contiguous tensors shaped
like q, k, v. Windows use -1 for "unbounded" and softcap 0.0 for "off".

On CUDA the ops call FA4 through :mod:`fa4_inductor.fa4_adapter`; on CPU
they run :mod:`fa4_inductor.reference`. Fake impls give exact shapes,
dtypes and strides (symbolic sizes included), and the forward op is
differentiable through ``register_autograd``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fa4_adapter, reference
from .support import FA4_DTYPES

_OP_NS = "fa4"


def _validate(q: Tensor, k: Tensor, v: Tensor, seqused_k: Tensor | None) -> None:
    """Raise ValueError naming the bad argument; works on fake tensors."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, S, H, D), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if q.device.type == "cuda" and q.dtype not in FA4_DTYPES:
        raise ValueError(f"q dtype {q.dtype}: FA4 on CUDA needs float16 or bfloat16")
    if not q.is_floating_point():
        raise ValueError(f"q dtype {q.dtype} is not a floating type")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"head counts q={q.shape[2]}, k={k.shape[2]}, v={v.shape[2]}: "
            "k and v must match and divide q"
        )
    if seqused_k is not None and (seqused_k.dtype != torch.int32 or seqused_k.dim() != 1):
        raise ValueError(f"seqused_k must be a 1-D int32 tensor, got {seqused_k.dtype} {tuple(seqused_k.shape)}")


def _params(softmax_scale, causal, window_left, window_right, softcap, seqused_k) -> dict:
    """The attention options as keyword arguments of the adapter and the reference."""
    return dict(softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                window_right=window_right, softcap=softcap, seqused_k=seqused_k)


@torch.library.custom_op(f"{_OP_NS}::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    seqused_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """FA4 attention forward on B,S,H,D tensors; returns (out, lse)."""
    _validate(q, k, v, seqused_k)
    params = _params(softmax_scale, causal, window_left, window_right, softcap, seqused_k)
    if q.device.type == "cuda":
        return fa4_adapter.forward(q, k, v, **params)
    if q.device.type == "cpu":
        return reference.attention_forward(q, k, v, **params)
    raise ValueError(f"fa4::flash_attn_fwd has no kernel for device {q.device}")


@flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q, k, v, softmax_scale, causal=False, window_left=-1,
                         window_right=-1, softcap=0.0, seqused_k=None):
    _validate(q, k, v, seqused_k)
    batch, seqlen_q, heads = q.shape[:3]
    out = q.new_empty((batch, seqlen_q, heads, v.shape[-1]))
    lse = q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(f"{_OP_NS}::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    softmax_scale: float,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    seqused_k: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """FA4 attention backward; returns contiguous (dq, dk, dv)."""
    _validate(q, k, v, seqused_k)
    params = _params(softmax_scale, causal, window_left, window_right, softcap, seqused_k)
    if q.device.type == "cuda":
        grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        fa4_adapter.backward(dout, q, k, v, out, lse, **params, dq=grads[0], dk=grads[1], dv=grads[2])
        return grads
    if q.device.type == "cpu":
        return reference.attention_backward(dout, q, k, v, **params)
    raise ValueError(f"fa4::flash_attn_bwd has no kernel for device {q.device}")


@flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(dout, q, k, v, out, lse, softmax_scale, causal=False,
                         window_left=-1, window_right=-1, softcap=0.0, seqused_k=None):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seqused_k)
    ctx.params = (softmax_scale, causal, window_left, window_right, softcap)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, seqused_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.fa4.flash_attn_bwd(dout, q, k, v, out, lse, *ctx.params, seqused_k)
    return dq, dk, dv, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
