"""A masking buffer (:mod:`.masking_buffer`) filled in one Triton kernel: FA4's block-sparsity lists, forward
and backward, and the int32 mask operands its ``mask_mod`` reads.

Built with PyTorch ops, the tile states and index lists of one call take ~40
ops: 650-770 µs of host time per call on the H200 machine, twice a training
step's attention (forward and backward), more than FA4's own kernel at S=4096.
Here one program per (batch row, block row) classifies its tiles from the
mask's parts (band corners, padding any/all over each key block, segment-id
min/max over each block) and writes the packed ascending index lists with a
running cumsum; further programs copy the padding and segment ids into the
operands: one launch per step for all the calls with the same masks. The rules are those of
:mod:`.block_mask`, which stays the reference the tests compare this kernel
with, in Triton's interpreter (``TRITON_INTERPRET=1`` set before importing
this module).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fa4_inductor.runtime.block_mask import MaskParts, block_count


@triton.jit
def _pad_summary(pad, pad_stride_b, b, first, SEQ_K, BLOCK: tl.constexpr):
    """(any kept, all kept) over keys [first, first + BLOCK) of batch row b; ``first`` may be a vector."""
    offs = first[:, None] + tl.arange(0, BLOCK)[None, :]
    valid = offs < SEQ_K
    kept = tl.load(pad + b * pad_stride_b + offs, mask=valid, other=0).to(tl.int32)
    count = tl.sum(kept, axis=1)
    width = tl.sum(valid.to(tl.int32), axis=1)
    return count > 0, count == width


@triton.jit
def _segment_summary(seg, seg_stride_b, b, first, LENGTH, BLOCK: tl.constexpr):
    """(min, max) segment id over positions [first, first + BLOCK) of batch row b."""
    offs = first[:, None] + tl.arange(0, BLOCK)[None, :]
    valid = offs < LENGTH
    ids = tl.load(seg + b * seg_stride_b + offs, mask=valid, other=0).to(tl.int64)
    low = tl.min(tl.where(valid, ids, 4611686018427387904), axis=1)  # 2**62: above any id
    high = tl.max(tl.where(valid, ids, -4611686018427387904), axis=1)
    return low, high


@triton.jit
def _list_row(pad, seg, buffer, partial_count, partial_index, full_count, full_index, pad_stride_b, seg_stride_b,
              b, row, SEQ_Q, SEQ_K, N_ROWS, N_COLS, RIGHT, LEFT,
              HAS_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SEG: tl.constexpr,
              ROWS_ARE_QUERIES: tl.constexpr, ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr,
              CHUNK: tl.constexpr):
    """The partial and full tiles of block row ``row`` of batch row ``b``: counts and packed index lists at the
    given offsets of ``buffer``."""
    offset = SEQ_K - SEQ_Q
    row_first = row * ROW_BLOCK + tl.zeros((1,), dtype=tl.int32)  # a 1-vector, to share the vector helpers
    if ROWS_ARE_QUERIES:
        row_len = SEQ_Q
        col_len = SEQ_K
        k_block = COL_BLOCK
    else:
        row_len = SEQ_K
        col_len = SEQ_Q
        k_block = ROW_BLOCK
    row_last = tl.minimum(row_first + ROW_BLOCK, row_len) - 1
    if HAS_PAD and not ROWS_ARE_QUERIES:
        row_any, row_all = _pad_summary(pad, pad_stride_b, b, row_first, SEQ_K, ROW_BLOCK)
    if HAS_SEG:
        row_low, row_high = _segment_summary(seg, seg_stride_b, b, row_first, row_len, ROW_BLOCK)
    partial_n = tl.sum(tl.zeros((CHUNK,), dtype=tl.int32), 0)
    full_n = partial_n
    out_row = (b * N_ROWS + row) * N_COLS
    for start in range(0, N_COLS, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        in_range = cols < N_COLS
        col_first = cols * COL_BLOCK
        col_last = tl.minimum(col_first + COL_BLOCK, col_len) - 1
        if ROWS_ARE_QUERIES:
            lowest = col_first - row_last  # smallest j - i in the tile
            highest = col_last - row_first
            k_first = col_first
        else:
            lowest = row_first - col_last
            highest = row_last - col_first
            k_first = row_first
        empty = tl.zeros((CHUNK,), dtype=tl.int1)
        full = (k_first + k_block <= SEQ_K) & in_range  # a key block running past the last key is never full
        if HAS_RIGHT:
            empty = empty | (lowest > offset + RIGHT)
            full = full & (highest <= offset + RIGHT)
        if HAS_LEFT:
            empty = empty | (highest < offset - LEFT)
            full = full & (lowest >= offset - LEFT)
        if HAS_PAD:
            if ROWS_ARE_QUERIES:
                any_kept, all_kept = _pad_summary(pad, pad_stride_b, b, col_first, SEQ_K, COL_BLOCK)
            else:
                any_kept, all_kept = row_any, row_all
            empty = empty | (any_kept == 0)
            full = full & all_kept
        if HAS_SEG:
            col_low, col_high = _segment_summary(seg, seg_stride_b, b, col_first, col_len, COL_BLOCK)
            empty = empty | (row_high < col_low) | (col_high < row_low)
            full = full & (row_low == row_high) & (col_low == col_high) & (row_low == col_low)
        is_full = full & (empty == 0)
        is_partial = in_range & (empty == 0) & (is_full == 0)
        partial_at = tl.cumsum(is_partial.to(tl.int32), 0)
        tl.store(buffer + partial_index + out_row + partial_n + partial_at - 1, cols, mask=is_partial)
        partial_n += tl.sum(is_partial.to(tl.int32), 0)
        full_at = tl.cumsum(is_full.to(tl.int32), 0)
        tl.store(buffer + full_index + out_row + full_n + full_at - 1, cols, mask=is_full)
        full_n += tl.sum(is_full.to(tl.int32), 0)
    tl.store(buffer + partial_count + b * N_ROWS + row, partial_n)
    tl.store(buffer + full_count + b * N_ROWS + row, full_n)


@triton.jit
def _masking_buffer(pad, seg, buffer, pad_stride_b, seg_stride_b, pad_at, seg_at, WIDTH,
                    forward_partial_count, forward_partial_index, forward_full_count, forward_full_index,
                    backward_partial_count, backward_partial_index, backward_full_count, backward_full_index,
                    SEQ_Q, SEQ_K, ROWS_Q, COLS_K, LIST_PROGRAMS, RIGHT, LEFT,
                    HAS_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SEG: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                    CHUNK_FORWARD: tl.constexpr, CHUNK_BACKWARD: tl.constexpr, COPY: tl.constexpr):
    """Programs (b, p): forward list rows p < ROWS_Q (one per query block), then backward list rows (one per
    key block), LIST_PROGRAMS in all (0: no lists), then chunks of COPY operand columns (operand rows are WIDTH
    long: the keys, then hidden columns). Part offsets are in int32 elements of ``buffer``."""
    b = tl.program_id(0)
    program = tl.program_id(1)
    if program < LIST_PROGRAMS:
        if program < ROWS_Q:
            _list_row(pad, seg, buffer, forward_partial_count, forward_partial_index, forward_full_count,
                      forward_full_index, pad_stride_b, seg_stride_b, b, program, SEQ_Q, SEQ_K, ROWS_Q, COLS_K,
                      RIGHT, LEFT, HAS_RIGHT, HAS_LEFT, HAS_PAD, HAS_SEG, True, BLOCK_Q, BLOCK_K, CHUNK_FORWARD)
        else:
            _list_row(pad, seg, buffer, backward_partial_count, backward_partial_index, backward_full_count,
                      backward_full_index, pad_stride_b, seg_stride_b, b, program - ROWS_Q, SEQ_Q, SEQ_K,
                      COLS_K, ROWS_Q, RIGHT, LEFT, HAS_RIGHT, HAS_LEFT, HAS_PAD, HAS_SEG, False, BLOCK_K, BLOCK_Q,
                      CHUNK_BACKWARD)
    else:
        columns = (program - LIST_PROGRAMS) * COPY + tl.arange(0, COPY)
        inside = columns < SEQ_K
        in_row = columns < WIDTH
        if HAS_PAD:
            kept = tl.load(pad + b * pad_stride_b + columns, mask=inside, other=0).to(tl.int32)
            tl.store(buffer + pad_at + b * WIDTH + columns, kept, mask=in_row)
        if HAS_SEG:
            ids = tl.load(seg + b * seg_stride_b + columns, mask=inside, other=0).to(tl.int32)
            ids = tl.where(inside, ids, -2147483648)  # filled after the cast: ids may be a narrower type
            tl.store(buffer + seg_at + b * WIDTH + columns, ids, mask=in_row)


_COPY = 1024


def fill_masking_buffer(buffer: torch.Tensor, offsets: dict[str, int], width: int, parts: MaskParts, seqlen_q: int,
                        block: tuple[int, int] | None) -> None:
    """Fill ``buffer`` from the mask ``parts`` in one launch: each part at its offset in ``offsets`` (by
    :mod:`.masking_buffer`'s part names), operand rows ``width`` long. Index entries past a row's count are left
    unwritten: FA4 reads only the first ``count``."""
    pad, seg = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (parts.key_padding, parts.segment_ids))
    if pad is not None and pad.dtype == torch.bool:
        pad = pad.view(torch.uint8)
    batch, seqlen_k = (pad if pad is not None else seg).shape
    block_q, block_k = block or (128, 128)
    rows_q, cols_k = block_count(seqlen_q, block_q), block_count(seqlen_k, block_k)
    lists = [offsets.get(f"{direction}_{name}", 0) for direction in ("forward", "backward")
             for name in ("partial_count", "partial_index", "full_count", "full_index")]
    right = 0 if parts.causal else parts.window_right
    list_programs = rows_q + cols_k if block else 0
    _masking_buffer[(batch, list_programs + block_count(width, _COPY))](
        pad if pad is not None else buffer, seg if seg is not None else buffer, buffer,
        pad.stride(0) if pad is not None else 0, seg.stride(0) if seg is not None else 0,
        offsets.get("key_padding", 0), offsets.get("segment_ids", 0), width, *lists,
        seqlen_q, seqlen_k, rows_q, cols_k, list_programs, max(right, 0), max(parts.window_left, 0),
        HAS_RIGHT=right >= 0, HAS_LEFT=parts.window_left >= 0, HAS_PAD=pad is not None, HAS_SEG=seg is not None,
        BLOCK_Q=block_q, BLOCK_K=block_k,
        CHUNK_FORWARD=min(triton.next_power_of_2(cols_k), max(1, 4096 // block_k)),
        CHUNK_BACKWARD=min(triton.next_power_of_2(rows_q), max(1, 4096 // block_q)), COPY=_COPY)
