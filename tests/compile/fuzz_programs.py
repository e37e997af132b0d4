"""Random attention programs for the differential fuzz: spellings x masks x GQA x layouts x shapes.

Each :class:`Program` is a seeded choice of how model code writes attention (SDPA, ``repeat_kv`` + SDPA,
matmul/einsum with the scale in several places, casts around the softmax, ``masked_fill``), which mask it
builds in the graph (none, causal, a window, ``.abs()`` windows, ``tril``, key padding, BERT's extended mask,
documents, and constructs FA4 cannot express: a learned bias, query padding, or-ed masks), GQA, the operands'
layout and dynamic shapes, and whether the mask and scores are built with in-place ops (``&=``, timm's
``bias.masked_fill_``, ``scores += mask``; or a write of the scores the softmax then reads, which the rewrite
can't see and must leave alone); "flex" programs write the same masks as FlexAttention mask_mods, with a score_mod
(identity, a scale, a softcap; the learned bias goes there). ``expressible`` says whether FA4 can compute it; the fuzz checks the rewrite is
right on every program and counts how many expressible ones it rewrote. Every query row sees at least one
key, so eager softmax spellings stay finite.
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tests.compile.flex_reference import flex_reference

SPELLINGS = ("sdpa", "sdpa_repeat_kv", "matmul", "matmul_div", "einsum", "prescaled_q", "whisper", "llama_ref",
             "masked_fill", "head_scale")
BANDS = ("none", "causal", "window", "abs_window", "tril", "fixed_blocks")
EXTRAS = ("none", "padding", "bert_extended", "documents", "relative_bias", "query_padding", "or_mask", "data_mask")
UNEXPRESSIBLE = ("relative_bias", "query_padding", "or_mask")
# How the mask and scores are built: out of place, in place where the rewrite applies the writes, or with the scores
# written in place after the softmax's input was made (only the matmul spellings; the site must stay as it is).
BUILDERS = ("functional", "inplace", "late_write")
# Head dims up to 128 whose gradients FA4 4.0.0b36 gets wrong on sm90 (flash-attention PR #2896); the CPU reference
# is exact.
SM90_WRONG_BACKWARD_HEAD_DIMS = (8, 16, 40, 48, 72, 80, 104, 112)


@dataclasses.dataclass(frozen=True)
class Program:
    """One random attention program and how to build its inputs."""

    spelling: str
    band: str
    extra: str
    batch: int
    heads: int
    heads_kv: int
    seqlen: int
    head_dim: int
    layout: str  # "bhsd": (B, H, S, D) leaves; "bshd": (B, S, H, D) leaves transposed in the program
    dynamic: bool
    seed: int
    score: str = "identity"  # the score_mod of a "flex" program: one of SCORE_MODS
    builder: str = "functional"  # one of BUILDERS
    cached: int = 0  # keys before the queries' own (a cache): S_kv = seqlen + cached, bands bottom-right aligned

    @property
    def expressible(self) -> bool:
        """Can the rewrite compute this program on FA4 (a late write of the scores: no, by design; fixed blocks
        and-ed with documents: two partitions, which the rewrite does not merge)?"""
        return self.extra not in UNEXPRESSIBLE and not self.late_write and not (
            self.band == "fixed_blocks" and self.extra == "documents")

    @property
    def late_write(self) -> bool:
        """Does the program write its scores in place after the softmax's input was made (a boolean mask to apply,
        a matmul spelling)?"""
        has_keep = self.band != "none" or self.extra not in ("none", "relative_bias")
        return (self.builder == "late_write" and self.spelling not in ("sdpa", "sdpa_repeat_kv", "flex") and has_keep
                and self.extra != "bert_extended")

    def expressible_on_sm90(self) -> bool:
        """Can FA4 compute this program, gradients included, on an sm90 GPU?"""
        return self.expressible and self.head_dim not in SM90_WRONG_BACKWARD_HEAD_DIMS

    def inputs(self, device="cpu") -> tuple[list[torch.Tensor], tuple]:
        """(q, k, v leaves, extra program inputs)."""
        generator = torch.Generator().manual_seed(self.seed)
        b, h, hkv, s, d = self.batch, self.heads, self.heads_kv, self.seqlen, self.head_dim

        def leaf(heads, length=s):
            shape = (b, heads, length, d) if self.layout == "bhsd" else (b, length, heads, d)
            return torch.randn(shape, generator=generator).to(device, torch.bfloat16).requires_grad_(True)
        kv = s + self.cached
        lengths = torch.randint(1, kv + 1, (b,), generator=generator)
        padding = (torch.arange(kv)[None, :] < lengths[:, None]).long()  # right padding, 0/1 as tokenizers give
        cuts = torch.sort(torch.randint(1, s, (b, 2), generator=generator), dim=1).values
        segments = (torch.arange(s)[None, None, :] >= cuts[:, :, None]).sum(dim=1)
        bias = torch.randn(1, h, s, s, generator=generator).to(torch.bfloat16)
        if self.extra == "data_mask":  # the band and the padding as one dense bool tensor given to the program
            bias = _keep(self, torch.empty(b, 1, s, 1), padding, segments).expand(b, 1, s, s).contiguous()
        return [leaf(h), leaf(hkv, kv), leaf(hkv, kv)], tuple(t.to(device) for t in (padding, segments, bias))

    def function(self):
        """The program: ``fn(q, k, v, padding, segments, bias) -> (B, H, S, D)``."""
        # GQA group and head dim as plain Python constants: under dynamic=True Dynamo may make ints it reads symbolic.
        group, head_dim = self.heads // self.heads_kv, self.head_dim
        if self.spelling == "flex":
            return lambda q, k, v, padding, segments, bias: _flex_attention(self, q, k, v, padding, segments, bias)
        return lambda q, k, v, padding, segments, bias: _attention(self, group, head_dim, q, k, v, padding, segments,
                                                                   bias)

    def reference(self):
        """What the program computes, eagerly: the program itself, or FlexAttention's dense definition (it has no
        CPU backward)."""
        if self.spelling != "flex":
            return self.function()

        def dense(q, k, v, padding, segments, bias):
            q, k, v = _layout(self, q, k, v)
            mask_mod, score_mod = _flex_mods(self, padding, segments, bias)
            return flex_reference(q, k, v, score_mod, mask_mod)[0]
        return dense


def _keep(program: Program, q, padding, segments, kv_len=None) -> torch.Tensor | None:
    """The boolean mask the program builds (True = visible), broadcastable to (B, H, S, S_kv); None for none. Bands
    are aligned to the last key, as a cache's are: offset by ``S_kv - S``, read from the shapes (meta-llama's
    ``start_pos``)."""
    s = q.shape[2]
    kv_len = s if kv_len is None else kv_len
    offset = kv_len - s
    i = torch.arange(s, device=q.device)[:, None]
    j = torch.arange(kv_len, device=q.device)[None, :]
    keep = None
    if program.band == "causal":
        keep = j <= i + offset
    elif program.band == "window":
        keep = (j <= i + offset) & (j > i + offset - 5)
    elif program.band == "abs_window":
        keep = (i + offset - j).abs() <= 3
    elif program.band == "tril":
        keep = torch.ones(s, kv_len, dtype=torch.bool, device=q.device).tril(offset)
    elif program.band == "fixed_blocks":  # truncation: Inductor's CPU code for arange(n) // c is wrong past a vector
        keep = torch.div(i, 6, rounding_mode="trunc") == torch.div(j, 6, rounding_mode="trunc")
    b = torch.arange(q.shape[0], device=q.device)[:, None, None, None]
    extra = None
    if program.extra in ("padding", "bert_extended", "data_mask"):
        extra = padding.bool()[b, j]
    elif program.extra == "documents":
        extra = segments[b, i] == segments[b, j]
    elif program.extra == "query_padding":
        extra = padding.bool()[b, i] | (j == i)
    elif program.extra == "or_mask":
        extra = (j <= i - 2) | (j >= i)  # a hole below the diagonal: no band
    if extra is not None and keep is not None and program.builder != "functional":
        combined = torch.ones(q.shape[0], 1, s, kv_len, dtype=torch.bool, device=q.device)
        combined &= keep
        combined &= extra
        return combined
    if extra is not None:
        keep = extra if keep is None else keep & extra
    return keep


def _additive(program: Program, keep, q, padding, kv_len):
    """The mask as an additive float mask, in the spelling the program uses."""
    inplace = program.builder != "functional"
    if program.extra == "bert_extended":  # BERT: (1 - mask) * finfo.min for the padding, the band as -inf
        extended = 1.0 - padding[:, None, None, :].to(q.dtype)
        if inplace:
            extended.mul_(torch.finfo(q.dtype).min)
        else:
            extended = extended * torch.finfo(q.dtype).min
        band = _keep(dataclasses.replace(program, extra="none"), q, padding, None, kv_len)
        return extended if band is None else extended + torch.where(band, 0.0, float("-inf")).to(q.dtype)
    if keep is None:
        return None
    low = torch.finfo(q.dtype).min if program.seed % 2 else float("-inf")
    if inplace:  # timm's bias: zeros, then masked_fill_ where hidden
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~keep, low)
        return bias
    return torch.where(keep, 0.0, low).to(q.dtype)


def _layout(program: Program, q, k, v):
    return (q, k, v) if program.layout == "bhsd" else tuple(t.transpose(1, 2) for t in (q, k, v))


# score_mods of "flex" programs: FA4 takes the identity, a scale and a tanh softcap.
SCORE_MODS = {
    "identity": None,
    "scale": lambda score, b, h, q_idx, kv_idx: score * 0.7,
    "softcap": lambda score, b, h, q_idx, kv_idx: 5.0 * torch.tanh(score / 5.0),
}


def _flex_mods(program: Program, padding, segments, bias):
    """(mask_mod, score_mod) of a "flex" program: its band and extra written the way FlexAttention code does."""
    bands = {
        "none": None,
        "causal": lambda q_idx, kv_idx: q_idx >= kv_idx,
        "window": lambda q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < 5),
        "abs_window": lambda q_idx, kv_idx: (q_idx - kv_idx).abs() <= 3,
        "tril": lambda q_idx, kv_idx: kv_idx <= q_idx,
        "fixed_blocks": lambda q_idx, kv_idx: q_idx // 6 == kv_idx // 6,
    }
    lengths = padding.sum(-1)
    extras = {
        "none": None,
        "padding": lambda b, q_idx, kv_idx: padding[b, kv_idx] != 0,
        "bert_extended": lambda b, q_idx, kv_idx: kv_idx < lengths[b],  # padding given as lengths
        "documents": lambda b, q_idx, kv_idx: segments[b, q_idx] == segments[b, kv_idx],
        "relative_bias": None,  # in the score_mod below
        "query_padding": lambda b, q_idx, kv_idx: (padding[b, q_idx] != 0) | (q_idx == kv_idx),
        "or_mask": lambda b, q_idx, kv_idx: (kv_idx <= q_idx - 2) | (kv_idx >= q_idx),
    }
    band, extra = bands[program.band], extras[program.extra]
    mask_mod = None
    if band is not None or extra is not None:  # "is not None": torch 2.11's Dynamo can't take a function's truth
        bands, extras = [f for f in (band,) if f is not None], [f for f in (extra,) if f is not None]

        def mask_mod(b, h, q_idx, kv_idx):
            parts = [f(q_idx, kv_idx) for f in bands] + [f(b, q_idx, kv_idx) for f in extras]
            return parts[0] & parts[1] if len(parts) == 2 else parts[0]
    score_mod = SCORE_MODS[program.score]
    if program.extra == "relative_bias":
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]
    return mask_mod, score_mod


def _flex_attention(program: Program, q, k, v, padding, segments, bias):
    q, k, v = _layout(program, q, k, v)
    mask_mod, score_mod = _flex_mods(program, padding, segments, bias)
    block_mask = None if mask_mod is None else create_block_mask(
        mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def _attention(program: Program, group: int, d: int, q, k, v, padding, segments, bias):
    q, k, v = _layout(program, q, k, v)
    # A "data_mask" program reads its mask from an input (the same values it would build): decided at run time.
    keep = bias if program.extra == "data_mask" else _keep(program, q, padding, segments, k.shape[2])
    if program.spelling in ("sdpa", "sdpa_repeat_kv"):
        if program.spelling == "sdpa_repeat_kv" and group > 1:
            k, v = (t[:, :, None].expand(t.shape[0], t.shape[1], group, *t.shape[2:]).reshape(
                t.shape[0], t.shape[1] * group, *t.shape[2:]) for t in (k, v))
        mask = _additive(program, keep, q, padding, k.shape[2]) if program.extra in ("bert_extended", "relative_bias") \
            else keep
        if program.extra == "relative_bias":
            mask = bias if mask is None else mask + bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=program.spelling == "sdpa")
    if group > 1:
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    if program.spelling == "einsum":
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * d ** -0.5
    elif program.spelling == "prescaled_q":
        scores = (q * d ** -0.5) @ k.transpose(-2, -1)
    elif program.spelling == "whisper":
        scale = d ** -0.25
        scores = (q * scale) @ (k * scale).transpose(-1, -2)
    elif program.spelling == "matmul_div":
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d)
    elif program.spelling == "head_scale":  # a temperature per head, (H, 1, 1)
        heads = torch.arange(q.shape[1], device=q.device, dtype=torch.float32)
        scores = (q @ k.transpose(-2, -1)) * (d ** -0.5 * (1 + 0.1 * heads)).view(-1, 1, 1).to(q.dtype)
    else:
        scores = torch.matmul(q, k.transpose(-2, -1)) * d ** -0.5
    if program.late_write:
        scores.masked_fill_(~keep, float("-inf"))  # the softmax below reads scores: the write is no visible input
    elif program.spelling == "masked_fill" and keep is not None and program.extra != "bert_extended":
        scores = scores.masked_fill_(~keep, float("-inf")) if program.builder != "functional" \
            else scores.masked_fill(~keep, float("-inf"))
    else:
        mask = _additive(program, keep, q, padding, k.shape[2])
        if mask is not None and program.builder != "functional":
            scores += mask
        elif mask is not None:
            scores = scores + mask
    if program.extra == "relative_bias":
        scores = scores + bias
    if program.spelling in ("whisper", "llama_ref"):
        probs = F.softmax(scores.float(), dim=-1).type_as(q)
    else:
        probs = scores.softmax(dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v) if program.spelling == "einsum" else probs @ v
    return out


def random_programs(count: int, seed: int = 0, max_seqlen: int = 40, spellings=SPELLINGS,
                    head_dims=(8, 16)) -> list[Program]:
    """``count`` seeded random programs in the given spellings ("flex" for FlexAttention) and head dims."""
    rng = random.Random(seed)
    programs = []
    for index in range(count):
        heads = rng.choice((2, 4))
        band, extra = rng.choice(BANDS), rng.choice(EXTRAS)
        if extra in ("padding", "bert_extended", "data_mask") and band in ("window", "abs_window", "fixed_blocks"):
            band = "causal"  # a window or block past a row's last key would leave query rows with no key at all
        program = Program(
            spelling=rng.choice(spellings), band=band, extra=extra, batch=rng.choice((1, 2, 3)), heads=heads,
            heads_kv=rng.choice((heads, heads // 2)), seqlen=rng.randint(5, max_seqlen), head_dim=rng.choice(head_dims),
            layout=rng.choice(("bhsd", "bshd")), dynamic=rng.random() < 0.3, seed=seed * 100003 + index,
            builder=rng.choices(BUILDERS, weights=(6, 3, 1))[0])
        if program.spelling == "flex":  # a mask_mod reads its tensors by index: no dense mask given as data
            program = dataclasses.replace(program, score=rng.choice(list(SCORE_MODS)),
                                          extra="padding" if extra == "data_mask" else extra)
        elif program.extra in ("none", "padding", "bert_extended") and program.band != "fixed_blocks" \
                and rng.random() < 0.3:  # a chunk after cached keys
            program = dataclasses.replace(program, cached=rng.randint(1, 6))
        programs.append(program)
    return programs
