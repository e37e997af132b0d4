"""Split-KV decoding on top of FA4 kernels that have none (sm90).

A decoding step (a few query rows against a long KV cache) gives FA4 one
CTA per (batch row, KV head): on sm90, where FA4 has no split-KV kernel,
batch 1 with 8 KV heads runs 8 CTAs on 132 SMs, 2-6x slower than stock
SDPA's flash-decoding (``benchmarks/results/decode.md``). Here the keys are
cut into ``splits`` equal chunks that become extra KV heads of one FA4 call,
and the partial results are merged by their logsumexp.

The chunks are views, not copies: K (B, S, H, D) with S = n * c is read as
(B, c, H * n, D), KV head ``h * n + i`` being chunk ``i`` of head ``h``.
That needs the head stride to be S times the sequence stride, as in the
(B, H, S, D)-contiguous KV caches of Hugging Face models; other layouts
are not split. Only the few query rows are copied, once per chunk, so each
query head keeps its KV head's GQA group.

The merge (one Triton kernel, :mod:`.split_kv_combine`) is the one ring
attention uses, so the op's logsumexp is the full one and the backward
(FA4's, on the unsplit tensors) is unchanged.
"""

from __future__ import annotations

import functools

import torch

# Each chunk keeps at least two of FA4's 128-key tiles; more splits than this stop paying.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64
# FA4's sm90 forward packs a GQA group into one 128-row query tile (pack_gqa).
_QUERY_TILE = 128


@functools.lru_cache(maxsize=4096)
def num_splits(batch: int, seqlen_q: int, heads: int, heads_kv: int, seqlen_k: int, num_sms: int) -> int:
    """How many key chunks a call should be cut into (1: run it as is).

    Splits only calls whose query rows fit one tile per KV head and whose
    grid covers at most an eighth of the SMs: on an H100, 8 CTAs split 16-32
    ways ran 3.6-4.7x faster than unsplit, while splitting 32 or 64 CTAs was
    slower than not (measured with an earlier merge of PyTorch ops,
    ``benchmarks/results/decode.md``). Picks the fewest
    chunks that reach one CTA per SM, among chunk counts that divide the key
    length.
    """
    if seqlen_q * (heads // heads_kv) > _QUERY_TILE:
        return 1
    ctas = batch * heads_kv
    if 8 * ctas > num_sms:
        return 1
    best = 1
    for splits in range(2, min(MAX_SPLITS, seqlen_k // MIN_KEYS_PER_SPLIT) + 1):
        if seqlen_k % splits:
            continue
        best = splits
        if ctas * splits >= num_sms:
            break
    return best


def chunkable(seqlen: int | None, seq_stride: int | None, head_stride: int | None) -> bool:
    """Whether (B, S, H, D) keys with these strides can be viewed as key chunks (the head stride must be S
    times the sequence stride, as in a (B, H, S, D) cache)."""
    return None not in (seqlen, seq_stride, head_stride) and head_stride == seqlen * seq_stride


def _chunked_keys(t: torch.Tensor, splits: int) -> torch.Tensor | None:
    """(B, S, H, D) as (B, S / splits, H * splits, D), a view; None if the strides don't allow one."""
    batch, seqlen, heads, dim = t.shape
    chunk = seqlen // splits
    if not chunkable(seqlen, t.stride(1), t.stride(2)):
        return None
    return t.as_strided((batch, chunk, heads * splits, dim), (t.stride(0), t.stride(1), chunk * t.stride(1), t.stride(3)))


def split_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                 splits: int) -> tuple[torch.Tensor, ...] | None:
    """The B,S,H,D operands of the split call, and the key padding as (B, splits, S / splits); None if
    K or V can't be viewed in chunks."""
    k_parts, v_parts = _chunked_keys(k, splits), _chunked_keys(v, splits)
    if k_parts is None or v_parts is None:
        return None
    batch, seqlen_q, heads, dim = q.shape
    heads_kv = k.shape[2]
    group = heads // heads_kv
    # Query head (h * splits + i) * group + g is query head h * group + g, facing chunk i.
    q_parts = (q.view(batch, seqlen_q, heads_kv, 1, group, dim)
               .expand(batch, seqlen_q, heads_kv, splits, group, dim)
               .reshape(batch, seqlen_q, heads * splits, dim))
    padding = None if key_padding is None else key_padding.reshape(batch, splits, k.shape[1] // splits)
    return q_parts, k_parts, v_parts, padding


def combine(out_parts: torch.Tensor, lse_parts: torch.Tensor, heads_kv: int, splits: int, out: torch.Tensor,
            lse: torch.Tensor) -> None:
    """Merge the chunks' outputs (B, S_q, H * splits, Dv) and logsumexps (B, H * splits, S_q) into
    ``out`` (B, S_q, H, Dv) and ``lse`` (B, H, S_q); rows that see no key get zeros and -inf."""
    from fa4_inductor.runtime import split_kv_combine  # Triton: imported only where a split call runs

    split_kv_combine.merge(out_parts, lse_parts, heads_kv, splits, out, lse)
