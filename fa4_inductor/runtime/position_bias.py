"""The position-bias ``fa4`` ops: FlashAttention-4 with a bias that depends on the head and the key's offset from the
query, as an FA4 ``score_mod`` reading one aux tensor.

Both take B,S,H,D tensors as ``fa4.flash_attn_fwd`` does, then the bias's tensor, ``softmax_scale``, ``causal``,
``window_left``, ``window_right``, ``key_padding`` and ``segment_ids`` (as ``fa4.flash_attn_fwd`` takes them: FA4's
mask_mod and block sparsity beside the bias's score_mod, :mod:`.mask_routes`), and return (out, lse); query ``i``
scores key ``j`` as ``softmax_scale * q_i·k_j + bias(h, i, j)``:

- ``torch.ops.fa4.flash_attn_alibi_fwd(q, k, v, slopes, ...)``, ``slopes`` (H_q,) float32: ALiBi, ``slopes[h] * (j -
  i - (S_k - S_q))``, 0 on the bottom-right diagonal. A bias of ``slopes[h] * j`` or ``slopes[h] * (j - i)`` differs
  from it by a constant per row, which softmax ignores: the same attention (only the logsumexp moves by that
  constant). FA2's ``alibi_slopes`` under causal masking (``-slope * |i + S_k - S_q - j|`` on the visible keys) is
  exactly this bias.
- ``torch.ops.fa4.flash_attn_relative_bias_fwd(q, k, v, table, ...)``, ``table`` (H_q, S_q + S_k - 1) float32: a
  relative-position bias table (T5's buckets evaluated once per offset), ``table[h, j - i + S_q - 1]``.
- ``torch.ops.fa4.flash_attn_key_bias_fwd(q, k, v, table, ...)``, ``table`` (B, H_q, S_k) float32: a bias per key,
  ``table[b, h, j]`` for every query (Falcon's ALiBi over positions counted from the attention mask, rounded to
  bf16: exact as the values themselves).

FA4's backward gives the bias's tensor no gradient. As :mod:`.ops`: each ``*_fwd`` is ``CompositeImplicitAutograd``;
AOTAutograd traces it into its ``*_fwd_kernel`` and ``*_bwd``; the fake impls compile FA4's kernels while the graph
compiles (CUDA); the CPU kernels run :mod:`.reference` with the bias written out. The CUDA kernels call FA4's entry
points with the score_mods of :mod:`.fa4_binding` and the bias's tensor as their aux tensor, on every call (no launch
plans, which replay only calls without a score_mod).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from fa4_inductor import config
from fa4_inductor._torch_private import concrete_fake_like
from fa4_inductor.runtime import fa4_binding, fa4_call, mask_routes, reference
from fa4_inductor.runtime.op_schemas import define_attention_ops, implement_attention_ops


@dataclasses.dataclass(frozen=True)
class PositionBias:
    """One position-bias op: its name (``fa4.<name>_fwd``), its aux tensor's name and expected shape for (q, k), the
    FA4 score_mods that add it and the bias it adds written out (H_q, S_q, S_k), for the CPU reference."""

    name: str
    aux_name: str
    aux_shape: Callable[[Tensor, Tensor], tuple]
    score_mods: Callable[[], tuple]
    written_out: Callable[[Tensor, int, int, torch.dtype], Tensor]


ALIBI = PositionBias("flash_attn_alibi", "slopes", lambda q, k: (q.shape[2],), fa4_binding.alibi_score_mods,
                     reference.alibi_bias)
RELATIVE_BIAS = PositionBias("flash_attn_relative_bias", "table", lambda q, k: (q.shape[2], q.shape[1] + k.shape[1] - 1),
                             fa4_binding.relative_bias_score_mods, reference.relative_bias)
KEY_BIAS = PositionBias("flash_attn_key_bias", "table", lambda q, k: (q.shape[0], q.shape[2], k.shape[1]),
                        fa4_binding.key_bias_score_mods, reference.key_bias)


def validate(bias: PositionBias, q: Tensor, k: Tensor, v: Tensor, aux: Tensor) -> None:
    """Raise ValueError naming the bad argument; works on fake tensors."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be a 4-D (B, S, H, D) tensor like q, got {t.dtype} {tuple(t.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: head dims of q and k, or the "
                         "head counts, don't match")
    shape = bias.aux_shape(q, k)
    if aux.dtype != torch.float32 or tuple(aux.shape) != shape or aux.device != q.device:
        raise ValueError(f"{bias.aux_name} must be a float32 {tuple(shape)} tensor on {q.device}, got {aux.dtype} "
                         f"{tuple(aux.shape)} on {aux.device}")


def _outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    batch, seqlen_q, heads = q.shape[:3]
    return (q.new_empty((batch, seqlen_q, heads, v.shape[-1])),
            q.new_empty((batch, heads, seqlen_q), dtype=torch.float32))


def _masking(bias: PositionBias, q, k, v, aux: Tensor, masks: dict, backward: bool = False) -> dict:
    """FA4's masking keywords for ``masks`` (causal, window_left/right, key_padding, segment_ids: a mask_mod reading
    aux tensors where masks read data) with the bias's score_mod reading ``aux`` after the mask_mod's."""
    masking = mask_routes.fa4_masking(q, k, v, masks, backward=backward,
                                      deterministic=torch.are_deterministic_algorithms_enabled())
    aux_tensors = [*masking.get("aux_tensors", ()), aux.contiguous()]
    score_mod, score_mod_bwd = bias.score_mods(len(aux_tensors) - 1)
    masking.update(score_mod=score_mod, aux_tensors=aux_tensors)
    return dict(masking, score_mod_bwd=score_mod_bwd) if backward else masking


def _masks(causal: bool, window_left: int, window_right: int, key_padding: Tensor | None,
           segment_ids: Tensor | None) -> dict:
    return dict(causal=causal, window_left=window_left, window_right=window_right, key_padding=key_padding,
                segment_ids=segment_ids)


def _ops(bias: PositionBias):
    """Define and implement ``bias``'s ops; return its differentiable forward."""
    library = define_attention_ops(bias.name, f"Tensor {bias.aux_name}, float softmax_scale, bool causal=False, "
                                              "int window_left=-1, int window_right=-1, Tensor? key_padding=None, "
                                              "Tensor? segment_ids=None")
    forward_kernel = getattr(torch.ops.fa4, f"{bias.name}_fwd_kernel").default
    backward_kernel = getattr(torch.ops.fa4, f"{bias.name}_bwd").default

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, aux, *options):
            out, lse = forward_kernel(q, k, v, aux, *options)
            ctx.save_for_backward(q, k, v, out, lse, aux)
            ctx.options = options
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse, aux = ctx.saved_tensors
            return (*backward_kernel(dout, q, k, v, out, lse, aux, *ctx.options), *[None] * (1 + len(ctx.options)))

    def attention(q: Tensor, k: Tensor, v: Tensor, aux: Tensor, softmax_scale: float, causal: bool = False,
                  window_left: int = -1, window_right: int = -1, key_padding: Tensor | None = None,
                  segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        validate(bias, q, k, v, aux)
        args = (q, k, v, aux, softmax_scale, causal, window_left, window_right, key_padding, segment_ids)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return Attention.apply(*args)
        return forward_kernel(*args)

    def run_forward(q, k, v, aux, softmax_scale, *masks):
        out, lse = _outputs(q, v)
        fa4_binding.flash_forward(q, k, v, out, lse, softmax_scale=softmax_scale, softcap=0.0, seqused_k=None,
                                  masking=_masking(bias, q, k, v, aux, _masks(*masks)))
        return out, lse

    def run_backward(dout, q, k, v, out, lse, aux, softmax_scale, *masks):
        grads = tuple(fa4_call.gradient_like(t) for t in (q, k, v))
        fa4_binding.flash_backward(dout, q, k, v, out, lse, *grads, softmax_scale=softmax_scale, softcap=0.0,
                                   seqused_k=None, deterministic=torch.are_deterministic_algorithms_enabled(),
                                   masking=_masking(bias, q, k, v, aux, _masks(*masks), backward=True))
        return grads

    def reference_options(q, k, aux, softmax_scale, *masks) -> dict:
        return dict(softmax_scale=softmax_scale, **_masks(*masks),
                    bias=bias.written_out(aux, q.shape[1], k.shape[1], torch.float64))

    def forward_cpu(q, k, v, aux, softmax_scale, causal=False, window_left=-1, window_right=-1, key_padding=None,
                    segment_ids=None):
        validate(bias, q, k, v, aux)
        return reference.attention_forward(q, k, v, **reference_options(
            q, k, aux, softmax_scale, causal, window_left, window_right, key_padding, segment_ids))

    def forward_cuda(q, k, v, aux, softmax_scale, causal=False, window_left=-1, window_right=-1, key_padding=None,
                     segment_ids=None):
        validate(bias, q, k, v, aux)
        return run_forward(q, k, v, aux, softmax_scale, causal, window_left, window_right, key_padding, segment_ids)

    def backward_cpu(dout, q, k, v, out, lse, aux, softmax_scale, causal=False, window_left=-1, window_right=-1,
                     key_padding=None, segment_ids=None):
        validate(bias, q, k, v, aux)
        grads = reference.attention_backward(dout, q, k, v, out, lse, **reference_options(
            q, k, aux, softmax_scale, causal, window_left, window_right, key_padding, segment_ids))
        return tuple(fa4_call.gradient_like(t).copy_(g) for t, g in zip((q, k, v), grads))

    def backward_cuda(dout, q, k, v, out, lse, aux, softmax_scale, causal=False, window_left=-1, window_right=-1,
                      key_padding=None, segment_ids=None):
        validate(bias, q, k, v, aux)
        fa4_binding.check_backward_head_dims(q, v)
        return run_backward(dout, q, k, v, out, lse, aux, softmax_scale, causal, window_left, window_right,
                            key_padding, segment_ids)

    def forward_fake(q, k, v, aux, softmax_scale, causal=False, window_left=-1, window_right=-1, key_padding=None,
                     segment_ids=None):
        validate(bias, q, k, v, aux)
        if q.device.type == "cuda" and config.PRECOMPILE.on():
            precompile(bias, "forward", (q, k, v, aux), (softmax_scale, causal, window_left, window_right,
                                                         key_padding, segment_ids))
        return _outputs(q, v)

    def backward_fake(dout, q, k, v, out, lse, aux, softmax_scale, causal=False, window_left=-1, window_right=-1,
                      key_padding=None, segment_ids=None):
        validate(bias, q, k, v, aux)
        fa4_binding.check_backward_head_dims(q, v)
        if q.device.type == "cuda" and config.PRECOMPILE.on():
            precompile(bias, "backward", (dout, q, k, v, out, lse, aux), (softmax_scale, causal, window_left,
                                                                          window_right, key_padding, segment_ids))
        return tuple(fa4_call.gradient_like(t) for t in (q, k, v))

    _RUNS[bias.name] = {"forward": run_forward, "backward": run_backward}
    _LIBRARIES.append(library)  # the ops live as long as their library object
    implement_attention_ops(library, bias.name, attention, {
        "forward": {"CPU": forward_cpu, "CUDA": forward_cuda, "fake": forward_fake},
        "backward": {"CPU": backward_cpu, "CUDA": backward_cuda, "fake": backward_fake},
    })
    return attention


_RUNS: dict[str, dict[str, Callable]] = {}
_LIBRARIES: list[torch.library.Library] = []


def precompile(bias: PositionBias, what: str, tensors: tuple, options: tuple) -> float:
    """Compile (or load from disk) FA4's ``bias`` kernels, ``what`` "forward" or "backward", for these (fake) tensors
    (q, k, v, aux; the backward's dout, q, k, v, out, lse, aux) and options (softmax_scale, causal, window_left,
    window_right, key_padding, segment_ids); return seconds (0.0 when compiled before). Nothing is launched."""
    q, k, v = tensors[:3] if what == "forward" else tensors[1:4]
    scalars, masks = options[1:4], options[4:]
    key = (f"{bias.name} {what}", q.dtype, *fa4_call.hints((*q.shape[2:], k.shape[2], v.shape[-1])), *scalars,
           *(m is not None for m in masks), fa4_call.masking_route(what, q, k, v, _masks(*scalars, *masks)),
           torch.are_deterministic_algorithms_enabled())
    run = _RUNS[bias.name][what]
    return fa4_call.precompile_once(key, f"{bias.name} {what}", f"{q.dtype} d={q.shape[-1]} causal={options[1]}",
                                    lambda: run(*(concrete_fake_like(t) for t in tensors), *options[:4],
                                                *(None if m is None else concrete_fake_like(m) for m in masks)))


flash_attn_alibi_fwd = _ops(ALIBI)
flash_attn_relative_bias_fwd = _ops(RELATIVE_BIAS)
flash_attn_key_bias_fwd = _ops(KEY_BIAS)
