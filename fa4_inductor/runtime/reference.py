"""Reference attention math with FA4's exact semantics (a stand-in for tests).

This is the CPU implementation of the ``fa4`` ops: plain PyTorch math in
float32 (float64 for float64 inputs) on B,S,H,D tensors, returning the
output and the natural-log logsumexp (B,H,S, float32) like FA4. It exists so
every graph rewrite can be checked end to end on a machine without a GPU.
It is never chosen for speed.

Semantics copied from FA4: causal and sliding windows are aligned to the
bottom-right corner (query ``i`` sees key ``j`` iff
``i + S_k - S_q - left <= j <= i + S_k - S_q + right``); softcap applies
``c * tanh(s / c)`` to the scaled scores; GQA shares each key/value head
among ``H_q / H_kv`` query heads; keys at or past ``seqused_k[b]``, keys
``j`` with ``key_padding[b, j]`` false, and keys of another document
(``segment_ids[b, i] != segment_ids[b, j]``) are ignored; a query row with
no visible key gives zeros and ``lse = -inf``.

Masks read from tensors (key padding, segment ids) take FA4's block-sparse
route on the GPU. The reference goes through the same tile classification
(:mod:`.block_mask`, on small tiles so short test sequences span many): a
tile called full is computed unmasked and one called empty is skipped, as
FA4 does, so a wrong classification shows up as a wrong result.
"""

from __future__ import annotations

import torch

from fa4_inductor.runtime import block_mask

# Small and non-square, so that tests of short sequences cross many tiles both ways.
REFERENCE_BLOCK = (16, 32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible_keys(
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool,
    window_left: int,
    window_right: int,
    seqused_k: torch.Tensor | None,
    device: torch.device,
    key_padding: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (B, 1, S_q, S_k) mask of the keys each query may attend to."""
    if causal:
        window_right = 0
    q_idx = torch.arange(seqlen_q, device=device)[:, None]
    k_idx = torch.arange(seqlen_k, device=device)[None, :]
    diagonal = q_idx + (seqlen_k - seqlen_q)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= k_idx >= diagonal - window_left
    if window_right >= 0:
        visible &= k_idx <= diagonal + window_right
    visible = visible.expand(batch, 1, seqlen_q, seqlen_k)
    if seqused_k is not None:
        visible = visible & (k_idx < seqused_k.to(device).view(batch, 1, 1, 1))
    if key_padding is not None:
        key_padding = key_padding.to(device=device, dtype=torch.bool)
        visible = visible & key_padding.view(batch, 1, 1, seqlen_k)
    if segment_ids is not None:
        segment_ids = segment_ids.to(device)
        visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if key_padding is None and segment_ids is None:
        return visible
    parts = block_mask.MaskParts(causal, window_left, window_right, key_padding, segment_ids)
    states = block_mask.expand(block_mask.block_states(batch, seqlen_q, seqlen_k, REFERENCE_BLOCK, parts, device),
                               seqlen_q, seqlen_k, REFERENCE_BLOCK)
    return torch.where(states == block_mask.FULL, True, (states == block_mask.PARTIAL) & visible)


def alibi_bias(slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi as the fa4 ops add it: ``slopes[h] * (j - i - (S_k - S_q))`` (H, S_q, S_k), 0 on the bottom-right
    diagonal (a constant per row, which softmax ignores, away from ``slopes[h] * j``)."""
    i = torch.arange(seqlen_q, device=slopes.device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=slopes.device)[None, :]
    return slopes.to(dtype)[:, None, None] * (j - i).to(dtype)


def relative_bias(table: torch.Tensor, seqlen_q: int, seqlen_k: int, dtype: torch.dtype) -> torch.Tensor:
    """A relative-position table (H, S_q + S_k - 1) as the fa4 ops add it: ``table[h, j - i + S_q - 1]`` (H, S_q,
    S_k)."""
    offsets = torch.arange(seqlen_k, device=table.device)[None, :] - torch.arange(seqlen_q, device=table.device)[:, None]
    return table.to(dtype)[:, offsets + seqlen_q - 1]


def key_bias(table: torch.Tensor, seqlen_q: int, seqlen_k: int, dtype: torch.dtype) -> torch.Tensor:
    """A bias per key (B, H, S_k) as the fa4 ops add it: ``table[b, h, j]`` for every query (B, H, 1, S_k)."""
    return table.to(dtype)[:, :, None, :]


def _scores(q, k, softmax_scale, softcap, bias=None):
    """B,S,H,D inputs (compute dtype) -> (scaled, capped scores B,H,S_q,S_k plus the bias (H, S_q, S_k) or
    (B, H, 1, S_k); tanh of the capped scores)."""
    group = q.shape[2] // k.shape[2]
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (q.transpose(1, 2) @ kh.transpose(-1, -2)) * softmax_scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if softcap <= 0:
        return scores, None
    capped_tanh = torch.tanh(scores / softcap)
    return softcap * capped_tanh, capped_tanh


def _attention(q, k, v, softmax_scale, softcap, visible, bias=None):
    """B,S,H,D inputs (compute dtype) -> (out B,S,H,Dv, lse B,H,S)."""
    vh = v.transpose(1, 2).repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    scores, _ = _scores(q, k, softmax_scale, softcap, bias)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    has_key = visible.any(dim=-1, keepdim=True)
    probs = torch.where(has_key, torch.exp(scores - torch.where(has_key, lse.unsqueeze(-1), 0.0)), 0.0)
    return (probs @ vh).transpose(1, 2), lse


def _group_sum(grad_bhsd: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum per-query-head gradients over each GQA group: B,Hq,S,D -> B,S,Hkv,D."""
    b, hq, s, d = grad_bhsd.shape
    return grad_bhsd.view(b, kv_heads, hq // kv_heads, s, d).sum(dim=2).transpose(1, 2)


def _visible(q, k, causal, window_left, window_right, seqused_k, key_padding, segment_ids):
    return visible_keys(
        q.shape[0], q.shape[1], k.shape[1], causal=causal, window_left=window_left,
        window_right=window_right, seqused_k=seqused_k, device=q.device, key_padding=key_padding,
        segment_ids=segment_ids,
    )


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    seqused_k: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference forward: (out B,S,H,Dv in q's dtype, lse B,H,S float32); ``bias`` (H_q, S_q, S_k) or (B, H_q, 1,
    S_k) is added to the scaled scores (:func:`alibi_bias`, :func:`relative_bias`, :func:`key_bias`)."""
    ct = _compute_dtype(q.dtype)
    visible = _visible(q, k, causal, window_left, window_right, seqused_k, key_padding, segment_ids)
    out, lse = _attention(q.to(ct), k.to(ct), v.to(ct), softmax_scale, softcap, visible, bias)
    return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous()


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    seqused_k: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference backward, FA4's way: the probabilities come from the given ``lse`` and the row term from
    the given ``out`` (so a call on part of the keys, with the whole row's ``out`` and ``lse``, gives that
    part's share of the gradients, as ring attention and split-KV need).

    dP = dO V^T, dS = P * (dP - rowsum(dO * O)), through the softcap's tanh,
    dQ = dS K * scale, dK = dS^T Q * scale, dV = P^T dO (GQA groups summed).
    """
    ct = _compute_dtype(q.dtype)
    qc, kc, vc, doc, oc = (t.to(ct) for t in (q, k, v, dout, out))
    visible = _visible(q, k, causal, window_left, window_right, seqused_k, key_padding, segment_ids)
    scores, capped_tanh = _scores(qc, kc, softmax_scale, softcap, bias)
    row_lse = lse.to(ct)
    if ct == torch.float64:  # lse is stored in float32; where it is this call's own lse rounded, take it exact
        own = scores.masked_fill(~visible, float("-inf")).logsumexp(dim=-1)
        row_lse = torch.where(own.to(torch.float32) == lse, own, row_lse)
    row_lse = row_lse.unsqueeze(-1)
    keep = visible & torch.isfinite(row_lse)
    probs = torch.where(keep, torch.exp(scores - torch.where(keep, row_lse, 0.0)), 0.0)
    group = q.shape[2] // k.shape[2]
    do_h = doc.transpose(1, 2)
    qh = qc.transpose(1, 2)
    kh = kc.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = vc.transpose(1, 2).repeat_interleave(group, dim=1)
    dprobs = do_h @ vh.transpose(-1, -2)
    row_dot = (do_h * oc.transpose(1, 2)).sum(dim=-1, keepdim=True)
    dscores = probs * (dprobs - row_dot)
    if capped_tanh is not None:
        dscores = dscores * (1 - capped_tanh * capped_tanh)
    dscores = dscores * softmax_scale
    dq = (dscores @ kh).transpose(1, 2)
    dk = _group_sum(dscores.transpose(-1, -2) @ qh, k.shape[2])
    dv = _group_sum(probs.transpose(-1, -2) @ do_h, k.shape[2])
    return tuple(g.to(t.dtype).contiguous() for g, t in zip((dq, dk, dv), (q, k, v)))


def _sequences(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, seqused_k: torch.Tensor | None):
    """(query rows, key rows) of each sequence of a varlen batch: FA4 reads ``seqused_k[b]`` keys of sequence ``b``
    where given (its causal alignment then counts those), else all of them."""
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    used = seqused_k.tolist() if seqused_k is not None else None
    for b in range(len(starts_q) - 1):
        keys_end = starts_k[b + 1] if used is None else starts_k[b] + used[b]
        yield slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], keys_end)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale: float, causal: bool = False,
                   window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                   seqused_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference varlen forward on packed (tokens, H, D) tensors: each sequence attends to its own keys, causal and
    windows aligned bottom-right per sequence; returns (out (total_q, H, Dv), lse (H, total_q) float32). Rows no
    sequence covers get zeros and ``lse = -inf``."""
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
    for rows, keys in _sequences(cu_seqlens_q, cu_seqlens_k, seqused_k):
        seq_out, seq_lse = attention_forward(q[None, rows], k[None, keys], v[None, keys], softmax_scale=softmax_scale,
                                             causal=causal, window_left=window_left, window_right=window_right,
                                             softcap=softcap)
        out[rows] = seq_out[0]
        lse[:, rows] = seq_lse[0]
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, softmax_scale: float,
                    causal: bool = False, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                    seqused_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference varlen backward: :func:`attention_backward` per sequence; keys and queries of no sequence (or past
    ``seqused_k``) get zero gradients."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for rows, keys in _sequences(cu_seqlens_q, cu_seqlens_k, seqused_k):
        grads = attention_backward(dout[None, rows], q[None, rows], k[None, keys], v[None, keys], out[None, rows],
                                   lse[None, :, rows], softmax_scale=softmax_scale, causal=causal,
                                   window_left=window_left, window_right=window_right, softcap=softcap)
        for total, grad in zip((dq[rows], dk[keys], dv[keys]), grads):
            total += grad[0]  # in place on views of the totals
    return dq, dk, dv
