"""Calls masked by data, given their masking buffer, replayed by exact call with no per-call decisions.

A forward or backward masked by key padding or segment ids goes the full way
on the first call of its exact signature: FA4's masking keywords cut from
the masking buffer (:func:`.mask_routes.fa4_masking`), the exact signature over
every tensor, the launch sequence learned for it
(:meth:`.launch_plan.PlanCache.replay_or_learn`). Once that sequence is
known, the call's front key (the signature of what the caller passes:
q, k, v, the gradients' inputs, the masks' geometry, the buffer's size) is
bound to a :class:`BoundMaskedCall`: later calls cut the same views of
their own buffer and launch the sequence. That skips what a compiled step
would redo for every masked call: the masking keywords, the route
decisions, a signature over a dozen tensors (a forward on this project's
2-core CPU host with a stand-in kernel: 40 µs before, 29 µs bound, of
which 10 µs allocate out and lse and 6 µs replay the launch).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Hashable, Sequence

import torch

from fa4_inductor.runtime import launch_plan, mask_routes
from fa4_inductor._torch_private import empty_contiguous


def _mask_geometry(mask: torch.Tensor | None):
    return None if mask is None else (mask.shape, mask.dtype)


def forward_key(q, k, v, softmax_scale, causal, window_left, window_right, softcap, key_padding, segment_ids,
                buffer: torch.Tensor) -> Hashable:
    """The front key of a forward masked by data that gets its masking ``buffer`` and allocates its outputs."""
    return (launch_plan.call_signature(q, k, v, softmax_scale, causal, window_left, window_right, softcap, None),
            _mask_geometry(key_padding), _mask_geometry(segment_ids), buffer.shape, buffer.stride(), buffer.dtype,
            mask_routes.block_sparsity_switch())


def backward_key(tensors: Sequence[torch.Tensor], params: dict, buffer: torch.Tensor) -> Hashable:
    """The front key of a backward masked by data: the geometry of its tensors (dout, q, k, v, out, lse, dq, dk,
    dv), its options (``params``, in the adapter's order) and its masking ``buffer``'s size."""
    return (launch_plan.exact_signature(tensors, params), buffer.shape, buffer.stride(), buffer.dtype,
            mask_routes.block_sparsity_switch())


@dataclasses.dataclass(frozen=True)
class BoundMaskedCall:
    """A learned launch sequence and where its masking tensors lie in the call's buffer."""

    sequence: launch_plan.LaunchSequence
    views: tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...]  # (size, stride, offset in the buffer)

    def launch(self, call_tensors: Sequence[torch.Tensor | None], buffer: torch.Tensor) -> None:
        """Launch the sequence on the call's tensors followed by its buffer's views."""
        base = buffer.storage_offset()
        views = [buffer.as_strided(size, stride, base + offset) for size, stride, offset in self.views]
        self.sequence.launch((*call_tensors, *views), buffer.device)

    def forward(self, q, k, v, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A forward: new contiguous out (B,S,H,Dv) and lse (fp32 B,H,S), launched on; returns them."""
        batch, seqlen_q, heads = q.shape[:3]
        out_size, lse_size = (batch, seqlen_q, heads, v.shape[-1]), (batch, heads, seqlen_q)
        out = empty_contiguous(out_size, q.dtype, q.device)
        lse = empty_contiguous(lse_size, torch.float32, q.device)
        self.launch((q, k, v, out, lse, None), buffer)
        return out, lse


class BoundMaskedCalls:
    """Bound masked calls by front key; ``None`` marks a key whose launches can't be replayed."""

    def __init__(self, max_keys: int = 4096):
        self._bound: dict[Hashable, BoundMaskedCall | None] = {}
        self._max_keys = max_keys
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> BoundMaskedCall | None | bool:
        """The call bound to ``key``, None if not replayable, False if not bound yet."""
        return self._bound.get(key, False)

    def bind(self, key: Hashable, sequence, masking_tensors: Sequence[torch.Tensor], buffer: torch.Tensor) -> None:
        """Bind ``key`` to the ``sequence`` learned for a call (None: not replayable; False or UNDECIDED: not
        learned yet, leave unbound) whose masking tensors are views of ``buffer``."""
        if sequence is False or sequence is launch_plan.UNDECIDED:
            return
        bound = None
        if sequence is not None and all(_shares_storage(t, buffer) for t in masking_tensors):
            base = buffer.storage_offset()
            bound = BoundMaskedCall(sequence, tuple((tuple(t.shape), t.stride(), t.storage_offset() - base)
                                                    for t in masking_tensors))
        with self._lock:
            if len(self._bound) >= self._max_keys:
                self._bound.clear()  # bounded under endlessly varying shapes
            self._bound[key] = bound

    def clear(self) -> None:
        """Forget every bound call."""
        with self._lock:
            self._bound.clear()

    def __len__(self) -> int:
        return len(self._bound)


def _shares_storage(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() and view.dtype == buffer.dtype
