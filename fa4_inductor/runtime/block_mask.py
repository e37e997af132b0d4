"""Which tiles of an attention mask are empty, partial or full, computed on the device.

FA4's block sparsity takes, per (query block, key block) tile of the score
matrix, whether the tile is skipped (empty), computed with the ``mask_mod``
evaluated per element (partial), or computed with no mask work at all (full).
The masks the plugin routes there are and-combinations of

- a band ``lo <= j - i <= hi`` (causal or a window, bottom-right aligned),
- key padding: a (B, S_kv) boolean, key ``j`` of row ``b`` visible where true,
- documents: (B, S) segment ids, key ``j`` visible to query ``i`` where
  ``seg[b, i] == seg[b, j]`` (packed sequences),

so each tile is classified from per-block summaries (the band from its
corners, padding from any/all over the block, segments from their min/max)
without building the S_q x S_kv mask. Everything is plain tensor ops on the
mask's device: no host sync, safe under CUDA graphs, any lengths. A tile is
called full or empty only when that is proven; otherwise it is partial, and
the ``mask_mod`` decides per element. Key blocks that run past the last key
are never full.
"""

from __future__ import annotations

import dataclasses

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class MaskParts:
    """The parts of a mask that the block states are built from (windows: -1 = unbounded)."""

    causal: bool = False
    window_left: int = -1
    window_right: int = -1
    key_padding: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None


def block_count(length, block: int):
    """How many blocks of ``block`` cover ``length`` (an int or a SymInt)."""
    return (length + block - 1) // block


def _states(empty: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    return torch.where(empty, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.uint8)


def _band_states(seqlen_q, seqlen_k, block_q, block_k, parts: MaskParts, device) -> torch.Tensor:
    """(nQ, nK) states of the band alone."""
    first_q = torch.arange(block_count(seqlen_q, block_q), device=device) * block_q
    first_k = torch.arange(block_count(seqlen_k, block_k), device=device) * block_k
    last_q = (first_q + block_q).clamp(max=seqlen_q) - 1
    last_k = (first_k + block_k).clamp(max=seqlen_k) - 1
    # Broadcasting by view/unsqueeze, not None-indexing: the latter fails on fake CUDA tensors in CPU-only builds.
    lowest = first_k.unsqueeze(0) - last_q.unsqueeze(1)  # smallest j - i in the tile
    highest = last_k.unsqueeze(0) - first_q.unsqueeze(1)
    offset = seqlen_k - seqlen_q
    right = 0 if parts.causal else parts.window_right
    empty = torch.zeros_like(lowest, dtype=torch.bool)
    full = torch.ones_like(empty)
    if right >= 0:
        empty = empty | (lowest > offset + right)
        full = full & (highest <= offset + right)
    if parts.window_left >= 0:
        empty = empty | (highest < offset - parts.window_left)
        full = full & (lowest >= offset - parts.window_left)
    # A key block running past the last key is never full: FA4 would not mask the missing keys.
    full = full & (first_k + block_k <= seqlen_k).unsqueeze(0)
    return _states(empty, full)


def _per_block(values: torch.Tensor, block: int, fill) -> torch.Tensor:
    """(B, S) -> (B, nBlocks, block), the last block filled with ``fill`` (in ``values``' dtype: ``F.pad`` takes a
    float fill, which can't hold int64's extremes)."""
    batch, length = values.shape
    padded = values.new_full((batch, block_count(length, block) * block), fill)
    padded[:, :length] = values
    return padded.view(batch, -1, block)


def _padding_states(key_padding: torch.Tensor, block_k: int) -> torch.Tensor:
    """(B, 1, nK) states of the key padding alone."""
    kept = key_padding.to(torch.bool)
    any_kept = _per_block(kept, block_k, False).any(dim=-1)
    all_kept = _per_block(kept, block_k, True).all(dim=-1)
    return _states(any_kept.logical_not(), all_kept).unsqueeze(1)


def _segment_states(segment_ids: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """(B, nQ, nK) states of the document mask ``seg[b, i] == seg[b, j]`` alone (S_q == S_kv)."""
    segments = segment_ids.to(torch.int64)
    top, bottom = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min
    q_low = _per_block(segments, block_q, top).amin(dim=-1).unsqueeze(2)
    q_high = _per_block(segments, block_q, bottom).amax(dim=-1).unsqueeze(2)
    k_low = _per_block(segments, block_k, top).amin(dim=-1).unsqueeze(1)
    k_high = _per_block(segments, block_k, bottom).amax(dim=-1).unsqueeze(1)
    empty = (q_high < k_low) | (k_high < q_low)
    full = (q_low == q_high) & (k_low == k_high) & (q_low == k_low)
    return _states(empty, full)


def block_states(batch: int, seqlen_q: int, seqlen_k: int, block_size: tuple[int, int], parts: MaskParts,
                 device: torch.device) -> torch.Tensor:
    """(B, nQ, nK) uint8 tile states (:data:`EMPTY`, :data:`PARTIAL`, :data:`FULL`) of the and-combined mask."""
    block_q, block_k = block_size
    states = _band_states(seqlen_q, seqlen_k, block_q, block_k, parts, device).unsqueeze(0)
    if parts.key_padding is not None:
        states = torch.minimum(states, _padding_states(parts.key_padding, block_k))
    if parts.segment_ids is not None:
        states = torch.minimum(states, _segment_states(parts.segment_ids, block_q, block_k))
    return states.expand(batch, *states.shape[1:])


def _lists(states: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``states`` (B, R, C): how many tiles are ``kind`` (B, 1, R) and their column indices,
    ascending and packed to the left (B, 1, R, C), int32, as FA4 reads them."""
    # Contiguous by the cast (states may be a transposed view), so no copy follows.
    hits = (states == kind).to(torch.uint8, memory_format=torch.contiguous_format)
    count = hits.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(hits, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.unsqueeze(1), indices.unsqueeze(1)


def forward_lists(states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """FA4's forward block sparsity (key blocks per query block): partial count and indices, full count and
    indices."""
    return (*_lists(states, PARTIAL), *_lists(states, FULL))


def backward_lists(states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """FA4's backward block sparsity (query blocks per key block), same layout as :func:`forward_lists`."""
    return forward_lists(states.transpose(1, 2))


def expand(states: torch.Tensor, seqlen_q: int, seqlen_k: int, block_size: tuple[int, int]) -> torch.Tensor:
    """(B, nQ, nK) tile states -> (B, 1, S_q, S_kv) per element, for checks and the reference."""
    block_q, block_k = block_size
    rows = states.repeat_interleave(block_q, dim=1)[:, :seqlen_q]
    return rows.repeat_interleave(block_k, dim=2)[:, None, :, :seqlen_k]
