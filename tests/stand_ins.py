"""STAND-INS for FlashAttention-2 and FlashAttention-3, which build only from source with a CUDA toolchain and are on
none of our machines. They register ops under the libraries' published names and schemas
(``flashattn::_flash_attn_forward`` / ``_flash_attn_varlen_forward`` / ``_flash_attn_backward`` /
``_flash_attn_varlen_backward``, FA2 2.x's ``flash_attn/flash_attn_interface.py``; ``flash_attn_3::_flash_attn_forward``
with its autograd, FA3's ``hopper/flash_attn_interface.py``), with fake impls shaped as theirs and CPU kernels that
compute their semantics in plain float32 math (written here from their documented contract, not from our ops: windows
with -1 unbounded, causal and windows aligned bottom-right, softcap, GQA, varlen by ``cu_seqlens``). FA2's
``autograd.Function`` is mirrored as FA2 writes it (its forward calls the forward op, its backward the backward op),
so Dynamo meets the ops where it meets the real ones. Nothing is registered where the real package is importable.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import torch

from tests.compare import band


def _attend(q, k, v, scale, causal, window_left, window_right, softcap, alibi_slopes=None):
    """One sequence: (S_q, H, D), (S_k, H_kv, D) -> (out (S_q, H, Dv), lse (H, S_q)), float32 math; FA2's ALiBi
    adds ``-slope[h] * |i + S_k - S_q - j|``."""
    qf, kf, vf = (t.float().transpose(0, 1) for t in (q, k, v))
    group = qf.shape[0] // kf.shape[0]
    kf, vf = kf.repeat_interleave(group, 0), vf.repeat_interleave(group, 0)
    scores = qf @ kf.transpose(-1, -2) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        i = torch.arange(q.shape[0])[:, None] + k.shape[0] - q.shape[0]
        scores = scores - alibi_slopes.float()[:, None, None] * (i - torch.arange(k.shape[0])[None, :]).abs()
    keep = band(q.shape[0], k.shape[0], causal=causal, window=(window_left, window_right))
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.where(keep.any(-1, keepdim=True), torch.exp(scores - lse[..., None].nan_to_num(neginf=0.0)), 0.0)
    return (probs @ vf).transpose(0, 1).to(q.dtype), lse


def _forward(q, k, v, cu_q, cu_k, scale, causal, left, right, softcap, alibi_slopes=None):
    """Packed (or, without cu_seqlens, B,S,H,D) attention: (out, lse) in the libraries' layouts."""
    if cu_q is None:
        results = [_attend(q[b], k[b], v[b], scale, causal, left, right, softcap, alibi_slopes)
                   for b in range(q.shape[0])]
        return torch.stack([o for o, _ in results]), torch.stack([lse for _, lse in results])
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    results = [_attend(q[bounds_q[b]:bounds_q[b + 1]], k[bounds_k[b]:bounds_k[b + 1]], v[bounds_k[b]:bounds_k[b + 1]],
                       scale, causal, left, right, softcap, alibi_slopes) for b in range(len(bounds_q) - 1)]
    return torch.cat([o for o, _ in results]), torch.cat([lse for _, lse in results], dim=-1)


def _gradients(dout, q, k, v, cu_q, cu_k, scale, causal, left, right, softcap, alibi_slopes=None):
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = _forward(*inputs, cu_q, cu_k, scale, causal, left, right, softcap, alibi_slopes)
        return torch.autograd.grad(out, inputs, dout)


def _empty(t):
    return torch.empty((0,), dtype=t.dtype, device=t.device)


def _register_fa2() -> None:
    library = torch.library.Library("flashattn", "DEF")
    forward_args = ("float dropout_p, float softmax_scale, bool causal, int window_size_left=-1, "
                    "int window_size_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, bool return_softmax=False")
    library.define(f"_flash_attn_forward(Tensor(a!) q, Tensor(b!) k, Tensor(c!) v, {forward_args}) "
                   "-> (Tensor, Tensor, Tensor, Tensor)")
    library.define("_flash_attn_varlen_forward(Tensor(a!) q, Tensor(b!) k, Tensor(c!) v, Tensor cu_seqlens_q, "
                   f"Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, {forward_args}, "
                   "Tensor? block_table=None, Tensor? leftpad_k=None, Tensor? seqused_k=None) "
                   "-> (Tensor, Tensor, Tensor, Tensor)")
    backward_args = ("float dropout_p, float softmax_scale, bool causal, int window_size_left, int window_size_right, "
                     "float softcap, Tensor? alibi_slopes, bool deterministic, Tensor? rng_state=None")
    library.define("_flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
                   f"Tensor(a!)? dq, Tensor(b!)? dk, Tensor(c!)? dv, {backward_args}) -> Tensor")
    library.define("_flash_attn_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
                   "Tensor softmax_lse, Tensor(a!)? dq, Tensor(b!)? dk, Tensor(c!)? dv, Tensor cu_seqlens_q, "
                   f"Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, {backward_args}) -> Tensor")

    def forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                alibi_slopes=None, return_softmax=False, cu_q=None, cu_k=None):
        assert dropout_p == 0.0, "the stand-in computes no dropout"
        out, lse = _forward(q, k, v, cu_q, cu_k, softmax_scale, causal, window_size_left, window_size_right, softcap,
                            alibi_slopes)
        return out, lse, _empty(q), torch.zeros(2, dtype=torch.int64)

    def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                       causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                       return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None):
        return forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
                       alibi_slopes, return_softmax, cu_seqlens_q, cu_seqlens_k)

    def forward_fake(q, k, v, *args, **kwargs):
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
        return torch.empty_like(q), lse, _empty(q), q.new_empty((2,), dtype=torch.int64)

    def varlen_forward_fake(q, k, v, *args, **kwargs):
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        return torch.empty_like(q), lse, _empty(q), q.new_empty((2,), dtype=torch.int64)

    def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size_left,
                 window_size_right, softcap, alibi_slopes, deterministic, rng_state=None, cu_q=None, cu_k=None):
        grads = _gradients(dout, q, k, v, cu_q, cu_k, softmax_scale, causal, window_size_left, window_size_right,
                           softcap, alibi_slopes)
        for target, grad in zip((dq, dk, dv), grads):
            target.copy_(grad)
        return _empty(q).float()

    def varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, *rest):
        return backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, *rest, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k)

    for name, kernel, fake in (("_flash_attn_forward", forward, forward_fake),
                               ("_flash_attn_varlen_forward", varlen_forward, varlen_forward_fake),
                               ("_flash_attn_backward", backward, lambda q, *a, **k: _empty(q).float()),
                               ("_flash_attn_varlen_backward", varlen_backward, lambda q, *a, **k: _empty(q).float())):
        library.impl(name, kernel, "CPU")
        torch.library.register_fake(f"flashattn::{name}", fake, lib=library)
    _libraries.append(library)


class FlashAttnFunc(torch.autograd.Function):
    """FA2's ``FlashAttnFunc`` / ``FlashAttnVarlenFunc`` as FA2 writes them: the forward op, then the backward op
    into fresh gradients (``lengths``: None, or (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))."""

    @staticmethod
    def forward(ctx, q, k, v, lengths, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                deterministic):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** (-0.5)
        head_size = q.shape[-1]
        if head_size % 8:
            q, k, v = (torch.nn.functional.pad(t, [0, 8 - head_size % 8]) for t in (q, k, v))
        options = dict(causal=causal, window_size_left=window_size[0], window_size_right=window_size[1],
                       softcap=softcap, alibi_slopes=alibi_slopes, return_softmax=False)
        if lengths is None:
            out, lse, _, rng_state = torch.ops.flashattn._flash_attn_forward(q, k, v, dropout_p, softmax_scale,
                                                                             **options)
        else:
            out, lse, _, rng_state = torch.ops.flashattn._flash_attn_varlen_forward(q, k, v, *lengths, dropout_p,
                                                                                    softmax_scale, **options)
        ctx.save_for_backward(q, k, v, out, lse, rng_state, *(lengths[:2] if lengths else ()))
        ctx.params = (dropout_p, softmax_scale, causal, window_size[0], window_size[1], softcap, alibi_slopes,
                      deterministic)
        ctx.max_seqlens = lengths[2:] if lengths else ()
        return out[..., :head_size]

    @staticmethod
    def backward(ctx, dout, *args):
        q, k, v, out, lse, rng_state, *cu_seqlens = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        head_size = dout.shape[-1]
        dout = torch.nn.functional.pad(dout, [0, q.shape[-1] - head_size])
        if cu_seqlens:
            torch.ops.flashattn._flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, *cu_seqlens,
                                                            *ctx.max_seqlens, *ctx.params, rng_state=rng_state)
        else:
            torch.ops.flashattn._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, *ctx.params,
                                                     rng_state=rng_state)
        return dq[..., :head_size], dk[..., :head_size], dv[..., :head_size], *(None,) * 8


def fa2_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FA2's ``flash_attn_func`` (stand-in)."""
    assert not return_attn_probs, "not computed by the stand-in"
    return FlashAttnFunc.apply(q, k, v, None, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               deterministic)


def fa2_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
    """FA2's ``flash_attn_varlen_func`` (stand-in)."""
    assert not return_attn_probs and block_table is None, "not computed by the stand-in"
    return FlashAttnFunc.apply(q, k, v, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), dropout_p,
                               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic)


def fa2_flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """FA2's ``flash_attn_with_kvcache`` (stand-in) on a contiguous cache, reading each row's first
    ``cache_seqlens[b]`` keys, masks aligned to that length; appending, rotary, gathers and ALiBi are not computed."""
    if any(t is not None for t in (k, v, rotary_cos, cache_batch_idx, cache_leftpad, block_table, alibi_slopes)):
        raise NotImplementedError("not computed by the stand-in")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    used = [k_cache.shape[1]] * q.shape[0] if cache_seqlens is None else (
        [cache_seqlens] * q.shape[0] if isinstance(cache_seqlens, int) else cache_seqlens.tolist())
    rows = [_attend(q[b], k_cache[b, :used[b]], v_cache[b, :used[b]], scale, causal, *window_size, softcap)
            for b in range(q.shape[0])]
    out, lse = torch.stack([o for o, _ in rows]), torch.stack([lse for _, lse in rows])
    return (out, lse) if return_softmax_lse else out


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """FA2's ``flash_attn.bert_padding.unpad_input``: the kept tokens, their indices, cu_seqlens, the longest
    sequence and each row's length."""
    lengths = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return hidden_states.flatten(0, 1)[indices], indices, cu_seqlens, int(lengths.max()), lengths


def pad_input(hidden_states, indices, batch, seqlen):
    """FA2's ``flash_attn.bert_padding.pad_input``: tokens back to (batch, seqlen, ...), zeros elsewhere."""
    padded = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    padded[indices] = hidden_states
    return padded.view(batch, seqlen, *hidden_states.shape[1:])


def _install_fa2_api() -> None:
    """FA2's Python API as ``flash_attn.flash_attn_interface`` and ``flash_attn.bert_padding`` (and on
    ``flash_attn``, where Hugging Face imports it from), next to FA4's ``flash_attn.cute``."""
    import flash_attn

    functions = dict(flash_attn_func=fa2_flash_attn_func, flash_attn_varlen_func=fa2_flash_attn_varlen_func,
                     flash_attn_with_kvcache=fa2_flash_attn_with_kvcache)
    for name, attributes in (("flash_attn_interface", functions),
                             ("bert_padding", dict(pad_input=pad_input, unpad_input=unpad_input))):
        module = types.ModuleType(f"flash_attn.{name}", "FA2 (stand-in)")
        module.__dict__.update(attributes)
        sys.modules[module.__name__] = module
        setattr(flash_attn, name, module)
    flash_attn.__dict__.update(functions)


def _register_fa3() -> None:

    @torch.library.custom_op("flash_attn_3::_flash_attn_forward", mutates_args=(), device_types="cpu")
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_new: torch.Tensor | None = None,
                v_new: torch.Tensor | None = None, qv: torch.Tensor | None = None, out_: torch.Tensor | None = None,
                cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                cu_seqlens_k_new: torch.Tensor | None = None, seqused_q: torch.Tensor | None = None,
                seqused_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                max_seqlen_k: int | None = None, page_table: torch.Tensor | None = None,
                kv_batch_idx: torch.Tensor | None = None, leftpad_k: torch.Tensor | None = None,
                rotary_cos: torch.Tensor | None = None, rotary_sin: torch.Tensor | None = None,
                seqlens_rotary: torch.Tensor | None = None, q_descale: torch.Tensor | None = None,
                k_descale: torch.Tensor | None = None, v_descale: torch.Tensor | None = None,
                softmax_scale: float | None = None, causal: bool = False, window_size_left: int = -1,
                window_size_right: int = -1, attention_chunk: int = 0, softcap: float = 0.0,
                rotary_interleaved: bool = True, scheduler_metadata: torch.Tensor | None = None, num_splits: int = 1,
                pack_gqa: bool | None = None, sm_margin: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        assert all(t is None for t in (k_new, v_new, qv, page_table)), "not computed by the stand-in"
        scale = 1 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
        out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window_size_left, window_size_right,
                            softcap)
        return out, lse, q.new_empty((0,), dtype=torch.float32), q.new_empty((0,), dtype=torch.float32)

    @forward.register_fake
    def _(q, k, v, *args, cu_seqlens_q=None, **kwargs):
        lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
        return (q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(lse_shape, dtype=torch.float32),
                q.new_empty((0,), dtype=torch.float32), q.new_empty((0,), dtype=torch.float32))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3], inputs[7], inputs[8])
        ctx.options = (inputs[23], inputs[24], inputs[25], inputs[26], inputs[28])

    def backward(ctx, dout, *unused):
        q, k, v, cu_q, cu_k = ctx.saved_tensors
        scale, causal, left, right, softcap = ctx.options
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        return (*_gradients(dout, q, k, v, cu_q, cu_k, scale, causal, left, right, softcap), *(None,) * 31)

    forward.register_autograd(backward, setup_context=setup_context)
    _libraries.append(forward)


def fa3_flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """FA3's ``flash_attn_func`` (stand-in; the arguments the tests use): its op, output 0."""
    return torch.ops.flash_attn_3._flash_attn_forward(
        q, k, v, softmax_scale=softmax_scale, causal=causal, window_size_left=window_size[0],
        window_size_right=window_size[1], softcap=softcap)[0]


_libraries: list = []  # the registrations live as long as these objects


def install() -> dict:
    """Register the stand-ins the real libraries don't provide; {library: True if a stand-in was registered}."""
    installed = {}
    for name, module, register in (("fa2", "flash_attn_2_cuda", _register_fa2), ("fa3", "flash_attn_3", _register_fa3)):
        real = importlib.util.find_spec(module) is not None
        if not real and not _libraries_registered(name):
            register()
            if name == "fa2":
                _install_fa2_api()
        installed[name] = not real
    return installed


def _libraries_registered(name: str) -> bool:
    namespace = {"fa2": "flashattn", "fa3": "flash_attn_3"}[name]
    return hasattr(getattr(torch.ops, namespace), "_flash_attn_forward")
