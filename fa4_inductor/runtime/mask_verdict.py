"""Masks given as data, read at run time: is this tensor's mask one FA4 expresses, and with which parameters?

A mask the compiled code did not build (a buffer, a mask made in an earlier graph, a tensor the caller passes)
has values compile time cannot know. At run time they are known: :func:`verdict` reads every element once and
says whether the mask is exactly ``band & key_padding`` — a band of diagonals ``d_min <= j - i <= d_max`` (full,
causal top-left or bottom-right, a sliding window) and-ed with keys kept per batch row — the same for every head,
and if so FA4's ``causal``/``window`` and ``key_padding`` for it. An additive mask whose kept entries hold other
values, its hidden entries such a band, is served too where those values are a bias FA4 adds: the same for every
query (a bias per key, per head: an ALiBi a model caches or builds outside the compiled graph), with no left window,
FA4's key-bias op reading them from the last query row, which sees every kept key; or a function of the head and
``j - i`` alone (a symmetric ALiBi), FA4's relative-bias op reading them from the first batch row's first column and
first row. Any other mask is not served, with the reason.

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
    """What FA4 makes of a mask given as data: ``served`` with these parameters (``padded``: the keys no query
    sees are FA4's key padding, :func:`key_padding`), or the ``reason`` it is not. Holds no tensor, so remembering
    it keeps no memory alive (a CUDA-graph pool's included)."""

    served: bool
    reason: str | None = None
    causal: bool = False
    window_left: int = -1
    window_right: int = -1
    padded: bool = False
    # "key": the kept entries' values are a bias per key (:func:`key_bias_table`); "relative": a bias of the head and
    # the key's offset from the query (:func:`relative_bias_table`)
    bias: str | None = None


def kept_keys(mask: torch.Tensor, hides_where_true: bool) -> tuple[torch.Tensor | None, str | None]:
    """The kept keys of a bool mask (True keeps, or hides with ``hides_where_true``) or an additive one (every entry
    not -inf or finfo.min)."""
    if mask.dtype == torch.bool:
        return (~mask if hides_where_true else mask), None
    if not mask.is_floating_point():
        return None, f"a {mask.dtype} mask"
    if hides_where_true:
        return None, "a float mask used as a condition"
    return ~_hidden(mask), None


def _hidden(mask: torch.Tensor) -> torch.Tensor:
    """The entries of an additive mask that hide their key: -inf, or the dtype's lowest number (``finfo.min``, as
    Hugging Face fills), whose weight exp(min + score - max) is exactly 0 in float32 beside any finite score."""
    return (mask == float("-inf")) | (mask == torch.finfo(mask.dtype).min)


def _rows(keep: torch.Tensor, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """A kept-keys mask as (B or 1, H or 1, S_q, S_kv), broadcast axes expanded only along the queries and keys."""
    keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    return keep.expand(keep.shape[0], keep.shape[1], seqlen_q, seqlen_k)


def key_bias_table(mask: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """The (B, H, S_kv) float32 bias per key of a mask served with ``key_bias``: its last query row, hidden keys 0
    (FA4's key padding hides them)."""
    last = _rows(mask, seqlen_q, seqlen_k)[:, :, -1]
    last = torch.where(_hidden(last), 0.0, last.float())
    return last.expand(batch, heads, seqlen_k).contiguous()


def relative_bias_table(mask: torch.Tensor, heads: int, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """The (H, S_q + S_kv - 1) float32 table of a mask served with a relative bias, entry ``j - i + S_q - 1``: its
    first batch row's first column and first row, hidden offsets 0 (no query sees them)."""
    table = _offset_table(_rows(mask, seqlen_q, seqlen_k)[0])
    return torch.where(_hidden(table), 0.0, table.float()).expand(heads, -1).contiguous()


def _offset_table(values: torch.Tensor) -> torch.Tensor:
    """(H, S_q, S_kv) values read once per offset ``j - i`` (entry ``j - i + S_q - 1``): the first column's, then
    the first row's."""
    return torch.cat([values[:, :, 0].flip(-1), values[:, 0, 1:]], dim=-1)


def _offsets(seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """The (S_q, S_kv) table entries ``j - i + S_q - 1``."""
    return torch.arange(seqlen_k, device=device)[None, :] - torch.arange(seqlen_q, device=device)[:, None] + seqlen_q - 1


def key_padding(mask: torch.Tensor, hides_where_true: bool, batch: int, seqlen_k: int) -> torch.Tensor:
    """The (B, S_kv) key padding of a served mask: the keys some query sees (one pass over the mask, no sync)."""
    keep, _ = kept_keys(mask, hides_where_true)
    keep = _rows(keep, keep.shape[-2] if keep.dim() >= 2 else 1, seqlen_k)[:, 0]
    return keep.any(dim=1).expand(batch, seqlen_k).contiguous()


def verdict(mask: torch.Tensor, hides_where_true: bool, batch: int, seqlen_q: int, seqlen_k: int) -> MaskVerdict:
    """Read ``mask`` (broadcastable to (B, H, S_q, S_kv)) and decide it exactly; one host sync.

    Every kept entry lies within the diagonals ``low <= j - i <= high`` (their extremes) and on a key some query
    sees (the key padding), so the mask is that band and-ed with that padding exactly when every query row keeps as
    many keys as the band and the padding leave it: counts per row, from prefix sums of the padding.
    """
    if mask.dim() > 4 or tuple(mask.shape[-2:]) not in ((seqlen_q, seqlen_k), (1, seqlen_k), (seqlen_q, 1), (1, 1)):
        return MaskVerdict(False, f"a mask of shape {tuple(mask.shape)} for {seqlen_q} queries and {seqlen_k} keys")
    keep, reason = kept_keys(mask, hides_where_true)
    if keep is None:
        return MaskVerdict(False, reason)
    device = mask.device
    not_a_mask = torch.zeros((), dtype=torch.bool, device=device)
    if mask.is_floating_point():
        not_a_mask = ~((mask == 0) | _hidden(mask)).all()
    keep = _rows(keep, seqlen_q, seqlen_k)
    if keep.shape[0] not in (1, batch):
        return MaskVerdict(False, f"a mask of {keep.shape[0]} batch rows for {batch}")
    heads_differ = (keep != keep[:, :1]).any() if keep.shape[1] > 1 else torch.zeros_like(not_a_mask)
    keep = keep[:, 0]  # (B or 1, S_q, S_kv)
    key_kept = keep.any(dim=1)
    row_kept = keep.any(dim=-1)
    as_bytes = keep.to(torch.uint8)
    first = as_bytes.argmax(dim=-1)
    last = (seqlen_k - 1) - as_bytes.flip(-1).argmax(dim=-1)
    query = torch.arange(seqlen_q, device=device)
    far = seqlen_q + seqlen_k
    low = torch.where(row_kept, first - query, far).amin()
    high = torch.where(row_kept, last - query, -far).amax()
    prefix = torch.nn.functional.pad(key_kept.long().cumsum(dim=-1), (1, 0))
    start, stop = (query + low).clamp(0, seqlen_k), (query + high + 1).clamp(0, seqlen_k)
    expected = torch.where(stop > start, prefix[:, stop] - prefix[:, start], 0)
    differs = (keep.sum(dim=-1) != expected).any()
    flags = torch.stack([not_a_mask.long(), heads_differ.long(), differs.long(), low, high]).tolist()
    not_a_mask, heads_differ, differs, low, high = flags
    if heads_differ:
        return MaskVerdict(False, "the mask differs between heads")
    if differs:
        return MaskVerdict(False, "not a band of diagonals and-ed with key padding")
    if low > high:  # no key kept anywhere: every row gives zeros, as a padding that hides every key
        return MaskVerdict(True, padded=True)
    decided = _band(low, high, seqlen_q, seqlen_k, padded=not bool(key_kept.all()))
    return _with_bias(decided, mask, seqlen_q, seqlen_k) if not_a_mask and decided.served else decided


def _with_bias(decided: MaskVerdict, mask: torch.Tensor, seqlen_q: int, seqlen_k: int) -> MaskVerdict:
    """``decided`` (the band of a float mask's hidden entries) for a mask whose kept entries hold values other than
    0: served with the bias they are, or not served; one more host sync."""
    values = _rows(mask, seqlen_q, seqlen_k)
    hidden = _hidden(values)
    rows_differ = ~(hidden | (values == values[:, :, -1:])).all()  # a bias per key: each entry its last row's
    # a bias of the head and j - i: each entry its offset's in the first batch row's first column and first row
    offsets_differ = ~(hidden | (values == _offset_table(values[0])[:, _offsets(seqlen_q, seqlen_k, mask.device)])).all()
    rows_differ, offsets_differ = torch.stack([rows_differ, offsets_differ]).tolist()
    # The last query row sees every kept key unless a window bounds the band on the left.
    if not rows_differ and decided.window_left < 0:
        return dataclasses.replace(decided, bias="key")
    if not offsets_differ:
        return dataclasses.replace(decided, bias="relative")
    return MaskVerdict(False, "values other than 0, -inf and finfo.min in an additive mask that are neither the same "
                              "for every query (with no window on the left) nor a function of the head and j - i")


def _band(low: int, high: int, seqlen_q: int, seqlen_k: int, padded: bool) -> MaskVerdict:
    """FA4's parameters for the kept diagonals ``low <= j - i <= high`` (FA4 aligns windows bottom-right)."""
    offset = seqlen_k - seqlen_q
    unbounded_left, unbounded_right = low <= -(seqlen_q - 1), high >= seqlen_k - 1
    left, right = offset - low, high - offset
    # A bound FA4 would need negative (the band wholly above or below its diagonal) has no window: -1 is FA4's
    # "unbounded", so a computed -1 must not pass as one.
    if (not unbounded_left and left < 0) or (not unbounded_right and right < 0):
        return MaskVerdict(False, f"a band j - i in [{low}, {high}] that FA4's windows can't express")
    left, right = -1 if unbounded_left else left, -1 if unbounded_right else right
    if right == 0 and left == -1:
        return MaskVerdict(True, causal=True, padded=padded)
    return MaskVerdict(True, window_left=left, window_right=right, padded=padded)


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
