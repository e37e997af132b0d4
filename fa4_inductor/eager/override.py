"""Eager override: SDPA runs FA4, or the stock kernel with a reason.

While active, three kernels per routed device are replaced through
``torch.library.Library(..., "IMPL")``:

* ``aten::scaled_dot_product_attention`` at the ``Autograd<Device>`` key.
  SDPA picks its backend in C++ (on sm90 it prefers cuDNN), so overriding
  the flash kernels alone would rarely run; this kernel sends every call
  FA4 can serve (unless the caller disabled flash with ``sdpa_kernel``) to
  the differentiable ``fa4.flash_attn_fwd`` op, and the rest to the
  composite kernel registered before. A boolean ``attn_mask`` that varies
  along batch and keys only (a decoding step's) becomes FA4's
  ``key_padding``; other masks fall back.
* the flash forward and backward kernels, for code that calls them directly
  (``_scaled_dot_product_flash_attention[_backward]`` on CUDA, the
  ``_for_cpu`` pair on CPU, where they run the reference implementation).

Context parallelism (``torch.distributed.tensor.experimental.context_parallel``)
hands SDPA DTensors. For those the SDPA kernel calls the aten flash op on
the DTensors, so that CP's ring attention shards it; the ring's per-shard
calls of the flash kernels then run FA4, and FA4's (B, H, S) float32
logsumexp is the one the ring's merge expects. On CPU the flash pair is also
served there (stock PyTorch has no CPU kernel for it), so CP runs on CPU
with gloo against the reference implementation.

Each replacement first asks
:func:`fa4_inductor.runtime.support.unsupported_reason`; if FA4 can't serve the call
it calls the kernel that was registered before (``torch.library.get_kernel``),
counts the fallback and logs the reason. Removing the override destroys the
library, which restores the stock kernels exactly.

The override is also registered in PyTorch's flash-attention registry under
:data:`REGISTRY_NAME`, so ``torch.nn.attention.activate_flash_attention_impl``
can switch it on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fa4_inductor.runtime import fa4_call, support

from fa4_inductor import stats
from fa4_inductor._torch_private import destroy_library, forget_python_dispatch
from fa4_inductor.runtime.support import AttentionCall, unsupported_reason

REGISTRY_NAME = "fa4_inductor"

_SDPA = "aten::scaled_dot_product_attention"
_CUDA_FWD = "aten::_scaled_dot_product_flash_attention"
_CUDA_BWD = "aten::_scaled_dot_product_flash_attention_backward"
_CPU_FWD = "aten::_scaled_dot_product_flash_attention_for_cpu"
_CPU_BWD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"


def _scale(query: torch.Tensor, scale: float | None) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])


def _reason(devices, query, key, value, dropout_p, is_causal, has_mask=False, enable_gqa=True) -> str | None:
    """Why FA4 can't serve this aten call (the flash kernels take GQA as given)."""
    try:
        call = AttentionCall.from_tensors(
            query, key, value, dropout_p=dropout_p, is_causal=is_causal,
            has_attn_mask=has_mask, enable_gqa=enable_gqa,
        )
    except ValueError as exc:
        return str(exc)
    return unsupported_reason(call, devices)


def _key_padding(attn_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """A boolean mask that varies along batch and keys only, as FA4's (B, S_kv) ``key_padding``; else None.

    That is the mask of a decoding step (one query row against a padded or
    static KV cache), (B, 1, 1, S_kv) in Hugging Face models.
    """
    if attn_mask is None or attn_mask.dtype != torch.bool or not 2 <= attn_mask.dim() <= 4:
        return None
    batch, kv_len = query.shape[0], key.shape[2]
    rows, *middle, columns = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if any(size != 1 for size in middle) or columns != kv_len or rows not in (1, batch):
        return None
    return attn_mask.reshape(rows, columns).expand(batch, columns)


def _fallback(stock, op: str, reason: str, keyset, *args, **kwargs):
    """Count and log the fallback, then run the kernel registered before ours; where PyTorch has none (the
    CUDA flash op on CPU), raise saying why FA4 couldn't serve the call."""
    stats.record_eager("fallback", op, reason)
    if stock is None:
        raise NotImplementedError(f"{op} has no stock kernel for this device, and FA4 can't serve the call: {reason}")
    return stock.call_boxed(keyset, *args, **kwargs)


def _bshd(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.transpose(1, 2) for t in tensors)


def _grads_bhsd(dout, query, key, value, out, lse, scale, is_causal):
    dq, dk, dv = torch.ops.fa4.flash_attn_bwd(
        *_bshd(dout, query, key, value, out), lse, _scale(query, scale), is_causal,
    )
    return _bshd(dq, dk, dv)


def _sdpa(stock, devices):
    def impl(keyset, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
             *, scale=None, enable_gqa=False):
        padding = None if is_causal else _key_padding(attn_mask, query, key)  # with is_causal, stock raises
        has_mask = attn_mask is not None and padding is None
        reason = _reason(devices, query, key, value, dropout_p, is_causal, has_mask, enable_gqa)
        if reason is None and not torch.backends.cuda.flash_sdp_enabled():
            reason = "flash SDPA backend disabled by the caller (sdpa_kernel)"
        context_parallel = support.is_dtensor(query)
        if reason is None and context_parallel and (padding is not None or query.shape[1] != key.shape[1]):
            reason = "a DTensor (context parallel) call with a mask or GQA: CP's ring attention takes neither"
        if reason is not None:
            return _fallback(stock, _SDPA, reason, keyset, query, key, value, attn_mask, dropout_p, is_causal,
                             scale=scale, enable_gqa=enable_gqa)
        stats.record_eager("fa4", _SDPA)
        if context_parallel:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal,
                                                                      scale=scale)[0]
        out, _ = torch.ops.fa4.flash_attn_fwd(*_bshd(query, key, value), _scale(query, scale), is_causal,
                                              key_padding=padding)
        return out.transpose(1, 2)
    return impl


def _cuda_forward(stock, devices):
    def impl(keyset, query, key, value, dropout_p=0.0, is_causal=False,
             return_debug_mask=False, *, scale=None):
        reason = _reason(devices, query, key, value, dropout_p, is_causal)
        if reason is None and return_debug_mask:
            reason = "return_debug_mask=True"
        if reason is not None:
            return _fallback(stock, _CUDA_FWD, reason, keyset, query, key, value, dropout_p, is_causal,
                             return_debug_mask, scale=scale)
        stats.record_eager("fa4", _CUDA_FWD)
        out = torch.empty_like(query)  # the strides the meta kernel promises
        if query.device.type == "cuda":
            _, lse = fa4_call.forward(
                *_bshd(query, key, value), softmax_scale=_scale(query, scale), causal=is_causal,
                window_left=-1, window_right=-1, softcap=0.0, seqused_k=None,
                out=out.transpose(1, 2),
            )
        else:  # the reference implementation (context parallelism on CPU)
            result, lse = torch.ops.fa4.flash_attn_fwd_kernel(*_bshd(query, key, value), _scale(query, scale),
                                                               is_causal)
            out.copy_(result.transpose(1, 2))
        rng_state = torch.zeros((2,), dtype=torch.uint64, device=query.device)
        unused = torch.zeros((), dtype=torch.uint64, device=query.device)
        debug_mask = torch.empty(0, dtype=query.dtype, device=query.device)
        return (out, lse, None, None, query.shape[2], key.shape[2], rng_state, unused, debug_mask)
    return impl


def _cuda_backward(stock, devices):
    def impl(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
             max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
        reason = _reason(devices, query, key, value, dropout_p, is_causal)
        if reason is not None:
            return _fallback(stock, _CUDA_BWD, reason, keyset, grad_out, query, key, value, out, logsumexp,
                             cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset,
                             scale=scale)
        stats.record_eager("fa4", _CUDA_BWD)
        # The meta kernel promises gradients laid out like the inputs (empty_like), and compiled graphs assert it:
        # context parallelism's shards are B,H,S,D-contiguous, FA4's gradients B,S,H,D.
        return _in_layouts(_grads_bhsd(grad_out, query, key, value, out, logsumexp, scale, is_causal),
                           [torch.empty_like(t) for t in (query, key, value)])
    return impl


def _in_layouts(grads, layouts) -> tuple[torch.Tensor, ...]:
    """Each gradient in the layout of its ``layouts`` tensor (what the stock kernel's meta promises, and compiled
    graphs assert), copied only where it differs."""
    return tuple(grad if grad.stride() == like.stride() else like.copy_(grad) for grad, like in zip(grads, layouts))


def _cpu_forward(stock, devices):
    def impl(keyset, query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
        reason = _reason(devices, query, key, value, dropout_p, is_causal, attn_mask is not None)
        if reason is not None:
            return _fallback(stock, _CPU_FWD, reason, keyset, query, key, value, dropout_p, is_causal,
                             attn_mask=attn_mask, scale=scale)
        stats.record_eager("fa4", _CPU_FWD)
        out, lse = torch.ops.fa4.flash_attn_fwd(*_bshd(query, key, value), _scale(query, scale), is_causal)
        # The stock CPU kernel returns a contiguous B,H,S,D output and a B,S,H-major lse.
        return out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous().transpose(1, 2)
    return impl


def _cpu_backward(stock, devices):
    def impl(keyset, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal,
             *, attn_mask=None, scale=None):
        reason = _reason(devices, query, key, value, dropout_p, is_causal, attn_mask is not None)
        if reason is not None:
            return _fallback(stock, _CPU_BWD, reason, keyset, grad_out, query, key, value, out, logsumexp,
                             dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        stats.record_eager("fa4", _CPU_BWD)
        # The stock CPU kernel's gradients are B,S,H,D in memory (its meta: empty_permuted).
        return _in_layouts(_grads_bhsd(grad_out, query, key, value, out, logsumexp.contiguous(), scale, is_causal),
                           [torch.empty_permuted(t.shape, (0, 2, 1, 3), dtype=t.dtype, device=t.device)
                            for t in (query, key, value)])
    return impl


# device -> (op, kernel factory, dispatch key)
_OVERRIDES: dict[str, tuple[tuple[str, Callable, str], ...]] = {
    "cuda": ((_SDPA, _sdpa, "AutogradCUDA"), (_CUDA_FWD, _cuda_forward, "CUDA"), (_CUDA_BWD, _cuda_backward, "CUDA")),
    "cpu": ((_SDPA, _sdpa, "AutogradCPU"), (_CPU_FWD, _cpu_forward, "CPU"), (_CPU_BWD, _cpu_backward, "CPU"),
            (_CUDA_FWD, _cuda_forward, "CPU"), (_CUDA_BWD, _cuda_backward, "CPU")),
}


def _stock_kernel(op: str, key: str):
    """The kernel PyTorch runs for ``op`` at ``key`` now; None if it has none."""
    try:
        return torch.library.get_kernel(op, key)
    except RuntimeError:
        return None


class EagerOverride:
    """Handle of an active override; :meth:`remove` restores the stock kernels."""

    def __init__(self, devices: Sequence[str]):
        self.devices = tuple(devices)
        self._ops = sorted({op for device in self.devices for op, _, _ in _OVERRIDES[device]})
        self._library: torch.library.Library | None = torch.library.Library("aten", "IMPL")
        for device in self.devices:
            for op, make_impl, key in _OVERRIDES[device]:
                stock = _stock_kernel(op, key)
                self._library.impl(op.split("::")[1], make_impl(stock, self.devices), key, with_keyset=True)
        forget_python_dispatch(self._ops)

    def remove(self) -> None:
        """Restore the stock kernels, and PyTorch's routing of their ops, exactly (idempotent)."""
        if self._library is not None:
            destroy_library(self._library)
            forget_python_dispatch(self._ops)
            self._library = None


def register_with_pytorch(activate: Callable[[], object]) -> None:
    """Make ``activate_flash_attention_impl(REGISTRY_NAME)`` call ``activate``."""
    torch.nn.attention.register_flash_attention_impl(REGISTRY_NAME, register_fn=activate)
