"""Near misses: programs shaped like the attention the patterns accept, one change away in meaning.

Each :class:`NearMiss` starts from a construct the rewrite takes (SDPA with an additive or a boolean mask, key
padding, BERT's extended mask, hand-written attention with ``masked_fill`` or an added mask, the scale written as a
division) and applies one mutation that keeps the program's shape and changes what it computes: an axis of the
mask (or of the padding input) sliced to one entry and broadcast, a comparison flipped or its bound moved by one, a
mask's dtype converted (a 0/-inf mask to bool, a boolean to 0/1 floats), a different fill, the padding applied
along the query axis instead of the keys, a division's ``rounding_mode``, an ``alpha`` in index arithmetic, a padding
input with one row broadcast over the batch. "none" is the construct itself. Every mutant keeps a visible key in
every query row (the diagonal or key 0), so its eager softmax stays finite.
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn.functional as F

CONSTRUCTS = ("sdpa_additive", "sdpa_bool", "sdpa_padding", "bert_extended", "masked_fill", "added_mask",
              "divided_scale")
MUTATIONS = ("none", "slice_row", "slice_column", "slice_leading", "flip_comparison", "bound_plus_one",
             "additive_to_bool", "bool_to_float", "bool_to_long_to_bool", "fill", "padding_on_queries",
             "rounding_mode", "alpha", "broadcast_padding")
FILLS = (-math.inf, "finfo.min", -1e4, 0.0, 1.0)
B, H, S, D = 2, 2, 12, 16


@dataclasses.dataclass(frozen=True)
class NearMiss:
    """One construct with one mutation and the random choices the mutation needs."""

    construct: str
    mutation: str
    seed: int
    fill: object = -math.inf
    rounding_mode: str | None = None
    dynamic: bool = False

    def inputs(self) -> tuple[list[torch.Tensor], tuple]:
        """(q, k, v bf16 leaves, (padding,)): padding is a 0/1 long (B, S) tensor (one row if the mutation
        broadcasts it), key 0 always visible."""
        generator = torch.Generator().manual_seed(self.seed)
        leaves = [torch.randn(B, H, S, D, generator=generator).to(torch.bfloat16).requires_grad_(True)
                  for _ in range(3)]
        rows = 1 if self.mutation == "broadcast_padding" else B
        lengths = torch.randint(1, S + 1, (rows,), generator=generator)
        lengths[0] = S - 3
        padding = (torch.arange(S)[None, :] < lengths[:, None]).long()
        return leaves, (padding,)

    def function(self):
        """The program ``fn(q, k, v, padding) -> (B, H, S, D)``."""
        return lambda q, k, v, padding: _program(self, q, k, v, padding)


def _band(miss: NearMiss, q) -> torch.Tensor:
    """The boolean band (True = visible), mutated."""
    s = q.shape[2]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    if miss.mutation == "flip_comparison":
        return j >= i  # anti-causal: the diagonal stays
    if miss.mutation == "bound_plus_one":
        return j <= i + 1
    if miss.mutation == "alpha":
        return torch.sub(j, i, alpha=2) <= 0  # j <= 2 i: row 0 keeps key 0
    keep = j <= i
    if miss.mutation == "slice_row":
        return keep[:1]  # (1, S): every row reads row 0's keys (key 0 only)
    if miss.mutation == "slice_column":
        return keep[:, :1]  # (S, 1): every row keeps every key (key 0 is visible to all)
    if miss.mutation == "slice_leading":
        return keep[None, None].expand(B, H, s, s)[:1, :1]
    if miss.mutation == "bool_to_long_to_bool":
        return keep.long().bool()
    return keep


def _padding_mask(miss: NearMiss, padding) -> torch.Tensor:
    """The (B or 1, 1, 1, S) boolean key-padding mask, mutated (on the query axis: (B, 1, S, 1), where the diagonal is
    added back so every row keeps a key)."""
    pad = padding.bool()
    if miss.mutation == "slice_row":
        pad = pad[:1]
    if miss.mutation == "padding_on_queries":
        s = padding.shape[1]
        return pad[:, None, :, None] | torch.eye(s, dtype=torch.bool)
    return pad[:, None, None, :]


def _fill(miss: NearMiss, dtype) -> float:
    fill = miss.fill if miss.mutation == "fill" else -math.inf
    return torch.finfo(dtype).min if fill == "finfo.min" else fill


def _additive(miss: NearMiss, keep, dtype):
    mask = torch.where(keep, 0.0, _fill(miss, dtype)).to(dtype)
    if miss.mutation == "additive_to_bool":
        return mask.bool()  # True where hidden: the polarity of a boolean mask
    return mask


def _boolean(miss: NearMiss, keep, dtype):
    if miss.mutation == "bool_to_float":
        return keep.to(dtype)  # 0/1 floats: a bias of 1 on the visible keys, not a mask
    return keep


def _scores(miss: NearMiss, q, k):
    scores = q @ k.transpose(-2, -1)
    if miss.mutation == "rounding_mode":
        return torch.div(scores, math.sqrt(q.shape[-1]), rounding_mode=miss.rounding_mode)
    return scores / math.sqrt(q.shape[-1])


def _program(miss: NearMiss, q, k, v, padding):
    construct, dtype = miss.construct, q.dtype
    if construct in ("sdpa_padding", "bert_extended"):
        pad = _padding_mask(miss, padding)
        if construct == "bert_extended":
            extended = (1.0 - pad.to(dtype)) * torch.finfo(dtype).min
            if miss.mutation == "fill":
                extended = (1.0 - pad.to(dtype)) * _fill(miss, dtype) if _fill(miss, dtype) != -math.inf \
                    else torch.where(pad, 0.0, -math.inf).to(dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=_additive(miss, extended == 0, dtype)
                                                  if miss.mutation == "additive_to_bool" else extended)
        keep = pad & _band(miss, q)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_boolean(miss, keep, dtype))
    keep = _band(miss, q)
    if construct == "sdpa_additive":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_additive(miss, keep, dtype))
    if construct == "sdpa_bool":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_boolean(miss, keep, dtype))
    scores = _scores(miss, q, k)
    if construct == "masked_fill":
        hidden = ~keep if miss.mutation != "additive_to_bool" else _additive(miss, keep, dtype)
        scores = scores.masked_fill(hidden, _fill(miss, dtype))
    elif construct == "added_mask":
        mask = _additive(miss, keep, dtype)
        scores = scores + (mask if mask.is_floating_point() else mask.to(dtype))
    return scores.softmax(dim=-1) @ v


def near_misses(count: int, seed: int = 0) -> list[NearMiss]:
    """``count`` seeded near misses: every (construct, mutation) pair once in turn, then random ones, with the
    mutation's choices (fill, rounding mode) and static or dynamic shapes drawn."""
    rng = random.Random(seed)
    pairs = [(c, m) for m in MUTATIONS for c in CONSTRUCTS]
    rng.shuffle(pairs)
    chosen = [pairs[n % len(pairs)] if n < len(pairs) else (rng.choice(CONSTRUCTS), rng.choice(MUTATIONS))
              for n in range(count)]
    return [NearMiss(construct, mutation, seed=rng.randrange(2**31), fill=rng.choice(FILLS),
                     rounding_mode=rng.choice(("trunc", "floor")), dynamic=rng.random() < 0.25)
            for construct, mutation in chosen]
