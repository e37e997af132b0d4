"""The fa4 custom ops: schemas, fake impls, CPU reference numerics, gradients, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import fa4_inductor  # noqa: F401
from fa4_inductor.runtime import reference
from tests.compare import band, masked_scores


def _qkv(b=2, sq=7, sk=7, h=4, hkv=4, d=16, dtype=torch.float64):
    return (torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, sk, hkv, d, dtype=dtype),
            torch.randn(b, sk, hkv, d, dtype=dtype))


def _sdpa_reference(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0):
    """SDPA in fp64 with an explicit mask and softcap: the independent yardstick."""
    keep = band(q.shape[1], k.shape[1], causal=causal, window=window)
    s = masked_scores(q.transpose(1, 2), k.transpose(1, 2), scale=scale, keep=keep, softcap=softcap)
    vh = v.transpose(1, 2).repeat_interleave(q.shape[2] // k.shape[2], 1)
    return (torch.softmax(s, -1) @ vh).transpose(1, 2), torch.logsumexp(s, -1)


def test_schemas():
    fwd = str(torch.ops.fa4.flash_attn_fwd.default._schema)
    bwd = str(torch.ops.fa4.flash_attn_bwd.default._schema)
    assert fwd.startswith("fa4::flash_attn_fwd(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal=False")
    assert "-> (Tensor, Tensor)" in fwd
    assert bwd.startswith("fa4::flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse")
    assert "-> (Tensor, Tensor, Tensor)" in bwd


CASES = [
    dict(), dict(causal=True), dict(hkv=2), dict(hkv=1, causal=True), dict(window=(3, 1)),
    dict(window=(2, 0)), dict(softcap=2.0), dict(softcap=3.0, causal=True, hkv=2),
    dict(sq=3, sk=9, causal=True), dict(sq=5, sk=8, window=(2, 2)), dict(d=32, hkv=2, window=(4, -1)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_sdpa_fp64(case):
    torch.manual_seed(0)
    shape = {k: case[k] for k in ("sq", "sk", "hkv", "d") if k in case}
    q, k, v = _qkv(**shape)
    scale = 1 / math.sqrt(q.shape[-1])
    window = case.get("window", (-1, -1))
    out, lse = torch.ops.fa4.flash_attn_fwd(q, k, v, scale, case.get("causal", False), window[0], window[1],
                                           case.get("softcap", 0.0))
    ref, ref_lse = _sdpa_reference(q, k, v, scale=scale, causal=case.get("causal", False), window=window,
                                   softcap=case.get("softcap", 0.0))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse.float())
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])


def test_reference_matches_torch_sdpa():
    q, k, v = _qkv(hkv=2)
    out, _ = torch.ops.fa4.flash_attn_fwd(q, k, v, 0.25, True)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("case", [dict(), dict(causal=True, hkv=2), dict(window=(2, 1), softcap=2.0),
                                  dict(sq=3, sk=6, causal=True, hkv=1)], ids=str)
def test_gradcheck(case):
    shape = {k: case[k] for k in ("sq", "sk", "hkv") if k in case}
    q, k, v = (t.requires_grad_() for t in _qkv(d=8, **shape))
    window = case.get("window", (-1, -1))

    def fn(q, k, v):
        return torch.ops.fa4.flash_attn_fwd(q, k, v, 0.4, case.get("causal", False), window[0], window[1],
                                            case.get("softcap", 0.0))[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v = _qkv(sq=6, sk=3)
    out, lse = torch.ops.fa4.flash_attn_fwd(q, k, v, 0.3, True)  # bottom-right: first 3 rows see no key
    assert torch.all(out[:, :3] == 0) and torch.all(lse[:, :, :3] == float("-inf"))
    assert torch.isfinite(out).all()


def test_seqused_k_ignores_padded_keys():
    q, k, v = _qkv(sk=7)
    used = torch.tensor([4, 7], dtype=torch.int32)
    out, _ = torch.ops.fa4.flash_attn_fwd(q, k, v, 0.3, False, seqused_k=used)
    short, _ = torch.ops.fa4.flash_attn_fwd(q[:1], k[:1, :4], v[:1, :4], 0.3, False)
    torch.testing.assert_close(out[:1], short)


def test_zero_length_keys():
    q, k, v = _qkv(sk=0)
    out, lse = torch.ops.fa4.flash_attn_fwd(q, k, v, 0.3, False)
    assert out.shape == q.shape and torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("dynamic", [False, True])
def test_fake_impl_shapes_and_strides(dynamic):
    mode = FakeTensorMode(shape_env=ShapeEnv())
    context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if dynamic else DimDynamic.STATIC] * 4)
    # B,H,S,D tensors viewed as B,S,H,D, as a model's transposed projections are.
    real = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(sq=9, sk=9, h=8, hkv=2, d=64, dtype=torch.bfloat16)]
    q, k, v = (mode.from_tensor(t, symbolic_context=context) for t in real)
    with mode:
        out, lse = torch.ops.fa4.flash_attn_fwd(q, k, v, 0.125, True)
        dq, dk, dv = torch.ops.fa4.flash_attn_bwd(out, q, k, v, out, lse, 0.125, True)
    assert isinstance(q.shape[1], torch.SymInt) == dynamic
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], 64) and out.is_contiguous()
    assert out.dtype == torch.bfloat16
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.is_contiguous() and lse.dtype == torch.float32
    assert [t.shape for t in (dq, dk, dv)] == [q.shape, k.shape, v.shape]
    # Gradients in the inputs' (B,H,S,D) memory layout: nothing has to copy them back for the leaves.
    assert [t.stride() for t in (dq, dk, dv)] == [q.stride(), k.stride(), v.stride()]


@pytest.mark.parametrize("op", ["flash_attn_fwd", "flash_attn_fwd_kernel", "flash_attn_fwd_masked_kernel"])
def test_opcheck(op):
    q, k, v = (t.float() for t in _qkv(hkv=2))
    pad = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool)
    pad[1, 4:] = False
    buffer = torch.ops.fa4.masking_buffer(pad, None, q.shape[1], q.shape[-1], v.shape[-1], True)
    for key_padding in (None, pad) if op != "flash_attn_fwd_masked_kernel" else (pad,):
        args = (q, k, v, 0.3, True, -1, -1, 0.0, None, key_padding)
        torch.library.opcheck(getattr(torch.ops.fa4, op), args + ((None, buffer) if key_padding is not None
                                                                   and op == "flash_attn_fwd_masked_kernel" else ()))
    torch.library.opcheck(torch.ops.fa4.masking_buffer, (pad, None, q.shape[1], q.shape[-1], v.shape[-1], True))


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_matches_sdpa_with_a_boolean_mask(causal):
    q, k, v = (t.requires_grad_() for t in _qkv(hkv=2, sq=6, sk=9))
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, 7:] = False  # right padding
    pad[1, :3] = False  # left padding
    out, _ = torch.ops.fa4.flash_attn_fwd(q, k, v, 0.25, causal, key_padding=pad)
    mask = pad[:, None, None, :] & (torch.ones(6, 9, dtype=torch.bool).tril(3) if causal else True)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=True, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_fully_padded_row_gives_zeros_not_nan():
    q, k, v = _qkv()
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1] = False
    out, lse = torch.ops.fa4.flash_attn_fwd(q, k, v, 0.25, False, key_padding=pad)
    assert not out[1].any() and torch.isneginf(lse[1]).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("bad, message", [
    (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: (q, k.float(), v), "k dtype"),
    (lambda q, k, v: (q, k[..., :8], v), "head dim"),
    (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), "head counts"),
])
def test_bad_input_raises_value_error_naming_argument(bad, message):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        torch.ops.fa4.flash_attn_fwd(*bad(q, k, v), 0.3, False)


@pytest.mark.parametrize("key_padding", [torch.ones(2, 7), torch.ones(2, 6, dtype=torch.bool),
                                         torch.ones(7, dtype=torch.bool)], ids=["float", "short", "1-D"])
def test_bad_key_padding_raises_value_error(key_padding):
    with pytest.raises(ValueError, match="key_padding must be a bool"):
        torch.ops.fa4.flash_attn_fwd(*_qkv(), 0.3, False, key_padding=key_padding)


@pytest.mark.parametrize("extra, message", [
    (dict(segment_ids=torch.zeros(2, 7)), "segment_ids must be an integer"),
    (dict(segment_ids=torch.zeros(2, 6, dtype=torch.long)), "segment_ids must be an integer"),
    (dict(segment_ids=torch.zeros(2, 7, dtype=torch.long), seqused_k=torch.full((2,), 7, dtype=torch.int32)),
     "seqused_k can't be combined"),
], ids=["float", "short", "with_seqused_k"])
def test_bad_segment_ids_raise_value_error(extra, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.fa4.flash_attn_fwd(*_qkv(), 0.3, False, **extra)


def test_segment_ids_match_sdpa_with_a_document_mask():
    q, k, v = (t.requires_grad_() for t in _qkv(sq=9, sk=9))
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
    mask = seg[:, None, :, None] == seg[:, None, None, :]
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, scale=0.3)
    got, _ = torch.ops.fa4.flash_attn_fwd(q, k, v, 0.3, False, segment_ids=seg)
    torch.testing.assert_close(got, want.transpose(1, 2))
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.transpose(1, 2).square().sum(), (q, k, v))
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_reference_is_documented_as_reference():
    assert "reference" in reference.__doc__.lower() and "never chosen for speed" in reference.__doc__
