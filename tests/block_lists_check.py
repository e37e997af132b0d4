"""Compare the Triton block-list kernel with the PyTorch rules of block_mask (run with TRITON_INTERPRET=1)."""

import torch

from fa4_inductor import block_mask
from fa4_inductor.block_lists_kernel import block_lists
from tests.test_block_mask import _padding, _segments

CASES = [
    # (S_q, S_k, block, causal, left, right, padding, documents)
    (300, 300, (64, 32), True, -1, -1, "right", 0), (300, 300, (32, 64), False, -1, -1, "left", 0),
    (200, 333, (64, 64), False, 40, 0, "random", 0), (256, 256, (64, 64), True, -1, -1, None, 3),
    (250, 250, (32, 64), False, 20, 7, "right", 4), (100, 100, (128, 128), True, -1, -1, "random", 2),
]


def check(case) -> None:
    """Counts equal and the first ``count`` indices equal, forward and backward."""
    seqlen_q, seqlen_k, block, causal, left, right, padding, documents = case
    generator = torch.Generator().manual_seed(len(str(case)))
    parts = block_mask.MaskParts(causal, left, right,
                                 _padding(padding, 3, seqlen_k, generator) if padding else None,
                                 _segments(3, seqlen_k, documents, generator) if documents else None)
    states = block_mask.block_states(3, seqlen_q, seqlen_k, block, parts, torch.device("cpu"))
    for backward, want in ((False, block_mask.forward_lists(states)), (True, block_mask.backward_lists(states))):
        got = block_lists(3, seqlen_q, seqlen_k, block, parts, torch.device("cpu"), backward=backward)
        for count, index, want_count, want_index in ((got[0], got[1], want[0], want[1]),
                                                     (got[2], got[3], want[2], want[3])):
            assert torch.equal(count, want_count), (case, backward, count, want_count)
            used = torch.arange(index.shape[-1]) < count[..., None]
            assert torch.equal(index[used], want_index[used]), (case, backward)


if __name__ == "__main__":
    for case in CASES:
        check(case)
    print("checked", len(CASES))
