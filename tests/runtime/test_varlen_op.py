"""The varlen fa4 ops on packed sequences: per-sequence numerics against SDPA in float64, forward and backward,
fake impls under dynamic token counts, compiled against eager, and bad input."""

import pytest
import torch

import fa4_inductor  # noqa: F401
from tests.compare import packed_attention_reference


def _packed(lengths_q, lengths_k=None, h=4, hkv=2, d=16, dtype=torch.float64, requires_grad=False):
    lengths_k = lengths_k or lengths_q
    q = torch.randn(sum(lengths_q), h, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(sum(lengths_k), hkv, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(sum(lengths_k), hkv, d, dtype=dtype, requires_grad=requires_grad)
    cu = [torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
          for lengths in (lengths_q, lengths_k)]
    return q, k, v, cu[0], cu[1]


CASES = [
    dict(), dict(causal=True), dict(window=(3, 0)), dict(window=(2, 2)), dict(softcap=2.0, causal=True),
    dict(lengths_k=[9, 2, 12], causal=True), dict(lengths_k=[5, 5, 5], window=(1, 1)), dict(used=[4, 1, 6]),
    dict(used=[4, 0, 6], causal=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_matches_sdpa_per_sequence_forward_and_backward(case):
    torch.manual_seed(0)
    case = dict(case)
    used = case.pop("used", None)
    q, k, v, cu_q, cu_k = _packed([5, 1, 7], case.pop("lengths_k", None), requires_grad=True)
    scale = 0.3
    seqused_k = torch.tensor(used, dtype=torch.int32) if used else None
    out, lse = torch.ops.fa4.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, 7, max(cu_k.diff().tolist()), scale,
                                                   case.get("causal", False), *case.get("window", (-1, -1)),
                                                   case.get("softcap", 0.0), seqused_k)
    assert out.shape == (13, 4, 16) and lse.shape == (4, 13) and lse.dtype == torch.float32
    expected = packed_attention_reference(q, k, v, cu_q.tolist(), cu_k.tolist(), scale=scale, used=used, **case)
    torch.testing.assert_close(out, expected)
    cotangent = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    expected_grads = torch.autograd.grad(expected, (q, k, v), cotangent)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_rows_of_no_sequence_are_zero_with_lse_minus_infinity():
    q, k, v, cu_q, cu_k = _packed([3, 2])
    cu_q = torch.tensor([0, 3, 4], dtype=torch.int32)  # the last query row belongs to no sequence
    out, lse = torch.ops.fa4.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, 3, 3, 0.25)
    assert out[4].abs().sum() == 0 and torch.isinf(lse[:, 4]).all()


def test_fake_impl_keeps_dynamic_token_counts():
    def f(q, k, v, cu_q, cu_k):
        return torch.ops.fa4.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, None, None, 0.25, True)[0]

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    for lengths in ([5, 3], [2, 9, 4]):
        inputs = _packed(lengths, dtype=torch.float32)
        torch.testing.assert_close(compiled(*inputs), f(*inputs))


def test_compiled_training_step_matches_eager():
    torch.manual_seed(1)

    def step(q, k, v, cu_q, cu_k):
        out, _ = torch.ops.fa4.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, 7, 7, 0.25, True, 3, 0)
        return (out * 2).sum(dim=-1)

    inputs = _packed([4, 7, 2], dtype=torch.float32, requires_grad=True)
    cotangent = torch.randn(13, 4)
    eager_out = step(*inputs)
    eager_grads = torch.autograd.grad(eager_out, inputs[:3], cotangent)
    compiled_out = torch.compile(step, fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled_out, inputs[:3], cotangent)
    torch.testing.assert_close(compiled_out, eager_out)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "q": a["q"][None]}, "must be 3-D"),
    (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, "1-D int32"),
    (lambda a: {**a, "cu_seqlens_k": a["cu_seqlens_k"][:-1]}, "cu_seqlens_q has 3 entries"),
    (lambda a: {**a, "k": a["k"][:, :1], "v": a["v"][:, :1].repeat(1, 3, 1)}, "k and v must match"),
    (lambda a: {**a, "seqused_k": torch.tensor([1], dtype=torch.int32)}, "seqused_k has 1 entries"),
])
def test_bad_input_is_named(change, message):
    q, k, v, cu_q, cu_k = _packed([3, 2])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=3,
                softmax_scale=0.25)
    with pytest.raises(ValueError, match=message):
        torch.ops.fa4.flash_attn_varlen_fwd(**change(args))


def test_matches_the_dense_op_on_equal_lengths():
    """Packed sequences of one length are a batch: the varlen op and the dense op agree."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 6, 4, 16) for _ in range(3))
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    dense, dense_lse = torch.ops.fa4.flash_attn_fwd(q, k, v, 0.25, True)
    packed, packed_lse = torch.ops.fa4.flash_attn_varlen_fwd(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                             cu, cu, 6, 6, 0.25, True)
    torch.testing.assert_close(packed.view(2, 6, 4, 16), dense)
    torch.testing.assert_close(packed_lse.view(4, 2, 6).transpose(0, 1), dense_lse)
