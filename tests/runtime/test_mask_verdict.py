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


def _fa4_mask(v: mask_verdict.MaskVerdict, sq, sk):
    return visible_keys(B, sq, sk, causal=v.causal, window_left=v.window_left, window_right=v.window_right,
                        seqused_k=None, device=torch.device("cpu"), key_padding=v.key_padding)


@pytest.mark.parametrize("sq, sk", [(SQ, SK), (SK, SK), (SQ, SQ)])
@pytest.mark.parametrize("band", list(_bands(SQ, SK)))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("form", ["bool", "additive", "hides"])
def test_every_band_with_padding_is_decided_exactly(sq, sk, band, padded, form):
    keep = _bands(sq, sk)[band][None, None].expand(B, 1, sq, sk)
    if padded:
        padding = torch.ones(B, sk, dtype=torch.bool)
        padding[1, : sk // 4] = False
        keep = keep & padding[:, None, None, :]
    mask = {"bool": keep, "hides": ~keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, float("-inf")).to(torch.bfloat16)}[form]
    v = mask_verdict.verdict(mask, form == "hides", B, sq, sk)
    if sq != sk and band in ("causal_top_left", "two_sided", "shifted"):  # FA4 aligns its bands bottom-right
        assert not v.served and "windows can't express" in v.reason, v
        return
    assert v.served, v.reason
    assert torch.equal(_fa4_mask(v, sq, sk).expand(B, 1, sq, sk), keep), v


@pytest.mark.parametrize("name", ["random", "per_head", "finite_fill", "bias", "strict_causal", "int"])
def test_other_masks_are_refused_with_a_reason(name):
    i, j = _i_j()
    mask = {"random": torch.rand(SQ, SK) > 0.5,
            "per_head": torch.stack([j <= i, j <= i + 1])[None],
            "finite_fill": torch.zeros(SQ, SK).masked_fill(j > i, -1e4),
            "bias": (j - i).float() * 0.1,
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
