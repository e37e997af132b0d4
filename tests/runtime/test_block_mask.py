"""Tile classification for FA4's block sparsity: never wrong, tight where masks are regular; the Triton kernel
that builds the lists on the GPU agrees with it."""

import os
import subprocess
import sys

import pytest
import torch

from fa4_inductor.runtime import block_mask
from fa4_inductor.runtime.block_mask import EMPTY, FULL, PARTIAL, MaskParts
from fa4_inductor.runtime.reference import visible_keys


def _padding(kind: str, batch: int, seqlen: int, generator) -> torch.Tensor:
    lengths = torch.randint(0, seqlen + 1, (batch,), generator=generator)
    idx = torch.arange(seqlen)[None, :]
    if kind == "right":
        return idx < lengths[:, None]
    if kind == "left":
        return idx >= (seqlen - lengths)[:, None]
    return torch.rand(batch, seqlen, generator=generator) < 0.7


def _segments(batch: int, seqlen: int, documents: int, generator) -> torch.Tensor:
    """Sorted segment ids (a packing collator's), ``documents`` per row."""
    cuts = torch.sort(torch.randint(1, seqlen, (batch, documents - 1), generator=generator), dim=1).values
    return (torch.arange(seqlen)[None, None, :] >= cuts[:, :, None]).sum(dim=1)


def _dense(batch, seqlen_q, seqlen_k, parts: MaskParts) -> torch.Tensor:
    i = torch.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k)[None, :]
    dense = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    right = 0 if parts.causal else parts.window_right
    if right >= 0:
        dense &= j <= i + right
    if parts.window_left >= 0:
        dense &= j >= i - parts.window_left
    dense = dense.expand(batch, 1, seqlen_q, seqlen_k)
    if parts.key_padding is not None:
        dense = dense & parts.key_padding[:, None, None, :]
    if parts.segment_ids is not None:
        dense = dense & (parts.segment_ids[:, None, :, None] == parts.segment_ids[:, None, None, :])
    return dense


CASES = [
    dict(band=(False, -1, -1), padding="right"), dict(band=(True, -1, -1), padding="left"),
    dict(band=(False, 40, 0), padding="random"), dict(band=(False, 17, 5), padding="right"),
    dict(band=(True, -1, -1), documents=3), dict(band=(False, -1, -1), documents=4, padding="right"),
    dict(band=(False, 30, 0), documents=2, padding="left"), dict(band=(True, -1, -1), documents=5),
]


# Documents need S_q == S_kv; the other masks also run with fewer queries than keys.
LENGTHS = [(case, lengths) for case in CASES
           for lengths in ([(200, 200)] if case.get("documents") else [(200, 200), (77, 200), (128, 256)])]


@pytest.mark.parametrize("case, lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("block", [(16, 32), (64, 16)])
def test_states_never_contradict_the_mask(case, lengths, block):
    generator = torch.Generator().manual_seed(hash((str(case), lengths, block)) % 2**31)
    seqlen_q, seqlen_k = lengths
    padding = _padding(case["padding"], 3, seqlen_k, generator) if case.get("padding") else None
    segments = _segments(3, seqlen_k, case["documents"], generator) if case.get("documents") else None
    parts = MaskParts(*case["band"], key_padding=padding, segment_ids=segments)
    states = block_mask.block_states(3, seqlen_q, seqlen_k, block, parts, torch.device("cpu"))
    per_element = block_mask.expand(states, seqlen_q, seqlen_k, block)
    dense = _dense(3, seqlen_q, seqlen_k, parts)
    assert not (dense & (per_element == EMPTY)).any(), "a visible key in a tile called empty"
    assert not (~dense & (per_element == FULL)).any(), "a hidden key in a tile called full"
    assert torch.equal(visible_keys(3, seqlen_q, seqlen_k, causal=parts.causal, window_left=parts.window_left,
                                    window_right=parts.window_right, seqused_k=None, device=torch.device("cpu"),
                                    key_padding=padding, segment_ids=segments), dense)


def test_regular_masks_are_classified_tightly():
    """Right padding and sorted documents with causal: every tile that can be decided is."""
    padding = torch.arange(256)[None, :] < torch.tensor([[256], [130], [64]])
    states = block_mask.block_states(3, 256, 256, (64, 64), MaskParts(causal=True, key_padding=padding),
                                     torch.device("cpu"))
    assert states[0].tolist() == [[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]]
    assert states[1, :, 2].tolist() == [0, 0, 1, 1] and states[1, :, 3].tolist() == [0, 0, 0, 0]
    assert (states[2, :, 1:] == EMPTY).all()
    segments = torch.tensor([[0] * 128 + [1] * 128])
    documents = block_mask.block_states(1, 256, 256, (64, 64), MaskParts(segment_ids=segments), torch.device("cpu"))
    assert documents[0].tolist() == [[2, 2, 0, 0], [2, 2, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]]


def test_key_blocks_past_the_last_key_are_never_full():
    states = block_mask.block_states(1, 100, 100, (64, 64), MaskParts(key_padding=torch.ones(1, 100, dtype=torch.bool)),
                                     torch.device("cpu"))
    assert states[0].tolist() == [[FULL, PARTIAL], [FULL, PARTIAL]]


def test_lists_are_fa4s_packed_ascending_indices():
    states = torch.tensor([[[2, 1, 0, 1], [0, 0, 0, 0], [1, 2, 2, 1]]], dtype=torch.uint8)
    partial_count, partial_index, full_count, full_index = block_mask.forward_lists(states)
    assert partial_count.tolist() == [[[2, 0, 2]]] and full_count.tolist() == [[[1, 0, 2]]]
    assert partial_index[0, 0, 0, :2].tolist() == [1, 3] and partial_index[0, 0, 2, :2].tolist() == [0, 3]
    assert full_index[0, 0, 0, :1].tolist() == [0] and full_index[0, 0, 2, :2].tolist() == [1, 2]
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in (partial_count, partial_index))
    bwd_count, bwd_index, *_ = block_mask.backward_lists(states)
    assert bwd_count.tolist() == [[[1, 1, 0, 2]]] and bwd_index[0, 0, 3, :2].tolist() == [0, 2]


def test_triton_masking_buffer_kernel_matches_the_rules():
    """The CUDA path's one-launch kernel, in Triton's interpreter on CPU (chosen before Triton is imported, so in a
    fresh process): its lists against :func:`block_mask.forward_lists` / ``backward_lists``, its operands against
    the masks cast to int32 with hidden columns."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "tests.runtime.block_lists_check"], cwd=root,
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("arch", [90, 100])
@pytest.mark.parametrize("masks", [dict(HAS_RIGHT=True, HAS_LEFT=False, HAS_PAD=True, HAS_SEG=False),
                                   dict(HAS_RIGHT=True, HAS_LEFT=True, HAS_PAD=True, HAS_SEG=True)],
                         ids=["padding_causal", "documents_padding_window"])
def test_triton_masking_buffer_kernel_compiles_for_the_gpu(arch, masks):
    """The kernel compiles to a cubin for sm90 and sm100 with no GPU: what the interpreter can't check."""
    pytest.importorskip("triton")
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fa4_inductor.runtime.block_lists_kernel import _masking_buffer

    block_q = 128 if arch == 90 else 256
    constants = dict(masks, BLOCK_Q=block_q, BLOCK_K=128, CHUNK_FORWARD=32, CHUNK_BACKWARD=4096 // block_q,
                     COPY=1024)
    names = _masking_buffer.arg_names
    signature = {name: "constexpr" if name in constants else "i32" for name in names}
    signature.update(pad="*u8", seg="*i64", buffer="*i32")
    source = ASTSource(fn=_masking_buffer, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    compiled = triton_compile(source, target=GPUTarget("cuda", arch, 32))
    assert compiled.asm.get("cubin"), "no cubin"
