"""The position-bias fa4 ops: ALiBi (a linear bias per head), a relative-position table and a bias per key (FA4
score_mods on the GPU), forward and backward, against float64 attention with the bias written out; compiled against
eager; bad input."""

import math

import pytest
import torch

import fa4_inductor  # noqa: F401
from tests.compare import band


def _explicit(q, k, v, bias, scale, causal=False, window=(-1, -1), keep=True):
    """float64 SDPA of B,S,H,D tensors with ``bias`` (H, S_q, S_k) added to the scaled scores, keys kept where
    ``keep`` (B, 1, S_q, S_k) and the band allow."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    scores = qh @ kh.transpose(-1, -2) * scale + bias.to(q.dtype)
    keep = band(q.shape[1], k.shape[1], causal=causal, window=window) & keep
    scores = scores.masked_fill(~keep, float("-inf"))
    return (torch.softmax(scores, -1) @ vh).transpose(1, 2)


def _slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes (Press et al.), negative: far keys weigh less."""
    return -torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


def _alibi(sq: int, sk: int):
    """Slopes and the bias ``slopes[h] * j`` (a constant per row away from the op's)."""
    slopes = _slopes(4)
    return slopes, slopes[:, None, None] * torch.arange(sk, dtype=torch.float64).expand(sq, sk)


def _relative_table(sq: int, sk: int):
    """A random table and its bias, ``table[h, j - i + S_q - 1]`` written out entry by entry."""
    table = torch.randn(4, sq + sk - 1)
    bias = torch.tensor([[[table[h, j - i + sq - 1].item() for j in range(sk)] for i in range(sq)] for h in range(4)])
    return table, bias


def _key_table(sq: int, sk: int):
    """A random table per (batch row, head, key) and its bias, the same for every query."""
    table = torch.randn(2, 4, sk)
    return table, table[:, :, None, :].expand(2, 4, sq, sk)


OPS = {"alibi": (torch.ops.fa4.flash_attn_alibi_fwd, _alibi),
       "relative_bias": (torch.ops.fa4.flash_attn_relative_bias_fwd, _relative_table),
       "key_bias": (torch.ops.fa4.flash_attn_key_bias_fwd, _key_table)}


@pytest.mark.parametrize("case", [dict(causal=True), dict(), dict(window=(3, 0)), dict(causal=True, heads_kv=2),
                                  dict(causal=True, sq=4, sk=11), dict(window=(2, 2), heads_kv=1), dict(sq=11, sk=4)],
                         ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_ops_match_explicit_float64_forward_and_backward(name, case):
    torch.manual_seed(0)
    op, make_bias = OPS[name]
    sq, sk, heads_kv = case.get("sq", 9), case.get("sk", 9), case.get("heads_kv", 4)
    q = torch.randn(2, sq, 4, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, sk, heads_kv, 16, dtype=torch.float64, requires_grad=True) for _ in "kv")
    (aux, bias), scale = make_bias(sq, sk), 16 ** -0.5
    causal, window = case.get("causal", False), case.get("window", (-1, -1))
    out, lse = op(q, k, v, aux, scale, causal, *window)
    want = _explicit(q, k, v, bias, scale, causal, window)
    torch.testing.assert_close(out, want)
    assert lse.shape == (2, 4, sq) and lse.dtype == torch.float32
    cotangent = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), cotangent),
                             torch.autograd.grad(want, (q, k, v), cotangent)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("masks", ["key_padding", "segment_ids"])
@pytest.mark.parametrize("name", list(OPS))
def test_ops_beside_key_padding_and_documents_match_explicit_float64(name, masks):
    """The bias beside the masks the plain op takes from data (key padding, document ids), causal, GQA."""
    torch.manual_seed(4)
    op, make_bias = OPS[name]
    q = torch.randn(2, 10, 4, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 10, 2, 16, dtype=torch.float64, requires_grad=True) for _ in "kv")
    (aux, bias), scale = make_bias(10, 10), 16 ** -0.5
    if masks == "key_padding":
        data = torch.arange(10)[None, :] < torch.tensor([10, 6])[:, None]
        keep = data[:, None, None, :]
    else:
        data = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])
        keep = (data[:, :, None] == data[:, None, :])[:, None]
    out, _ = op(q, k, v, aux, scale, True, **{masks: data})
    want = _explicit(q, k, v, bias, scale, True, keep=keep)
    torch.testing.assert_close(out, want)
    cotangent = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), cotangent),
                             torch.autograd.grad(want, (q, k, v), cotangent)):
        torch.testing.assert_close(got, expected)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 12, 4, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    slopes = _slopes(4)

    def step(q, k, v):
        return torch.ops.fa4.flash_attn_alibi_fwd(q, k, v, slopes, 0.25, True)[0] * 3

    cotangent = torch.randn(2, 12, 4, 16, dtype=torch.bfloat16)
    eager = step(q, k, v)
    compiled = torch.compile(step, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, (q, k, v), cotangent),
                         torch.autograd.grad(eager, (q, k, v), cotangent)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("slopes, message", [
    (torch.zeros(3), "slopes must be a float32 \\(4,\\)"),
    (torch.zeros(4, dtype=torch.float64), "slopes must be a float32"),
])
def test_bad_slopes_are_named(slopes, message):
    q, k, v = (torch.randn(1, 5, 4, 16) for _ in range(3))
    with pytest.raises(ValueError, match=message):
        torch.ops.fa4.flash_attn_alibi_fwd(q, k, v, slopes, 0.25)


def test_slopes_times_key_index_is_the_same_attention():
    """The op's bias is 0 on the bottom-right diagonal; ``slopes[h] * j`` differs by a constant per row: the same
    output, a logsumexp moved by that constant."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64) for _ in range(3))
    slopes = torch.tensor([-0.5, -0.25])
    out, lse = torch.ops.fa4.flash_attn_alibi_fwd(q, k, v, slopes, 1 / math.sqrt(8), True)
    bias = slopes[:, None, None] * torch.arange(6, dtype=torch.float64).expand(6, 6)
    torch.testing.assert_close(out, _explicit(q, k, v, bias, 1 / math.sqrt(8), True))
    plain = torch.ops.fa4.flash_attn_fwd(q, k, v, 1 / math.sqrt(8), True)[1]
    assert not torch.allclose(lse, plain)


def test_bad_table_is_named():
    q, k, v = (torch.randn(1, 5, 4, 16) for _ in range(3))
    with pytest.raises(ValueError, match="table must be a float32 \\(4, 9\\)"):
        torch.ops.fa4.flash_attn_relative_bias_fwd(q, k, v, torch.zeros(4, 8), 0.25)
