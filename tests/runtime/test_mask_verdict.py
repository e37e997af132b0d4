"""Masks given as data, decided at run time: every mask FA4 expresses is found with its parameters (checked by
building FA4's own mask from them), every other one is refused with a reason; verdicts are remembered per tensor
version."""

import pytest
import torch

from fa4_inductor.runtime import mask_verdict
from fa4_inductor.runtime.reference import visible_keys

B, SQ, SK = 2, 24, 40


def _i_j(sq=SQ, sk=SK):
    return torch.arange(sq)[:, None], torch.arange(sk)[None, :]


def _padding():
    keep = torch.ones(B, SK, dtype=torch.bool)
    keep[1, :7] = False
    return keep


def _bands(sq, sk):
    i, j = _i_j(sq, sk)
    return {"full": torch.ones(sq, sk, dtype=torch.bool), "causal_top_left": j <= i,
            "causal_bottom_right": j <= i + (sk - sq), "window": (j <= i + (sk - sq)) & (j >= i + (sk - sq) - 5),
            "two_sided": (j - i <= 3) & (j - i >= -4), "shifted": j <= i + 2}


def _fa4_mask(v: mask_verdict.MaskVerdict, mask, hides, sq, sk):
    padding = mask_verdict.key_padding(mask, hides, B, sk) if v.padded else None
    return visible_keys(B, sq, sk, causal=v.causal, window_left=v.window_left, window_right=v.window_right,
                        seqused_k=None, device=torch.device("cpu"), key_padding=padding)


@pytest.mark.parametrize("sq, sk", [(SQ, SK), (SK, SK), (SQ, SQ)])
@pytest.mark.parametrize("band", list(_bands(SQ, SK)))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("form", ["bool", "additive", "additive_min", "hides"])
def test_every_band_with_padding_is_decided_exactly(sq, sk, band, padded, form):
    keep = _bands(sq, sk)[band][None, None].expand(B, 1, sq, sk)
    if padded:
        padding = torch.ones(B, sk, dtype=torch.bool)
        padding[1, : sk // 4] = False
        keep = keep & padding[:, None, None, :]
    mask = {"bool": keep, "hides": ~keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, float("-inf")).to(torch.bfloat16),
            "additive_min": torch.zeros(keep.shape, dtype=torch.bfloat16).masked_fill(
                ~keep, torch.finfo(torch.bfloat16).min)}[form]
    v = mask_verdict.verdict(mask, form == "hides", B, sq, sk)
    if sq != sk and band in ("causal_top_left", "two_sided", "shifted"):  # FA4 aligns its bands bottom-right
        assert not v.served and "windows can't express" in v.reason, v
        return
    assert v.served, v.reason
    assert torch.equal(_fa4_mask(v, mask, form == "hides", sq, sk).expand(B, 1, sq, sk), keep), v


@pytest.mark.parametrize("name", ["random", "per_head", "finite_fill", "bias", "strict_causal", "int"])
def test_other_masks_are_refused_with_a_reason(name):
    i, j = _i_j()
    mask = {"random": torch.rand(SQ, SK) > 0.5,
            "per_head": torch.stack([j <= i, j <= i + 1])[None],
            "finite_fill": torch.zeros(SQ, SK).masked_fill(torch.rand(SQ, SK) > 0.5, -1e4),
            "bias": (j * i).float() * 0.1,
            "strict_causal": (j < i)[None, None].expand(B, 1, SQ, SK),
            "int": (j <= i).long()}[name]
    v = mask_verdict.verdict(mask, False, B, SQ, SK)
    assert not v.served and v.reason, v


def test_a_verdict_is_remembered_until_the_tensor_is_written():
    cache = mask_verdict.VerdictCache()
    i, j = _i_j()
    mask = (j <= i + (SK - SQ)).clone()
    first, remembered = cache.verdict(mask, False, B, SQ, SK)
    assert first.served and first.causal and not remembered
    assert cache.verdict(mask, False, B, SQ, SK) == (first, True)
    mask[0, -1] = True  # written in place: read again, now no band
    second, remembered = cache.verdict(mask, False, B, SQ, SK)
    assert not remembered and not second.served
    del mask
    assert len(cache) == 0  # a dead tensor's verdict goes with it


def test_a_served_verdict_is_exact_on_random_bands_and_their_perturbations():
    """Soundness over many masks: bands of random offsets with random padding are served, and whenever a verdict
    serves a mask (perturbed by one flipped entry or not), FA4's mask from its parameters equals it everywhere."""
    generator = torch.Generator().manual_seed(0)
    served = 0
    for trial in range(300):
        sq, sk = (int(x) for x in torch.randint(1, 12, (2,), generator=generator))
        sk = max(sk, sq)
        i, j = _i_j(sq, sk)
        low, high = sorted(int(x) for x in torch.randint(-sq, sk, (2,), generator=generator))
        padding = torch.rand(B, 1, 1, sk, generator=generator) > 0.3
        keep = ((j - i >= low) & (j - i <= high))[None, None] & padding
        if trial % 2:
            flat = keep.clone().reshape(-1)
            flat[int(torch.randint(0, flat.numel(), (1,), generator=generator))] ^= True
            keep = flat.reshape(keep.shape)
        v = mask_verdict.verdict(keep, False, B, sq, sk)
        if v.served:
            served += 1
            assert torch.equal(_fa4_mask(v, keep, False, sq, sk).expand(B, 1, sq, sk), keep.expand(B, 1, sq, sk)), \
                (trial, v)
    assert served >= 60  # many random bands sit off FA4's bottom-right diagonal, which no window expresses


def _key_bias_mask(keep: torch.Tensor, heads: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A float mask holding a bias per batch row, head and key where ``keep`` (B or 1, 1, S_q, S_kv) keeps, -inf
    elsewhere; and that bias (B, H, S_kv)."""
    bias = torch.randn(B, heads, keep.shape[-1], generator=torch.Generator().manual_seed(1))
    return torch.where(keep, bias[:, :, None, :], float("-inf")), bias


@pytest.mark.parametrize("band", ["full", "causal_bottom_right"])
@pytest.mark.parametrize("padded", [False, True])
def test_a_bias_per_key_under_a_band_is_served_with_its_values(band, padded):
    """An additive mask whose kept entries hold a bias per key (per head: an ALiBi given as data) is FA4's mask from
    the verdict's parameters, with the bias read from its last row wherever a key is kept."""
    keep = _bands(SQ, SK)[band][None, None] & (_padding()[:, None, None, :] if padded else True)
    mask, bias = _key_bias_mask(keep)
    v = mask_verdict.verdict(mask, False, B, SQ, SK)
    assert v.served and v.bias == "key" and v.padded == padded, v
    assert torch.equal(_fa4_mask(v, mask, False, SQ, SK).expand(B, 1, SQ, SK), keep.expand(B, 1, SQ, SK))
    table = mask_verdict.key_bias_table(mask, B, 3, SQ, SK)
    seen = keep.any(dim=2).expand(B, 3, SK)
    assert torch.equal(table[seen], bias[seen])


@pytest.mark.parametrize("name", ["differs_per_query", "left_window", "finite_fill"])
def test_a_bias_that_is_not_one_per_key_or_beside_a_left_window_is_refused(name):
    i, j = _i_j()
    keep = _bands(SQ, SK)["window" if name == "left_window" else "causal_bottom_right"][None, None]
    mask, _ = _key_bias_mask(keep)
    if name == "differs_per_query":
        mask = mask + 0.01 * i
    if name == "finite_fill":
        mask = torch.where(keep, mask, -1e4)
    v = mask_verdict.verdict(mask, False, B, SQ, SK)
    assert not v.served and v.reason, v


@pytest.mark.parametrize("name", ["offset_bias", "finite_causal_fill", "symmetric_alibi_causal"])
def test_a_bias_of_the_head_and_the_offset_is_served_with_its_values(name):
    """A mask shared by every batch row whose kept entries are a function of the head and j - i (a finite fill of
    the offset included: FA4 adds those very values) is served with FA4's relative-bias table."""
    i, j = _i_j()
    slopes = torch.tensor([0.5, 0.25, 0.125]).view(3, 1, 1)
    mask = {"offset_bias": (j - i).float() * 0.1 + slopes,
            "finite_causal_fill": torch.zeros(SQ, SK).masked_fill(j > i + (SK - SQ), -1e4),
            "symmetric_alibi_causal": torch.where(j <= i + (SK - SQ), -slopes * (j - i).abs(), float("-inf"))}[name]
    v = mask_verdict.verdict(mask, False, B, SQ, SK)
    assert v.served and v.bias == "relative" and v.causal == (name == "symmetric_alibi_causal"), v
    heads = mask.shape[0] if mask.dim() == 3 else 1
    table = mask_verdict.relative_bias_table(mask, heads, SQ, SK)
    kept = ~torch.isinf(mask.expand(heads, SQ, SK))
    rebuilt = table[:, j - i + SQ - 1]
    assert torch.equal(rebuilt[kept], mask.expand(heads, SQ, SK)[kept])
