"""The ALiBi ``fa4`` ops: FlashAttention-4 with a linear position bias per head, as an FA4 ``score_mod``.

``torch.ops.fa4.flash_attn_alibi_fwd(q, k, v, slopes, softmax_scale, causal, window_left, window_right) -> (out,
lse)`` takes B,S,H,D tensors as ``fa4.flash_attn_fwd`` does and ``slopes`` (H_q,) float32: query ``i`` scores key
``j`` as ``softmax_scale * q_i·k_j + slopes[h] * (j - i - (S_k - S_q))``, 0 on the bottom-right diagonal. A bias of
``slopes[h] * j`` or ``slopes[h] * (j - i)`` differs from it by a constant per row, which softmax ignores: the same
attention (only the logsumexp moves by that constant). FA2's ``alibi_slopes`` under causal masking
(``-slope * |i + S_k - S_q - j|`` on the visible keys) is exactly this bias.

As :mod:`.ops`: ``flash_attn_alibi_fwd`` is ``CompositeImplicitAutograd``; AOTAutograd traces it into
``flash_attn_alibi_fwd_kernel`` and ``flash_attn_alibi_bwd``; the fake impls compile FA4's kernels while the graph
compiles (CUDA); the CPU kernels run :mod:`.reference`. The CUDA kernels call FA4's entry points with the
``score_mod`` of :func:`.fa4_binding.alibi_score_mods` and the slopes as its aux tensor, on every call (no launch
plans, which replay only calls without a score_mod).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fa4_inductor import config
from fa4_inductor._torch_private import concrete_fake_like
from fa4_inductor.runtime import fa4_binding, fa4_call, reference
from fa4_inductor.runtime.op_schemas import define_attention_ops, implement_attention_ops

_ARGS = "Tensor slopes, float softmax_scale, bool causal=False, int window_left=-1, int window_right=-1"
_library = define_attention_ops("flash_attn_alibi", _ARGS)


def validate(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor) -> None:
    """Raise ValueError naming the bad argument; works on fake tensors."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be a 4-D (B, S, H, D) tensor like q, got {t.dtype} {tuple(t.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: head dims of q and k, or the "
                         "head counts, don't match")
    if slopes.dtype != torch.float32 or tuple(slopes.shape) != (q.shape[2],) or slopes.device != q.device:
        raise ValueError(f"slopes must be a float32 ({q.shape[2]},) tensor on {q.device}, one per query head, got "
                         f"{slopes.dtype} {tuple(slopes.shape)} on {slopes.device}")


class _AlibiAttention(torch.autograd.Function):
    """Forward on ``flash_attn_alibi_fwd_kernel``, backward on ``flash_attn_alibi_bwd``."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, *options):
        out, lse = torch.ops.fa4.flash_attn_alibi_fwd_kernel.default(q, k, v, slopes, *options)
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        grads = torch.ops.fa4.flash_attn_alibi_bwd.default(dout, q, k, v, out, lse, slopes, *ctx.options)
        return (*grads, None, None, None, None, None)


def flash_attn_alibi_fwd(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, softmax_scale: float, causal: bool = False,
                         window_left: int = -1, window_right: int = -1) -> tuple[Tensor, Tensor]:
    """FA4 attention with ALiBi on B,S,H,D tensors; returns (out, lse); differentiable in q, k, v (not in the
    slopes: FA4's backward gives them no gradient)."""
    validate(q, k, v, slopes)
    args = (q, k, v, slopes, softmax_scale, causal, window_left, window_right)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AlibiAttention.apply(*args)
    return torch.ops.fa4.flash_attn_alibi_fwd_kernel.default(*args)


def _masking(slopes: Tensor, causal: bool, window_left: int, window_right: int, backward: bool = False) -> dict:
    score_mod, score_mod_bwd = fa4_binding.alibi_score_mods()
    masking = dict(causal=causal, window_size_left=None if window_left < 0 else window_left,
                   window_size_right=None if window_right < 0 else window_right, score_mod=score_mod,
                   aux_tensors=[slopes])
    return dict(masking, score_mod_bwd=score_mod_bwd) if backward else masking


def _outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, heads = q.shape[:3]
    return (q.new_empty((batch, seqlen_q, heads, v.shape[-1])),
            q.new_empty((batch, heads, seqlen_q), dtype=torch.float32))


def _run_forward(q, k, v, slopes, softmax_scale, causal, window_left, window_right) -> tuple[Tensor, Tensor]:
    out, lse = _outputs(q, v)
    fa4_binding.flash_forward(q, k, v, out, lse, softmax_scale=softmax_scale, softcap=0.0, seqused_k=None,
                              masking=_masking(slopes, causal, window_left, window_right))
    return out, lse


def _run_backward(dout, q, k, v, out, lse, slopes, softmax_scale, causal, window_left, window_right):
    grads = tuple(fa4_call.gradient_like(t) for t in (q, k, v))
    fa4_binding.flash_backward(dout, q, k, v, out, lse, *grads, softmax_scale=softmax_scale, softcap=0.0,
                               seqused_k=None, deterministic=torch.are_deterministic_algorithms_enabled(),
                               masking=_masking(slopes, causal, window_left, window_right, backward=True))
    return grads


def _forward_cpu(q, k, v, slopes, softmax_scale, causal=False, window_left=-1, window_right=-1):
    validate(q, k, v, slopes)
    return reference.attention_forward(q, k, v, softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                                       window_right=window_right, alibi_slopes=slopes)


def _forward_cuda(q, k, v, slopes, softmax_scale, causal=False, window_left=-1, window_right=-1):
    validate(q, k, v, slopes)
    return _run_forward(q, k, v, slopes, softmax_scale, causal, window_left, window_right)


def _backward_cpu(dout, q, k, v, out, lse, slopes, softmax_scale, causal=False, window_left=-1, window_right=-1):
    validate(q, k, v, slopes)
    grads = reference.attention_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                                         window_left=window_left, window_right=window_right, alibi_slopes=slopes)
    return tuple(fa4_call.gradient_like(t).copy_(g) for t, g in zip((q, k, v), grads))


def _backward_cuda(dout, q, k, v, out, lse, slopes, softmax_scale, causal=False, window_left=-1, window_right=-1):
    validate(q, k, v, slopes)
    fa4_binding.check_backward_head_dims(q, v)
    return _run_backward(dout, q, k, v, out, lse, slopes, softmax_scale, causal, window_left, window_right)


def precompile(what: str, tensors: tuple, options: tuple) -> float:
    """Compile (or load from disk) FA4's ALiBi ``what`` ("forward" or "backward") kernels for these (fake) tensors
    (q, k, v, slopes; the backward's dout, q, k, v, out, lse, slopes) and options (softmax_scale, causal,
    window_left, window_right); return seconds (0.0 when compiled before). Nothing is launched."""
    q, k, v = tensors[:3] if what == "forward" else tensors[1:4]
    key = (f"ALiBi {what}", q.dtype, *fa4_call.hints((*q.shape[2:], k.shape[2], v.shape[-1])), *options[1:],
           torch.are_deterministic_algorithms_enabled())
    run = _run_forward if what == "forward" else _run_backward
    return fa4_call.precompile_once(key, f"ALiBi {what}", f"{q.dtype} d={q.shape[-1]} causal={options[1]}",
                                    lambda: run(*(concrete_fake_like(t) for t in tensors), *options))


def _forward_fake(q, k, v, slopes, softmax_scale, causal=False, window_left=-1, window_right=-1):
    validate(q, k, v, slopes)
    if q.device.type == "cuda" and config.PRECOMPILE.on():
        precompile("forward", (q, k, v, slopes), (softmax_scale, causal, window_left, window_right))
    return _outputs(q, v)


def _backward_fake(dout, q, k, v, out, lse, slopes, softmax_scale, causal=False, window_left=-1, window_right=-1):
    validate(q, k, v, slopes)
    fa4_binding.check_backward_head_dims(q, v)
    if q.device.type == "cuda" and config.PRECOMPILE.on():
        precompile("backward", (dout, q, k, v, out, lse, slopes), (softmax_scale, causal, window_left, window_right))
    return tuple(fa4_call.gradient_like(t) for t in (q, k, v))


implement_attention_ops(_library, "flash_attn_alibi", flash_attn_alibi_fwd, {
    "forward": {"CPU": _forward_cpu, "CUDA": _forward_cuda, "fake": _forward_fake},
    "backward": {"CPU": _backward_cpu, "CUDA": _backward_cuda, "fake": _backward_fake},
})
