"""The kernels of ``fa4.flash_attn_data_mask``: attention whose mask is a tensor of data, routed per call.

The mask's verdict (:mod:`.mask_verdict`, remembered per tensor version) sends a call to FA4 with the causal,
window and key-padding parameters its values are (FA4's key-bias or relative-bias op where the kept entries hold
such a bias), or to PyTorch's SDPA on the mask itself when they are not a mask FA4 expresses. Under CUDA-graph
capture, which can't read the mask, a call takes PyTorch's route: a captured graph is replayed with whatever values
the mask holds then. A backward takes its forward's route (remembered by the
forward's logsumexp tensor), or PyTorch's, recomputed, when that is not known; PyTorch's route needs neither the
forward's output nor its logsumexp, so every backward is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fa4_inductor import stats
from fa4_inductor.runtime import position_bias  # noqa: F401  (defines the position-bias ops)
from fa4_inductor.runtime.mask_verdict import (CACHE, MaskVerdict, TensorKeyed, kept_keys, key_bias_table, key_padding,
                                               relative_bias_table)

_CAPTURED = MaskVerdict(False, "CUDA-graph capture: the mask's values can't be read while capturing")
# The route each forward took, by its logsumexp tensor (which the backward receives).
_ROUTES = TensorKeyed()


def route(q: Tensor, k: Tensor, mask: Tensor, mask_hides: bool, softcap: float = 0.0) -> MaskVerdict:
    """The verdict for this call (counted: served or not, and whether the mask was read)."""
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        decided, remembered = _CAPTURED, True
    else:
        decided, remembered = CACHE.verdict(mask, mask_hides, q.shape[0], q.shape[1], k.shape[1])
    if decided.bias and softcap:
        decided = MaskVerdict(False, "a bias with softcap: FA4 takes one score_mod")
    stats.count_data_mask(decided.served, decided.reason, remembered)
    return decided


def _biased(decided: MaskVerdict, q: Tensor, k: Tensor, mask: Tensor, backward: bool = False):
    """The op and table of a call served with a bias (:attr:`MaskVerdict.bias`)."""
    if decided.bias == "key":
        name, table = "flash_attn_key_bias", key_bias_table(mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    else:
        name, table = "flash_attn_relative_bias", relative_bias_table(mask, q.shape[2], q.shape[1], k.shape[1])
    return getattr(torch.ops.fa4, f"{name}_bwd" if backward else f"{name}_fwd_kernel").default, table


def _padding(decided: MaskVerdict, q: Tensor, k: Tensor, mask: Tensor, mask_hides: bool) -> Tensor | None:
    """The key padding of a served call, made for this call (verdicts hold no tensors)."""
    return key_padding(mask, mask_hides, q.shape[0], k.shape[1]) if decided.padded else None


def _pytorch_attention(q, k, v, mask, softmax_scale, softcap, mask_hides) -> Tensor:
    """PyTorch's attention under the mask itself, B,S,H,D in and out (differentiable)."""
    if mask.dtype == torch.bool:
        keep, _ = kept_keys(mask, mask_hides)
        bias = keep if not softcap else torch.zeros(keep.shape, device=q.device).masked_fill(~keep, float("-inf"))
    else:
        bias = mask.to(q.dtype) if not softcap else mask.float()
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    if not softcap:
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=softmax_scale,
                                              enable_gqa=True).transpose(1, 2)
    group = q.shape[2] // k.shape[2]
    scores = qh.float() @ kh.float().repeat_interleave(group, 1).transpose(-1, -2) * softmax_scale
    scores = softcap * torch.tanh(scores / softcap) + bias
    probs = torch.softmax(scores, dim=-1)
    return (probs @ vh.float().repeat_interleave(group, 1)).to(q.dtype).transpose(1, 2)


def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, softmax_scale: float, softcap: float = 0.0,
            mask_hides: bool = False) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention under ``mask`` on B,S,H,D tensors, on FA4 where the mask's values let it (on
    PyTorch's route, lse is NaN: no backward reads it)."""
    decided = route(q, k, mask, mask_hides, softcap)
    if decided.served and decided.bias:
        op, table = _biased(decided, q, k, mask)
        out, lse = op(q, k, v, table, softmax_scale, decided.causal, decided.window_left, decided.window_right,
                      _padding(decided, q, k, mask, mask_hides), None)
    elif decided.served:
        out, lse = torch.ops.fa4.flash_attn_fwd_kernel.default(
            q, k, v, softmax_scale, decided.causal, decided.window_left, decided.window_right, softcap, None,
            _padding(decided, q, k, mask, mask_hides), None)
    else:
        out = _pytorch_attention(q, k, v, mask, softmax_scale, softcap, mask_hides).contiguous()
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), device=q.device)
    _ROUTES.put(lse, decided)
    return out, lse


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor,
             softmax_scale: float, softcap: float = 0.0, mask_hides: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of :func:`forward`."""
    decided = _ROUTES.get(lse)
    if decided is not None and decided.served and decided.bias:
        stats.count_data_mask(True, None, True)
        op, table = _biased(decided, q, k, mask, backward=True)
        return op(dout, q, k, v, out, lse, table, softmax_scale, decided.causal, decided.window_left,
                  decided.window_right, _padding(decided, q, k, mask, mask_hides), None)
    if decided is not None and decided.served:
        stats.count_data_mask(True, None, True)
        return torch.ops.fa4.flash_attn_bwd.default(
            dout, q, k, v, out, lse, softmax_scale, decided.causal, decided.window_left, decided.window_right,
            softcap, None, _padding(decided, q, k, mask, mask_hides), None, None)
    stats.count_data_mask(False, decided.reason if decided else "the forward's route is not known", True)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        recomputed = _pytorch_attention(*leaves, mask, softmax_scale, softcap, mask_hides)
        grads = torch.autograd.grad(recomputed, leaves, dout)
    return tuple(g.contiguous() for g in grads)
