"""How a call's masking reaches FA4: its keyword arguments for one forward or backward call.

Three routes, chosen per call from what the mask holds:

- **Built-in**: causal and sliding windows alone use FA4's own ``causal`` /
  ``window_size_*`` (block skipping and per-element masking inside the kernel).
- **Block-sparse mask_mod**: key padding and/or document (segment id) masks,
  and-ed with causal or a window, become one ``mask_mod`` (reading the padding
  and segment ids as aux tensors) plus FA4 block sparsity computed on the device
  (the rules in :mod:`.block_mask`). Aux tensors and the forward and backward
  lists are views of one masking buffer (:mod:`.masking_buffer`), filled in one
  Triton launch before the forward and reused by its backward.
  Empty tiles are skipped, full tiles run with no mask work, only partial tiles
  evaluate the mask_mod, so padded and packed batches cost what their visible
  part costs. The same mask_mod runs on every tile instead (exact, no block
  skipping) where FA4's tiles don't fit one sparse block size for forward and
  backward (sm90 head dims above 128), in a deterministic backward (which would
  need FA4's dQ write order), and for small padding-only calls (no band, no
  documents), whose kernel is too short to hide the host work block sparsity
  adds. ``FA4_INDUCTOR_BLOCK_SPARSITY=0`` chooses that for every call.
- **Split-KV key padding**: a decoding step's key chunks (:mod:`.split_kv`).
"""

from __future__ import annotations


import torch

from fa4_inductor import config
import torch.nn.functional as F

from fa4_inductor.runtime import block_mask, fa4_binding, masking_buffer

# A padding-only call takes block sparsity from this B * H * S_q * S_kv * D on (~1 ms of FA4 forward on an H200):
# block sparsity added ~0.3 ms of host work per call (list kernel launch, FA4's block-sparse checks), which shorter
# kernels can't hide. Measured on the H200, left-padded BERT / RoBERTa (S=2048, no band) trained in 17.6 / 16.8 ms
# per step with the mask_mod on every tile, 19.9 / 19.1 ms with block sparsity. (That was before launch plans and
# masking buffers, which make the lists in the launch that makes the operands anyway: to be measured again.)
_PADDING_ONLY_MIN_WORK = 1e11


def sparse_block_size(arch_major: int, head_dim: int, head_dim_v: int) -> tuple[int, int] | None:
    """The (query, key) tile of FA4's block sparsity that both its forward and backward kernels accept for these
    head dims, or None.

    sm90: forward tiles are 128 x 128 (192-row tiles shrink to 128), backward tiles 64-128 x 128, for head dims
    up to 128. sm100/sm110: the forward runs two 128-row query tiles per CTA, so query blocks are 256.
    """
    if max(head_dim, head_dim_v) > 128:
        return None
    if arch_major == 9:
        return 128, 128
    if arch_major in (10, 11):
        return 256, 128
    return None


def _operand(values: torch.Tensor, fill: int) -> torch.Tensor:
    """A split-KV call's key padding as the mask_mod reads it: int32, with hidden columns past the end, so that
    reads of a partial last tile stay inside the tensor."""
    return F.pad(values.to(torch.int32), (0, masking_buffer.KEY_TILE_SLACK), value=fill)


def _window(value: int) -> int | None:
    """Our ops use -1 for 'no limit' like aten; FA4 uses None."""
    return None if value < 0 else value


def fa4_masking(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: dict, *, backward: bool = False,
                deterministic: bool = False) -> dict:
    """FA4 keyword arguments for the masking in ``params`` (causal, window_left/right, key_padding,
    segment_ids, and the call's ``masking_buffer`` when a forward made one) of a call on these B,S,H,D
    tensors."""
    causal, left, right = params["causal"], params["window_left"], params["window_right"]
    key_padding, segment_ids = params.get("key_padding"), params.get("segment_ids")
    if key_padding is None and segment_ids is None:
        return dict(causal=causal, window_size_left=_window(left), window_size_right=_window(right))
    masking = dict(causal=False, window_size_left=None, window_size_right=None)
    if key_padding is not None and key_padding.dim() == 3:  # a split-KV call: no band, no documents
        splits = key_padding.shape[1]
        return dict(masking, mask_mod=fa4_binding.split_key_padding_mask_mod(q.shape[2] // k.shape[2], splits),
                    aux_tensors=[_operand(key_padding, 0)])
    arch_major = _arch_major(q.device)
    where, buffer_block = _buffer_layout(q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], key_padding,
                                         segment_ids, arch_major)
    buffer = params.get("masking_buffer")
    if buffer is None:
        buffer = _fill(key_padding, segment_ids, q.shape[1], params, where, buffer_block)
    aux, lists = masking_buffer.views(buffer, where, backward=backward)
    masking.update(mask_mod=fa4_binding.mask_mod(causal, left, right, key_padding is not None, segment_ids is not None),
                   aux_tensors=aux)
    block = block_sparsity_route(tuple(q.shape), k.shape[1], v.shape[-1], params, arch_major, backward=backward,
                                 deterministic=deterministic)
    if block is not None:
        masking["block_sparse_tensors"] = fa4_binding.block_sparse_tensors(lists, block)
    return masking


def _arch_major(device: torch.device) -> int:
    return fa4_binding.arch_and_sms(device.index)[0] // 10


def _buffer_layout(batch, seqlen_q, seqlen_k, head_dim: int, head_dim_v: int, key_padding, segment_ids,
                   arch_major: int) -> tuple[masking_buffer.Layout, tuple[int, int] | None]:
    """The masking buffer's layout for a call masked by data (sizes may be symbolic), and the block size of its
    lists: there are lists where FA4's block sparsity can serve the head dims on this arch, whether or not the
    call takes them."""
    block = sparse_block_size(arch_major, head_dim, head_dim_v)
    return masking_buffer.layout(batch, seqlen_q, seqlen_k, key_padding is not None, segment_ids is not None,
                                 block), block


def _fill(key_padding, segment_ids, seqlen_q, params: dict, where: masking_buffer.Layout,
          block: tuple[int, int] | None) -> torch.Tensor:
    parts = block_mask.MaskParts(params["causal"], params["window_left"], params["window_right"], key_padding,
                                 segment_ids)
    return masking_buffer.make(parts, seqlen_q, where, block, key_padding if key_padding is not None else segment_ids)


def mask_tensor(key_padding, segment_ids) -> torch.Tensor:
    """The mask tensor a masking buffer is made from (key padding, else segment ids): its batch, key length and
    device are the buffer's; ValueError without either."""
    mask = key_padding if key_padding is not None else segment_ids
    if mask is None:
        raise ValueError("a masking buffer needs key_padding or segment_ids")
    return mask


def _layout_of_masks(key_padding, segment_ids, seqlen_q, head_dim: int, head_dim_v: int):
    """:func:`_buffer_layout` for a buffer made from the masks themselves (batch, key length and device theirs)."""
    mask = mask_tensor(key_padding, segment_ids)
    return _buffer_layout(mask.shape[0], seqlen_q, mask.shape[1], head_dim, head_dim_v, key_padding, segment_ids,
                          _arch_major(mask.device))


def buffer_size(key_padding, segment_ids, seqlen_q, head_dim: int, head_dim_v: int):
    """The int32 elements (an int or a SymInt) of the masking buffer of a call with these masks ((B, S_kv) key
    padding and/or (B, S) segment ids), query length and head dims: what the fake impls promise."""
    return _layout_of_masks(key_padding, segment_ids, seqlen_q, head_dim, head_dim_v)[0].size


def make_buffer(key_padding, segment_ids, seqlen_q: int, head_dim: int, head_dim_v: int, params: dict) -> torch.Tensor:
    """The masking buffer of a call masked by data (``params``: its causal, window_left, window_right): its FA4
    operands and both block lists, in one launch (the ``fa4.masking_buffer`` op's CUDA kernel)."""
    where, block = _layout_of_masks(key_padding, segment_ids, seqlen_q, head_dim, head_dim_v)
    return _fill(key_padding, segment_ids, seqlen_q, params, where, block)


def tensors_of(fa4_masking: dict) -> list[torch.Tensor]:
    """The tensors inside FA4 masking keywords (aux tensors, then the block-sparsity lists), in a fixed order."""
    tensors = list(fa4_masking.get("aux_tensors") or ())
    sparse = fa4_masking.get("block_sparse_tensors")
    if sparse is not None:
        tensors += [sparse.mask_block_cnt, sparse.mask_block_idx, sparse.full_block_cnt, sparse.full_block_idx]
    return tensors


def block_sparsity_route(q_shape: tuple[int, ...], seqlen_k: int, head_dim_v: int, params: dict, arch_major: int, *,
                         backward: bool = False, deterministic: bool = False) -> tuple[int, int] | None:
    """The sparse block size a call with key padding and/or segment ids (B,S,H,D query of ``q_shape``) runs with,
    or None for the mask_mod on every tile (see the module docstring for when)."""
    batch, seqlen_q, heads, head_dim = q_shape
    block = sparse_block_size(arch_major, head_dim, head_dim_v)
    if block is None or (backward and deterministic) or not block_sparsity_switch():
        return None
    banded = params["causal"] or params["window_left"] >= 0 or params["window_right"] >= 0
    if banded or params.get("segment_ids") is not None:
        return block
    return block if batch * heads * seqlen_q * seqlen_k * head_dim >= _PADDING_ONLY_MIN_WORK else None


def block_sparsity_switch() -> bool:
    """Is block sparsity on (``FA4_INDUCTOR_BLOCK_SPARSITY`` not "0")? Read per call: a process may flip it."""
    return config.BLOCK_SPARSITY.on()


def describe(params: dict) -> list[str]:
    """Short words for the masking in ``params``, for logs."""
    words = ["causal"] if params["causal"] else []
    if params["window_left"] >= 0 or params["window_right"] >= 0:
        words.append(f"window=({params['window_left']}, {params['window_right']})")
    if params.get("key_padding") is not None:
        words.append("key padding")
    if params.get("segment_ids") is not None:
        words.append("documents")
    return words
