"""Masks given as data, read at run time: is this tensor's mask one FA4 expresses, and with which parameters?

A mask the compiled code did not build (a buffer, a mask made in an earlier graph, a tensor the caller passes)
has values compile time cannot know. At run time they are known: :func:`verdict` reads every element once and
says whether the mask is exactly ``band & key_padding`` — a band of diagonals ``d_min <= j - i <= d_max`` (full,
causal top-left or bottom-right, a sliding window) and-ed with keys kept per batch row — the same for every head,
and if so FA4's ``causal``/``window`` and ``key_padding`` for it. Any other mask is not served, with the reason.

Reading the verdict costs one host sync. :class:`VerdictCache` remembers it per tensor and version counter, so a
mask shared by every layer of a step, or a buffer, is read once until it is written.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

import torch


@dataclasses.dataclass(frozen=True)
class MaskVerdict:
    """What FA4 makes of a mask given as data: ``served`` with these parameters, or the ``reason`` it is not."""

    served: bool
    reason: str | None = None
    causal: bool = False
    window_left: int = -1
    window_right: int = -1
    key_padding: torch.Tensor | None = None  # (B, S_kv) bool, None when every key is kept


def kept_keys(mask: torch.Tensor, hides_where_true: bool) -> tuple[torch.Tensor | None, str | None]:
    """The kept keys of a bool mask (True keeps, or hides with ``hides_where_true``) or a 0/-inf additive one."""
    if mask.dtype == torch.bool:
        return (~mask if hides_where_true else mask), None
    if not mask.is_floating_point():
        return None, f"a {mask.dtype} mask"
    if hides_where_true:
        return None, "a float mask used as a condition"
    return mask == 0, None


def verdict(mask: torch.Tensor, hides_where_true: bool, batch: int, seqlen_q: int, seqlen_k: int) -> MaskVerdict:
    """Read ``mask`` (broadcastable to (B, H, S_q, S_kv)) and decide it exactly; one host sync."""
    if mask.dim() > 4 or tuple(mask.shape[-2:]) not in ((seqlen_q, seqlen_k), (1, seqlen_k), (seqlen_q, 1), (1, 1)):
        return MaskVerdict(False, f"a mask of shape {tuple(mask.shape)} for {seqlen_q} queries and {seqlen_k} keys")
    keep, reason = kept_keys(mask, hides_where_true)
    if keep is None:
        return MaskVerdict(False, reason)
    not_a_mask = torch.zeros((), dtype=torch.bool, device=mask.device)
    if mask.is_floating_point():
        not_a_mask = ~((mask == 0) | (mask == float("-inf"))).all()
    keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    if keep.shape[0] not in (1, batch):
        return MaskVerdict(False, f"a mask of {keep.shape[0]} batch rows for {batch}")
    keep = keep.expand(keep.shape[0], keep.shape[1], seqlen_q, seqlen_k)
    heads_differ = (keep != keep[:, :1]).any() if keep.shape[1] > 1 else torch.zeros_like(not_a_mask)
    keep = keep[:, 0]  # (B or 1, S_q, S_kv)
    key_kept = keep.any(dim=1)  # a key no query sees is the same as a padded one
    diagonal = (torch.arange(seqlen_k, device=mask.device, dtype=torch.int32)[None, :]
                - torch.arange(seqlen_q, device=mask.device, dtype=torch.int32)[:, None])
    far = seqlen_q + seqlen_k
    low = torch.where(keep, diagonal, far).amin()
    high = torch.where(keep, diagonal, -far).amax()
    band = (diagonal >= low) & (diagonal <= high)
    differs = (keep != (band & key_kept[:, None, :])).any()
    flags = torch.stack([not_a_mask.long(), heads_differ.long(), differs.long(), low.long(), high.long()]).tolist()
    not_a_mask, heads_differ, differs, low, high = flags
    if not_a_mask:
        return MaskVerdict(False, "values other than 0 and -inf in an additive mask")
    if heads_differ:
        return MaskVerdict(False, "the mask differs between heads")
    if differs:
        return MaskVerdict(False, "not a band of diagonals and-ed with key padding")
    padding = None if bool(key_kept.all()) else key_kept.expand(batch, seqlen_k).contiguous()
    if low > high:  # no key kept anywhere: every row gives zeros, as a padding that hides every key
        return MaskVerdict(True, key_padding=torch.zeros(batch, seqlen_k, dtype=torch.bool, device=mask.device))
    return _band(low, high, seqlen_q, seqlen_k, padding)


def _band(low: int, high: int, seqlen_q: int, seqlen_k: int, padding) -> MaskVerdict:
    """FA4's parameters for the kept diagonals ``low <= j - i <= high`` (FA4 aligns windows bottom-right)."""
    offset = seqlen_k - seqlen_q
    left = -1 if low <= -(seqlen_q - 1) else offset - low
    right = -1 if high >= seqlen_k - 1 else high - offset
    if left < -1 or right < -1:
        return MaskVerdict(False, f"a band j - i in [{low}, {high}] that FA4's windows can't express")
    if right == 0 and left == -1:
        return MaskVerdict(True, causal=True, key_padding=padding)
    return MaskVerdict(True, window_left=left, window_right=right, key_padding=padding)


class TensorKeyed:
    """Values kept per live tensor (held weakly, by identity): a dead tensor's value goes with it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, tensor: torch.Tensor):
        """The value kept for ``tensor``, or None."""
        with self._lock:
            entry = self._values.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def put(self, tensor: torch.Tensor, value) -> None:
        """Keep ``value`` for ``tensor`` while it lives."""
        identity = id(tensor)

        def forget(ref: weakref.ref) -> None:
            with self._lock:
                if self._values.get(identity, (None,))[0] is ref:
                    del self._values[identity]

        with self._lock:
            self._values[identity] = (weakref.ref(tensor, forget), value)

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        """Forget every value."""
        with self._lock:
            self._values.clear()


class VerdictCache(TensorKeyed):
    """Verdicts remembered per mask tensor and its version counter, shape and strides: a tensor written in place
    since (its version moved) is read again."""

    def verdict(self, mask: torch.Tensor, hides_where_true: bool, batch: int, seqlen_q: int, seqlen_k: int
                ) -> tuple[MaskVerdict, bool]:
        """The verdict on ``mask`` and whether it was remembered (no host sync)."""
        key = (mask._version, tuple(mask.shape), mask.stride(), mask.storage_offset(), mask.data_ptr(),
               hides_where_true, batch, seqlen_q, seqlen_k)
        known = self.get(mask)
        if known is not None and known[0] == key:
            return known[1], True
        decided = verdict(mask, hides_where_true, batch, seqlen_q, seqlen_k)
        self.put(mask, (key, decided))
        return decided, False


CACHE = VerdictCache()
