"""The ``fa4`` custom ops: FlashAttention-4 forward and backward.

``torch.ops.fa4.flash_attn_fwd(q, k, v, softmax_scale, causal, window_left,
window_right, softcap, seqused_k) -> (out, lse)`` and
``torch.ops.fa4.flash_attn_bwd(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``
take B,S,H,D tensors (H_q a multiple of H_kv for GQA/MQA). ``out`` is a new
contiguous B,S,H,Dv tensor in q's dtype, ``lse`` the float32 natural-log
logsumexp, contiguous B,H,S; the gradients are new contiguous tensors shaped
like q, k, v. Windows use -1 for "unbounded" and softcap 0.0 for "off".
``key_padding`` (B, S_kv, bool) hides the keys where it is false (a padded
batch); ``segment_ids`` (B, S, integer, S_q == S_kv) lets query ``i`` see key
``j`` only where ``segment_ids[b, i] == segment_ids[b, j]`` (packed documents);
``seqused_k`` (B, int32) hides keys at or past a per-row length. Masks are
and-ed. The gradients take the layout of q, k, v where that is dense (so a
B,S,H,D view of a B,H,S,D tensor gets its gradient in B,H,S,D memory).

``flash_attn_fwd`` is the differentiable op that graphs and users call. It
is ``CompositeImplicitAutograd``: AOTAutograd traces through it into
``fa4.flash_attn_fwd_kernel`` (forward) and ``fa4.flash_attn_bwd``
(backward), ops with no Python autograd kernel. So a compiled graph calls
FA4 through the dispatcher's C++ path only, not through a Python autograd
wrapper on every call (``torch.library.custom_op`` and ``register_autograd``
cost ~20-50 µs a call, more than a small attention kernel). A call masked by
data (key padding, segment ids) first makes its masking buffer with
``fa4.masking_buffer`` (:mod:`fa4_inductor.runtime.masking_buffer`: FA4's mask
operands and both block lists, one int32 tensor) and runs
``fa4.flash_attn_fwd_masked_kernel`` on it; the backward takes it as
``masking_buffer``. So a step builds its masking once, and once for all the
calls with the same masks (AOTAutograd's CSE merges their buffer ops in a
training graph, :mod:`fa4_inductor.compile.buffer_sharing` in an inference graph).

On CUDA the kernels call FA4 through :mod:`fa4_inductor.runtime.fa4_call` (the
forward and the backward through the C++ launcher of :mod:`fa4_inductor.runtime.native`,
built on the first CUDA call where it can be, which replays learned, checked launch plans with no Python); on CPU they run
:mod:`fa4_inductor.runtime.reference`. Fake impls give exact shapes,
dtypes and strides (symbolic sizes included); on CUDA they also compile the
FA4 kernels the graph will need, while the graph compiles.
"""

from __future__ import annotations


import torch

from fa4_inductor import config
from torch import Tensor

from fa4_inductor.runtime import data_mask, fa4_call, fa4_binding, mask_routes, native, reference
from fa4_inductor.runtime import position_bias, varlen  # noqa: F401  (register the position-bias and varlen ops)
from fa4_inductor._torch_private import empty_contiguous
from fa4_inductor.runtime.support import FA4_DTYPES

_OP_NS = "fa4"


def _validate(q: Tensor, k: Tensor, v: Tensor, seqused_k: Tensor | None,
              key_padding: Tensor | None = None, segment_ids: Tensor | None = None) -> None:
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
    if key_padding is not None and (key_padding.dtype != torch.bool or key_padding.dim() != 2
                                    or key_padding.shape[0] != q.shape[0] or key_padding.shape[1] != k.shape[1]):
        raise ValueError(f"key_padding must be a bool (B, S_kv) = ({q.shape[0]}, {k.shape[1]}) tensor, "
                         f"got {key_padding.dtype} {tuple(key_padding.shape)}")
    if seqused_k is not None and (key_padding is not None or segment_ids is not None):
        raise ValueError("seqused_k can't be combined with key_padding or segment_ids: express the lengths as "
                         "key_padding")
    if segment_ids is not None and (segment_ids.is_floating_point() or segment_ids.is_complex()
                                    or segment_ids.dtype == torch.bool or segment_ids.dim() != 2
                                    or segment_ids.shape[0] != q.shape[0] or segment_ids.shape[1] != k.shape[1]
                                    or q.shape[1] != k.shape[1]):
        raise ValueError(f"segment_ids must be an integer (B, S) = ({q.shape[0]}, {k.shape[1]}) tensor with "
                         f"S_q == S_kv (got {segment_ids.dtype} {tuple(segment_ids.shape)}, S_q={q.shape[1]})")


def _params(softmax_scale, causal, window_left, window_right, softcap, seqused_k, key_padding, segment_ids) -> dict:
    """The attention options as keyword arguments of the adapter and the reference."""
    return dict(softmax_scale=softmax_scale, causal=causal, window_left=window_left, window_right=window_right,
                softcap=softcap, seqused_k=seqused_k, key_padding=key_padding, segment_ids=segment_ids)


_ARGS = ("float softmax_scale, bool causal=False, int window_left=-1, int window_right=-1, "
         "float softcap=0.0, Tensor? seqused_k=None, Tensor? key_padding=None, Tensor? segment_ids=None")
_TAGS = (torch.Tag.pt2_compliant_tag,)

_library = torch.library.Library(_OP_NS, "DEF")
_library.define(f"flash_attn_fwd(Tensor q, Tensor k, Tensor v, {_ARGS}) -> (Tensor, Tensor)", tags=_TAGS)
_library.define(f"flash_attn_fwd_kernel(Tensor q, Tensor k, Tensor v, {_ARGS}) -> (Tensor, Tensor)", tags=_TAGS)
# The masking buffer of calls masked by data (see fa4_inductor.runtime.masking_buffer): an op of its own, so that a graph
# makes it once for every call with the same masks (across layers) and the backward reuses it.
_library.define("masking_buffer(Tensor? key_padding, Tensor? segment_ids, SymInt seqlen_q, int head_dim, "
                "int head_dim_v, bool causal=False, int window_left=-1, int window_right=-1) -> Tensor", tags=_TAGS)
# The forward of a call masked by data, reading its masking buffer (making its own without one).
_library.define(f"flash_attn_fwd_masked_kernel(Tensor q, Tensor k, Tensor v, {_ARGS}, Tensor? masking_buffer=None) "
                "-> (Tensor, Tensor)", tags=_TAGS)
# The Python kernel behind the native launcher: it serves the calls the launcher has no plan for.
_library.define(f"_flash_attn_fwd_python(Tensor q, Tensor k, Tensor v, {_ARGS}) -> (Tensor, Tensor)")
_BACKWARD_SCHEMA = (f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_ARGS}, "
                    "Tensor? masking_buffer=None) -> (Tensor, Tensor, Tensor)")
_library.define(f"flash_attn_bwd{_BACKWARD_SCHEMA}", tags=_TAGS)
# Attention whose mask is a tensor of data (runtime/data_mask.py): FA4 where the mask's values are a mask FA4
# expresses, decided per call; dense math on the mask otherwise. ``mask`` is bool (True keeps, or hides with
# ``mask_hides``) or additive, broadcastable to (B, H, S_q, S_kv).
_DATA_MASK_ARGS = "Tensor mask, float softmax_scale, float softcap=0.0, bool mask_hides=False"
_library.define(f"flash_attn_data_mask(Tensor q, Tensor k, Tensor v, {_DATA_MASK_ARGS}) -> (Tensor, Tensor)",
                tags=_TAGS)
_library.define(f"flash_attn_data_mask_kernel(Tensor q, Tensor k, Tensor v, {_DATA_MASK_ARGS}) -> (Tensor, Tensor)",
                tags=_TAGS)
_library.define(f"flash_attn_data_mask_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                f"{_DATA_MASK_ARGS}) -> (Tensor, Tensor, Tensor)", tags=_TAGS)
# The Python kernel behind the native backward launcher: it serves the calls the launcher has no plan for.
_library.define(f"_flash_attn_bwd_python{_BACKWARD_SCHEMA}")


def _precompile_wanted(q: Tensor) -> bool:
    return q.device.type == "cuda" and config.PRECOMPILE.on()


def _forward(args: tuple, masking_buffer: Tensor | None) -> tuple[Tensor, Tensor]:
    if masking_buffer is None:
        return torch.ops.fa4.flash_attn_fwd_kernel.default(*args)
    return torch.ops.fa4.flash_attn_fwd_masked_kernel.default(*args, masking_buffer)


class _FlashAttention(torch.autograd.Function):
    """Forward on ``flash_attn_fwd_kernel`` (``flash_attn_fwd_masked_kernel`` for calls masked by data, whose
    masking buffer the backward reuses), backward on ``flash_attn_bwd``."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k, key_padding,
                segment_ids, masking_buffer):
        out, lse = _forward((q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k,
                             key_padding, segment_ids), masking_buffer)
        ctx.save_for_backward(q, k, v, out, lse, seqused_k, key_padding, segment_ids, masking_buffer)
        ctx.params = (softmax_scale, causal, window_left, window_right, softcap)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, seqused_k, key_padding, segment_ids, masking_buffer = ctx.saved_tensors
        dq, dk, dv = torch.ops.fa4.flash_attn_bwd.default(dout, q, k, v, out, lse, *ctx.params, seqused_k,
                                                           key_padding, segment_ids, masking_buffer)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


class _DataMaskAttention(torch.autograd.Function):
    """Forward on ``flash_attn_data_mask_kernel``, backward on ``flash_attn_data_mask_bwd``."""

    @staticmethod
    def forward(ctx, q, k, v, mask, softmax_scale, softcap, mask_hides):
        out, lse = torch.ops.fa4.flash_attn_data_mask_kernel.default(q, k, v, mask, softmax_scale, softcap,
                                                                     mask_hides)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.params = (softmax_scale, softcap, mask_hides)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.fa4.flash_attn_data_mask_bwd.default(dout, q, k, v, out, lse, mask, *ctx.params)
        return dq, dk, dv, None, None, None, None


def flash_attn_data_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, softmax_scale: float, softcap: float = 0.0,
                         mask_hides: bool = False) -> tuple[Tensor, Tensor]:
    """Attention on B,S,H,D tensors under a mask given as data; returns (out, lse); differentiable in q, k, v."""
    _validate(q, k, v, None)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _DataMaskAttention.apply(q, k, v, mask, softmax_scale, softcap, mask_hides)
    return torch.ops.fa4.flash_attn_data_mask_kernel.default(q, k, v, mask, softmax_scale, softcap, mask_hides)


def _data_mask_forward_fake(q, k, v, mask, softmax_scale, softcap=0.0, mask_hides=False):
    _validate(q, k, v, None)
    batch, seqlen_q, heads = q.shape[:3]
    return q.new_empty((batch, seqlen_q, heads, v.shape[-1])), q.new_empty((batch, heads, seqlen_q),
                                                                           dtype=torch.float32)


def _data_mask_backward_fake(dout, q, k, v, out, lse, mask, softmax_scale, softcap=0.0, mask_hides=False):
    return tuple(fa4_call.gradient_like(t) for t in (q, k, v))


def _data_mask_backward(dout, q, k, v, out, lse, mask, softmax_scale, softcap=0.0, mask_hides=False):
    grads = data_mask.backward(dout, q, k, v, out, lse, mask, softmax_scale, softcap, mask_hides)
    return tuple(fa4_call.gradient_like(t).copy_(g) for t, g in zip((q, k, v), grads))


def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool = False,
                   window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                   seqused_k: Tensor | None = None, key_padding: Tensor | None = None,
                   segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """FA4 attention forward on B,S,H,D tensors; returns (out, lse); differentiable in q, k, v."""
    _validate(q, k, v, seqused_k, key_padding, segment_ids)
    args = (q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k, key_padding, segment_ids)
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    masking_buffer = None
    if (key_padding is not None or segment_ids is not None) and (training or not _splits_keys(*args)):
        masking_buffer = torch.ops.fa4.masking_buffer.default(key_padding, segment_ids, q.shape[1], q.shape[-1],
                                                              v.shape[-1], causal, window_left, window_right)
    if training:
        return _FlashAttention.apply(*args, masking_buffer)
    return _forward(args, masking_buffer)


def _splits_keys(q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k, key_padding,
                 segment_ids) -> bool:
    """Does FA4 run this call as split-KV chunks (a decoding step on sm90)? Their forward reads no masking buffer,
    so inference makes none for them."""
    return q.device.type == "cuda" and fa4_call.split_count(q, k, v, dict(
        causal=causal, window_left=window_left, window_right=window_right, seqused_k=seqused_k,
        segment_ids=segment_ids)) > 1


def _forward_kernel_cpu(q, k, v, softmax_scale, causal=False, window_left=-1, window_right=-1,
                        softcap=0.0, seqused_k=None, key_padding=None, segment_ids=None):
    _validate(q, k, v, seqused_k, key_padding, segment_ids)
    return reference.attention_forward(q, k, v, **_params(
        softmax_scale, causal, window_left, window_right, softcap, seqused_k, key_padding, segment_ids))


def _forward_kernel_fake(q, k, v, softmax_scale, causal=False, window_left=-1, window_right=-1,
                         softcap=0.0, seqused_k=None, key_padding=None, segment_ids=None):
    _validate(q, k, v, seqused_k, key_padding, segment_ids)
    if _precompile_wanted(q):
        fa4_call.precompile_forward(q, k, v, **_params(
            softmax_scale, causal, window_left, window_right, softcap, seqused_k, key_padding, segment_ids))
    batch, seqlen_q, heads = q.shape[:3]
    out = q.new_empty((batch, seqlen_q, heads, v.shape[-1]))
    lse = q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)
    return out, lse


def _masked_forward_kernel_cpu(q, k, v, softmax_scale, causal=False, window_left=-1, window_right=-1, softcap=0.0,
                               seqused_k=None, key_padding=None, segment_ids=None, masking_buffer=None):
    # The reference reads the masks themselves, not the masking buffer.
    return _forward_kernel_cpu(q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k,
                               key_padding, segment_ids)


def _masked_forward_kernel_fake(q, k, v, softmax_scale, causal=False, window_left=-1, window_right=-1, softcap=0.0,
                                seqused_k=None, key_padding=None, segment_ids=None, masking_buffer=None):
    return _forward_kernel_fake(q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k,
                                key_padding, segment_ids)


def _masked_forward_kernel_cuda(q, k, v, softmax_scale, causal=False, window_left=-1, window_right=-1, softcap=0.0,
                                seqused_k=None, key_padding=None, segment_ids=None, masking_buffer=None):
    return fa4_call.forward(q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k,
                               key_padding, segment_ids, masking_buffer=masking_buffer)


def _masking_buffer_cuda(key_padding, segment_ids, seqlen_q, head_dim, head_dim_v, causal=False, window_left=-1,
                         window_right=-1):
    return mask_routes.make_buffer(key_padding, segment_ids, seqlen_q, head_dim, head_dim_v,
                               dict(causal=causal, window_left=window_left, window_right=window_right))


def _masking_buffer_cpu(key_padding, segment_ids, *_):
    # The CPU reference reads the masks themselves: its buffer is empty.
    return mask_routes.mask_tensor(key_padding, segment_ids).new_empty((0,), dtype=torch.int32)


def _masking_buffer_fake(key_padding, segment_ids, seqlen_q, head_dim, head_dim_v, *_):
    mask = mask_routes.mask_tensor(key_padding, segment_ids)
    size = 0
    if mask.device.type == "cuda":
        size = mask_routes.buffer_size(key_padding, segment_ids, seqlen_q, head_dim, head_dim_v)
    return mask.new_empty((size,), dtype=torch.int32)


def _gradient(t: Tensor) -> Tensor:
    """A CUDA gradient buffer for ``t``: the fast allocator for contiguous ``t``, else ``t``'s dense layout
    (:func:`fa4_call.gradient_like`, what the fake impl promises)."""
    if t.is_contiguous():
        return empty_contiguous(tuple(t.shape), t.dtype, t.device)
    return fa4_call.gradient_like(t)


def _backward_kernel(dout, q, k, v, out, lse, softmax_scale, causal=False, window_left=-1,
                     window_right=-1, softcap=0.0, seqused_k=None, key_padding=None, segment_ids=None,
                     masking_buffer=None):
    _validate(q, k, v, seqused_k, key_padding, segment_ids)
    fa4_binding.check_backward_head_dims(q, v)
    params = _params(softmax_scale, causal, window_left, window_right, softcap, seqused_k, key_padding, segment_ids)
    if q.device.type == "cpu":
        grads = reference.attention_backward(dout, q, k, v, out, lse, **params)
        return tuple(fa4_call.gradient_like(t).copy_(g) for t, g in zip((q, k, v), grads))
    grads = tuple(_gradient(t) for t in (q, k, v))
    fa4_call.backward(dout, q, k, v, out, lse, **params, dq=grads[0], dk=grads[1], dv=grads[2],
                         masking_buffer=masking_buffer)
    return grads


def _backward_kernel_fake(dout, q, k, v, out, lse, softmax_scale, causal=False, window_left=-1,
                          window_right=-1, softcap=0.0, seqused_k=None, key_padding=None, segment_ids=None,
                          masking_buffer=None):
    _validate(q, k, v, seqused_k, key_padding, segment_ids)
    fa4_binding.check_backward_head_dims(q, v)
    params = _params(softmax_scale, causal, window_left, window_right, softcap, seqused_k, key_padding, segment_ids)
    if _precompile_wanted(q):
        fa4_call.precompile_backward(dout, q, k, v, out, lse, **params)
    return tuple(fa4_call.gradient_like(t) for t in (q, k, v))


def _forward_kernel_cuda(*args):
    """The first CUDA call installs the C++ launcher where it builds (it then takes every later call); this call, and
    every call where it does not build, runs in Python."""
    native.install_cuda_forward()
    return fa4_call.forward(*args)


def _backward_kernel_cuda(*args):
    """As :func:`_forward_kernel_cuda`, for the backward."""
    native.install_cuda_backward()
    return _backward_kernel(*args)


_library.impl("flash_attn_fwd", flash_attn_fwd, "CompositeImplicitAutograd")
_library.impl("_flash_attn_fwd_python", fa4_call.forward, "CUDA")  # its parameters follow the schema
_library.impl("_flash_attn_fwd_python", _forward_kernel_cpu, "CPU")
_library.impl("flash_attn_fwd_kernel", _forward_kernel_cuda, "CUDA")
_library.impl("flash_attn_fwd_kernel", _forward_kernel_cpu, "CPU")
_library.impl("masking_buffer", _masking_buffer_cuda, "CUDA")
_library.impl("masking_buffer", _masking_buffer_cpu, "CPU")
_library.impl("flash_attn_fwd_masked_kernel", _masked_forward_kernel_cuda, "CUDA")
_library.impl("flash_attn_fwd_masked_kernel", _masked_forward_kernel_cpu, "CPU")
_library.impl("_flash_attn_bwd_python", _backward_kernel, "CUDA")
_library.impl("_flash_attn_bwd_python", _backward_kernel, "CPU")
_library.impl("flash_attn_bwd", _backward_kernel_cuda, "CUDA")
_library.impl("flash_attn_bwd", _backward_kernel, "CPU")
torch.library.register_fake(f"{_OP_NS}::flash_attn_fwd_kernel", _forward_kernel_fake, lib=_library)
torch.library.register_fake(f"{_OP_NS}::masking_buffer", _masking_buffer_fake, lib=_library)
torch.library.register_fake(f"{_OP_NS}::flash_attn_fwd_masked_kernel", _masked_forward_kernel_fake, lib=_library)
torch.library.register_fake(f"{_OP_NS}::flash_attn_bwd", _backward_kernel_fake, lib=_library)
_library.impl("flash_attn_data_mask", flash_attn_data_mask, "CompositeImplicitAutograd")
for _device in ("CPU", "CUDA"):
    _library.impl("flash_attn_data_mask_kernel", data_mask.forward, _device)
    _library.impl("flash_attn_data_mask_bwd", _data_mask_backward, _device)
torch.library.register_fake(f"{_OP_NS}::flash_attn_data_mask_kernel", _data_mask_forward_fake, lib=_library)
torch.library.register_fake(f"{_OP_NS}::flash_attn_data_mask_bwd", _data_mask_backward_fake, lib=_library)
