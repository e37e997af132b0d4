"""Compare the Triton masking-buffer kernel with the PyTorch rules of block_mask (run with TRITON_INTERPRET=1)."""

import dataclasses

import torch

from fa4_inductor.runtime import block_mask, masking_buffer
from fa4_inductor.runtime.block_lists_kernel import fill_masking_buffer
from tests.runtime.test_block_mask import _padding, _segments

CASES = [
    # (S_q, S_k, block, causal, left, right, padding, documents)
    (300, 300, (64, 32), True, -1, -1, "right", 0), (300, 300, (32, 64), False, -1, -1, "left", 0),
    (200, 333, (64, 64), False, 40, 0, "random", 0), (256, 256, (64, 64), True, -1, -1, None, 3),
    (250, 250, (32, 64), False, 20, 7, "right", 4), (100, 100, (128, 128), True, -1, -1, "random", 2),
    (300, 300, None, True, -1, -1, "random", 2),  # no sparse block size: operands only
]


def _operand(values: torch.Tensor, fill: int) -> torch.Tensor:
    hidden = torch.full((values.shape[0], masking_buffer.KEY_TILE_SLACK), fill, dtype=torch.int32)
    return torch.cat([values.to(torch.int32), hidden], dim=1)


def check(case) -> None:
    """Operands equal; list counts equal and the first ``count`` indices equal, forward and backward."""
    seqlen_q, seqlen_k, block, causal, left, right, padding, documents = case
    generator = torch.Generator().manual_seed(len(str(case)))
    parts = block_mask.MaskParts(causal, left, right,
                                 _padding(padding, 3, seqlen_k, generator) if padding else None,
                                 _segments(3, seqlen_k, documents, generator) if documents else None)
    where = masking_buffer.layout(3, seqlen_q, seqlen_k, bool(padding), bool(documents), block)
    buffer = torch.full((where.size,), -7, dtype=torch.int32)
    fill_masking_buffer(buffer, where.offsets, seqlen_k + masking_buffer.KEY_TILE_SLACK, parts, seqlen_q, block)
    if documents:  # ids of a narrow integer type give the same buffer
        narrow = torch.full((where.size,), -7, dtype=torch.int32)
        fill_masking_buffer(narrow, where.offsets, seqlen_k + masking_buffer.KEY_TILE_SLACK,
                            dataclasses.replace(parts, segment_ids=parts.segment_ids.to(torch.int16)), seqlen_q, block)
        assert torch.equal(narrow, buffer), case
    wanted_aux = [_operand(parts.key_padding, 0)] if padding else []
    wanted_aux += [_operand(parts.segment_ids, torch.iinfo(torch.int32).min)] if documents else []
    states = block_mask.block_states(3, seqlen_q, seqlen_k, block, parts, torch.device("cpu")) if block else None
    for backward in (False, True):
        aux, got = masking_buffer.views(buffer, where, backward=backward)
        assert len(aux) == len(wanted_aux) and all(torch.equal(a, w) for a, w in zip(aux, wanted_aux)), case
        if states is None:
            assert got is None, case
            continue
        want = block_mask.backward_lists(states) if backward else block_mask.forward_lists(states)
        for count, index, want_count, want_index in ((got[0], got[1], want[0], want[1]),
                                                     (got[2], got[3], want[2], want[3])):
            assert count.shape == want_count.shape and index.shape == want_index.shape, case
            assert torch.equal(count, want_count), (case, backward, count, want_count)
            used = torch.arange(index.shape[-1]) < count[..., None]
            assert torch.equal(index[used], want_index[used]), (case, backward)


if __name__ == "__main__":
    for case in CASES:
        check(case)
    print("checked", len(CASES))
