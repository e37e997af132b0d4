"""The merge step of split-KV decoding as one Triton kernel (see :mod:`.split_kv`).

Written with a dozen PyTorch ops, the merge cost ~28 µs per call on an H100,
as much as the attention it serves; one kernel reading each partial once
costs a few. Each program merges one (batch, query, head) row: it reads the
row's ``splits`` logsumexps and partial outputs and writes the merged
output and logsumexp. Set ``TRITON_INTERPRET=1`` before importing this
module to run it on CPU tensors (the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_rows(out_parts, lse_parts, out, lse, out_stride_b, out_stride_s, out_stride_h,
                SEQ_Q, HEADS_KV, SPLITS: tl.constexpr, GROUP: tl.constexpr, DIM_V: tl.constexpr,
                BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # (b, s, h) with h = kv_head * GROUP + g
    g = row % GROUP
    kv_head = (row // GROUP) % HEADS_KV
    s = (row // (GROUP * HEADS_KV)) % SEQ_Q
    b = row // (GROUP * HEADS_KV * SEQ_Q)
    split = tl.arange(0, BLOCK_SPLITS)
    in_range = split < SPLITS
    # Split call head (kv_head * SPLITS + split) * GROUP + g; lse_parts is (B, heads * SPLITS, SEQ_Q).
    part_head = (kv_head * SPLITS + split) * GROUP + g
    part_lse = tl.load(lse_parts + (b * HEADS_KV * SPLITS * GROUP + part_head) * SEQ_Q + s,
                       mask=in_range, other=-float("inf"))
    peak = tl.max(part_lse, 0)
    peak = tl.where(peak == -float("inf"), 0.0, peak)
    weight = tl.exp(part_lse - peak)  # 0 for chunks without a visible key
    total = tl.sum(weight, 0)
    tl.store(lse + (b * HEADS_KV * GROUP + kv_head * GROUP + g) * SEQ_Q + s, peak + tl.log(total))
    weight = weight / tl.maximum(total, 1e-30)
    d = tl.arange(0, BLOCK_D)
    # out_parts is (B, SEQ_Q, heads * SPLITS, DIM_V), contiguous.
    rows = (b * SEQ_Q + s) * HEADS_KV * SPLITS * GROUP + part_head
    parts = tl.load(out_parts + rows[:, None] * DIM_V + d[None, :],
                    mask=in_range[:, None] & (d[None, :] < DIM_V), other=0.0).to(tl.float32)
    merged = tl.sum(tl.where(weight[:, None] > 0, parts * weight[:, None], 0.0), 0)
    target = out + b * out_stride_b + s * out_stride_s + (kv_head * GROUP + g) * out_stride_h + d
    tl.store(target, merged.to(out.dtype.element_ty), mask=d < DIM_V)


def merge(out_parts: torch.Tensor, lse_parts: torch.Tensor, heads_kv: int, splits: int, out: torch.Tensor,
          lse: torch.Tensor) -> None:
    """Write the merge of contiguous ``out_parts``/``lse_parts`` into ``out`` (last dim contiguous) and
    contiguous ``lse``."""
    batch, seqlen_q, heads, dim_v = out.shape
    _merge_rows[(batch * seqlen_q * heads,)](
        out_parts, lse_parts, out, lse, out.stride(0), out.stride(1), out.stride(2), seqlen_q, heads_kv,
        SPLITS=splits, GROUP=heads // heads_kv, DIM_V=dim_v, BLOCK_SPLITS=triton.next_power_of_2(splits),
        BLOCK_D=triton.next_power_of_2(dim_v))
