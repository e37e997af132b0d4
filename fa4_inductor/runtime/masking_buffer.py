"""One int32 buffer holding all that FA4 reads to mask a call by data.

That is the key padding and the segment ids as the ``mask_mod`` reads them
(int32, with hidden columns past the last key), and FA4's forward and backward
block-sparsity lists. One Triton launch (:mod:`.block_lists_kernel`) fills it.
The ``fa4.masking_buffer`` op makes it; a compiled step makes it once for
all its calls with the same masks (:mod:`.buffer_sharing`) and hands it to
the backward as a saved tensor, so the backward neither casts the masks again nor rebuilds lists.
Calls without one (a kernel op or a backward called alone) make their own.
Its parts are 128-byte aligned views; the ``size`` of :func:`layout` is what
the fake impls promise, symbolic sizes included.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from fa4_inductor._torch_private import contiguous_strides, empty_strided, is_fake
from fa4_inductor.runtime.block_mask import MaskParts, block_count

# FA4 evaluates a mask_mod on whole key tiles (up to 256 keys), also past the last key.
KEY_TILE_SLACK = 256
_ALIGN = 32  # int32 elements: 128 bytes
_LIST_NAMES = ("partial_count", "partial_index", "full_count", "full_index")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each part lies in the buffer: name -> (offset, shape), in int32 elements; ``size`` in all."""

    parts: dict[str, tuple[int, tuple[int, ...]]]
    size: int

    @functools.cached_property
    def offsets(self) -> dict[str, int]:
        """name -> offset of each part."""
        return {name: offset for name, (offset, _) in self.parts.items()}

    @functools.cached_property
    def views(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], int]]:
        """name -> (shape, strides, offset) of each part as a contiguous view (concrete sizes only)."""
        return {name: (shape, contiguous_strides(shape), offset) for name, (offset, shape) in self.parts.items()}


def layout(batch, seqlen_q, seqlen_k, padding: bool, documents: bool, block: tuple[int, int] | None) -> Layout:
    """The buffer's layout for a call of these sizes (ints or SymInts) and mask parts; lists only with a sparse
    ``block`` size."""
    if isinstance(batch, int) and isinstance(seqlen_q, int) and isinstance(seqlen_k, int):
        return _known_layout(batch, seqlen_q, seqlen_k, padding, documents, block)
    return _layout(batch, seqlen_q, seqlen_k, padding, documents, block)


def _layout(batch, seqlen_q, seqlen_k, padding, documents, block) -> Layout:
    parts, offset = {}, 0

    def add(name, shape):
        nonlocal offset
        parts[name] = (offset, shape)
        count = 1
        for extent in shape:
            count = count * extent
        offset = (offset + count + _ALIGN - 1) // _ALIGN * _ALIGN

    operand = (batch, seqlen_k + KEY_TILE_SLACK)  # segment ids need S_q == S_kv
    if padding:
        add("key_padding", operand)
    if documents:
        add("segment_ids", operand)
    if block is not None:
        rows_q, cols_k = block_count(seqlen_q, block[0]), block_count(seqlen_k, block[1])
        for direction, (rows, cols) in (("forward", (rows_q, cols_k)), ("backward", (cols_k, rows_q))):
            for name in _LIST_NAMES:
                add(f"{direction}_{name}", (batch, 1, rows, cols) if name.endswith("index") else (batch, 1, rows))
    return Layout(parts, offset)


_known_layout = functools.lru_cache(maxsize=256)(_layout)


def views(buffer: torch.Tensor, where: Layout, *, backward: bool) -> tuple[list[torch.Tensor], tuple | None]:
    """The parts of ``buffer`` (laid out as ``where`` says) one call reads: its aux tensors, and (partial count,
    partial indices, full count, full indices) of its direction or None; ValueError if the buffer's size
    differs (one made for another call)."""
    if buffer.dtype != torch.int32 or buffer.dim() != 1 or buffer.shape[0] != where.size or buffer.stride(0) != 1:
        raise ValueError(f"masking buffer: expected {where.size} contiguous int32 elements, got {buffer.dtype} "
                         f"{tuple(buffer.shape)} with stride {buffer.stride()}")

    specs = where.views
    aux = [buffer.as_strided(*specs[name]) for name in ("key_padding", "segment_ids") if name in specs]
    direction = "backward" if backward else "forward"
    if f"{direction}_full_index" not in specs:
        return aux, None
    return aux, tuple(buffer.as_strided(*specs[f"{direction}_{name}"]) for name in _LIST_NAMES)


def make(parts: MaskParts, seqlen_q: int, where: Layout, block: tuple[int, int] | None,
         like: torch.Tensor) -> torch.Tensor:
    """A filled buffer for these mask parts on ``like``'s device (one Triton launch); only allocated for fake
    tensors (precompiling: only shapes matter and nothing may launch)."""
    if is_fake(like):
        return torch.empty((where.size,), dtype=torch.int32, device=like.device)
    from fa4_inductor.runtime.block_lists_kernel import fill_masking_buffer  # Triton: imported only where a real call runs

    buffer = empty_strided((where.size,), (1,), torch.int32, like.device)
    seqlen_k = (parts.key_padding if parts.key_padding is not None else parts.segment_ids).shape[1]
    fill_masking_buffer(buffer, where.offsets, seqlen_k + KEY_TILE_SLACK, parts, seqlen_q, block)
    return buffer
