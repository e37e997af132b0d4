"""The varlen ``fa4`` ops: FlashAttention-4 on packed sequences (FA4's ``cu_seqlens`` API).

``torch.ops.fa4.flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
softmax_scale, causal, window_left, window_right, softcap, seqused_k) -> (out, lse)`` takes packed tokens:
q (total_q, H, D), k and v (total_k, H_kv, D); sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q
attending to rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v (only the first ``seqused_k[b]`` of them where
given), causal and windows aligned bottom-right per sequence, as FA4 (and FA2) align them. ``out`` is a new
contiguous (total_q, H, Dv) tensor, ``lse`` the float32 (H, total_q) logsumexp, FA4's varlen layout.
``max_seqlen_q/k`` bound the sequence lengths (None: FA4 reads them from the tensors).

As :mod:`.ops`: ``flash_attn_varlen_fwd`` is ``CompositeImplicitAutograd``, so AOTAutograd traces it into
``flash_attn_varlen_fwd_kernel`` and ``flash_attn_varlen_bwd``; the fake impls give exact shapes under dynamic
token counts and, on CUDA, compile FA4's varlen kernels while the graph compiles. On CPU the kernels run
:func:`.reference.varlen_forward` / :func:`.reference.varlen_backward`.

Varlen calls run FA4's entry points on every call, not launch plans: FA4 derives per-call scheduling tensors from
the ``cu_seqlens`` values (``_compute_tile_cumsum``), which a plan replaying recorded launches would freeze. On
sm100 the forward lets FA4 split the keys of decoding-shaped calls (its ``num_splits`` heuristic).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fa4_inductor import config
from fa4_inductor._torch_private import concrete_fake_like
from fa4_inductor.runtime import fa4_binding, fa4_call, reference
from fa4_inductor.runtime.op_schemas import define_attention_ops, implement_attention_ops
from fa4_inductor.runtime.support import FA4_DTYPES

_ARGS = ("Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt? max_seqlen_q, SymInt? max_seqlen_k, "
         "float softmax_scale, bool causal=False, int window_left=-1, int window_right=-1, float softcap=0.0, "
         "Tensor? seqused_k=None")
_library = define_attention_ops("flash_attn_varlen", _ARGS)


def validate(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
             seqused_k: Tensor | None) -> None:
    """Raise ValueError naming the bad argument of a varlen call; works on fake tensors."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, H, D) for a varlen call, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, q {q.dtype} on {q.device}")
    if not q.is_floating_point() or (q.device.type == "cuda" and q.dtype not in FA4_DTYPES):
        raise ValueError(f"q dtype {q.dtype}: FA4 needs float16 or bfloat16")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] or k.shape[0] != v.shape[0]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v must match in tokens "
                         "and heads, and their heads divide q's")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("seqused_k", seqused_k)):
        if t is not None and (t.dtype != torch.int32 or t.dim() != 1 or t.device != q.device):
            raise ValueError(f"{name} must be a 1-D int32 tensor on {q.device}, got {t.dtype} {tuple(t.shape)} "
                             f"on {t.device}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, cu_seqlens_k {cu_seqlens_k.shape[0]}")
    if seqused_k is not None and seqused_k.shape[0] + 1 != cu_seqlens_k.shape[0]:
        raise ValueError(f"seqused_k has {seqused_k.shape[0]} entries for {cu_seqlens_k.shape[0] - 1} sequences")


def _options(softmax_scale, causal, window_left, window_right, softcap, seqused_k) -> dict:
    return dict(softmax_scale=softmax_scale, causal=causal, window_left=window_left, window_right=window_right,
                softcap=softcap, seqused_k=seqused_k)


class _VarlenAttention(torch.autograd.Function):
    """Forward on ``flash_attn_varlen_fwd_kernel``, backward on ``flash_attn_varlen_bwd``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *options):
        out, lse = torch.ops.fa4.flash_attn_varlen_fwd_kernel.default(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                                      max_seqlen_q, max_seqlen_k, *options)
        seqused_k = options[-1]
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k)
        ctx.params = (max_seqlen_q, max_seqlen_k, *options[:-1])
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k = ctx.saved_tensors
        dq, dk, dv = torch.ops.fa4.flash_attn_varlen_bwd.default(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                                 *ctx.params, seqused_k)
        return (dq, dk, dv) + (None,) * 10


def flash_attn_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          max_seqlen_q: int | None, max_seqlen_k: int | None, softmax_scale: float,
                          causal: bool = False, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                          seqused_k: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """FA4 attention on packed sequences; returns (out (total_q, H, Dv), lse (H, total_q)); differentiable in q,
    k, v."""
    validate(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
            window_right, softcap, seqused_k)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _VarlenAttention.apply(*args)
    return torch.ops.fa4.flash_attn_varlen_fwd_kernel.default(*args)


def _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> dict:
    return dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                max_seqlen_k=max_seqlen_k)


def _fa4_masking(causal, window_left, window_right) -> dict:
    return dict(causal=causal, window_size_left=None if window_left < 0 else window_left,
                window_size_right=None if window_right < 0 else window_right)


def _splits(q: Tensor) -> int:
    """FA4's ``num_splits`` for a varlen forward: its own split-KV heuristic (0) on sm100/sm110, where FA4 splits
    the keys of calls with few query blocks (decoding), else 1 (FA4 has no split-KV on sm90)."""
    return 0 if fa4_binding.arch_and_sms(q.device.index)[0] // 10 in (10, 11) else 1


def _run_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                 window_left, window_right, softcap, seqused_k) -> None:
    fa4_binding.flash_forward(q, k, v, out, lse, softmax_scale=softmax_scale, softcap=softcap, seqused_k=seqused_k,
                              masking=_fa4_masking(causal, window_left, window_right),
                              packed=dict(_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                                          num_splits=_splits(q)))


def _run_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  softmax_scale, causal, window_left, window_right, softcap, seqused_k) -> None:
    fa4_binding.flash_backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale=softmax_scale, softcap=softcap,
                               seqused_k=seqused_k, deterministic=torch.are_deterministic_algorithms_enabled(),
                               masking=_fa4_masking(causal, window_left, window_right),
                               packed=_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


def _outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return q.new_empty((*q.shape[:2], v.shape[-1])), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _forward_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal=False,
                 window_left=-1, window_right=-1, softcap=0.0, seqused_k=None):
    validate(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    return reference.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, **_options(
        softmax_scale, causal, window_left, window_right, softcap, seqused_k))


def _forward_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal=False,
                  window_left=-1, window_right=-1, softcap=0.0, seqused_k=None):
    validate(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    out, lse = _outputs(q, v)
    _run_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                 window_left, window_right, softcap, seqused_k)
    return out, lse


def _fake_like(t: Tensor | None) -> Tensor | None:
    return None if t is None else concrete_fake_like(t)


def _precompile(what: str, tensors: tuple, args: tuple, run) -> float:
    """Compile FA4's varlen kernels for this call once per kernel-deciding key, on fresh fake tensors (``args``:
    the schema's arguments after the tensors; ``run(fake_tensors, fake_args)`` makes the call); return seconds."""
    q, k, v = tensors[:3] if what == "forward" else tensors[1:4]
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, left, right, softcap, used = args
    key = (f"varlen {what}", q.dtype, *fa4_call.hints((*q.shape[1:], k.shape[1], v.shape[-1])), causal, left, right,
           bool(softcap), used is None, torch.are_deterministic_algorithms_enabled(),
           *fa4_call.hints((cu_seqlens_q.shape[0], max_seqlen_q, max_seqlen_k)))  # FA4's split heuristic reads them

    def build():
        fake_args = (_fake_like(cu_seqlens_q), _fake_like(cu_seqlens_k), *fa4_call.hints((max_seqlen_q, max_seqlen_k)),
                     softmax_scale, causal, left, right, softcap, _fake_like(used))
        run([_fake_like(t) for t in tensors], fake_args)

    return fa4_call.precompile_once(key, f"varlen {what}", f"{q.dtype} d={q.shape[-1]} causal={causal}", build)


def precompile_forward(q, k, v, *args) -> float:
    """Compile (or load from disk) FA4's varlen forward kernel for these (fake) inputs and the schema's other
    arguments; return seconds (0.0 when compiled before). Nothing is launched."""
    return _precompile("forward", (q, k, v), args, lambda t, a: _run_forward(*t, *_outputs(t[0], t[2]), *a))


def precompile_backward(dout, q, k, v, out, lse, *args) -> float:
    """As :func:`precompile_forward`, for the varlen backward kernels."""
    return _precompile("backward", (dout, q, k, v, out, lse), args,
                       lambda t, a: _run_backward(*t, *_gradients(*t[1:4]), *a))


def _forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal=False,
                  window_left=-1, window_right=-1, softcap=0.0, seqused_k=None):
    validate(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    if q.device.type == "cuda" and config.PRECOMPILE.on():
        precompile_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                           window_left, window_right, softcap, seqused_k)
    return _outputs(q, v)


def _backward_cpu(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                  causal=False, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None):
    validate(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    return reference.varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, **_options(
        softmax_scale, causal, window_left, window_right, softcap, seqused_k))


def _gradients(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(fa4_call.gradient_like(t) for t in (q, k, v))


def _backward_cuda(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                   causal=False, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None):
    validate(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    fa4_binding.check_backward_head_dims(q, v)
    grads = _gradients(q, k, v)
    _run_backward(dout, q, k, v, out, lse, *grads, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  softmax_scale, causal, window_left, window_right, softcap, seqused_k)
    return grads


def _backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                   causal=False, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None):
    validate(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    fa4_binding.check_backward_head_dims(q, v)
    if q.device.type == "cuda" and config.PRECOMPILE.on():
        precompile_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, causal, window_left, window_right, softcap, seqused_k)
    return _gradients(q, k, v)


implement_attention_ops(_library, "flash_attn_varlen", flash_attn_varlen_fwd, {
    "forward": {"CPU": _forward_cpu, "CUDA": _forward_cuda, "fake": _forward_fake},
    "backward": {"CPU": _backward_cpu, "CUDA": _backward_cuda, "fake": _backward_fake},
})
