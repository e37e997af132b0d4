"""The position-bias fa4 ops on a GPU: FA4's score_mods adding ``slopes[h] * (j - i)`` (ALiBi) or ``table[h, j - i +
S_q - 1]`` (a relative-position table), forward and backward, against float64 attention with the bias written out
(causal GQA and a window; one-row-constant equivalence means the ALiBi reference may use ``slopes[h] * j``); and
T5-style and Bloom-style layers compiled with the plugin against stock."""

from __future__ import annotations

import pytest
import torch

from tests.compare import band
from tests.gpu.common import _grads, _leaves, _report, require_fa4_gpu

pytestmark = pytest.mark.gpu
require_fa4_gpu()


def _alibi(h: int, sq: int, sk: int):
    """Slopes and the bias ``slopes[h] * j`` (a constant per row away from the op's), float64 (H, S_q, S_k)."""
    slopes = -torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device="cuda")
    return slopes, slopes.double()[:, None, None] * torch.arange(sk, device="cuda", dtype=torch.float64)


def _relative_table(h: int, sq: int, sk: int):
    """A random table and its bias ``table[h, j - i + S_q - 1]``, float64 (H, S_q, S_k)."""
    table = torch.randn(h, sq + sk - 1, device="cuda")
    offsets = torch.arange(sk, device="cuda")[None, :] - torch.arange(sq, device="cuda")[:, None] + sq - 1
    return table, table.double()[:, offsets]


def _key_table(h: int, sq: int, sk: int):
    """A random table per (batch row, head, key) and its bias, the same for every query, float64 (B, H, 1, S_k)."""
    table = torch.randn(2, h, sk, device="cuda")
    return table, table.double()[:, :, None, :]


OPS = {"alibi": (torch.ops.fa4.flash_attn_alibi_fwd, _alibi),
       "relative_bias": (torch.ops.fa4.flash_attn_relative_bias_fwd, _relative_table),
       "key_bias": (torch.ops.fa4.flash_attn_key_bias_fwd, _key_table)}


@pytest.mark.parametrize("causal, window, sq, sk, heads_kv, padded", [
    (True, (-1, -1), 1024, 1024, 4, False), (False, (255, 0), 1024, 1024, 16, False),
    (False, (-1, -1), 1000, 1200, 16, False), (True, (-1, -1), 1024, 1024, 4, True)])
@pytest.mark.parametrize("name", list(OPS))
def test_op_equals_float64_with_the_bias_written_out(name, causal, window, sq, sk, heads_kv, padded):
    torch.manual_seed(0)
    op, make_bias = OPS[name]
    b, h, d = 2, 16, 128
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, sk, heads_kv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    aux, bias = make_bias(h, sq, sk)
    # key padding: row 1 keeps its first 700 keys (FA4's mask_mod and block sparsity beside the bias)
    keys = torch.arange(sk, device="cuda")[None, :] < torch.tensor([sk, 700], device="cuda")[:, None]
    out, _ = op(q, k, v, aux, d ** -0.5, causal, *window, key_padding=keys if padded else None)
    q64, k64, v64 = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    group = h // heads_kv
    scores = q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2) * d ** -0.5 + bias
    keep = band(sq, sk, causal=causal, window=window).cuda() & (keys[:, None, None, :] if padded else True)
    ref = (torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v64.repeat_interleave(group, 1))
    ref = ref.transpose(1, 2)
    dout = torch.randn_like(out)
    got = _grads(out, [q, k, v], dout)
    want = _grads(ref, [q64, k64, v64], dout.double())
    errors = [((g.double() - w).norm() / w.norm()).item() for g, w in zip([out, *got], [ref, *want])]
    _report(f"{name}_causal{causal}_window{window[0]}_{sq}x{sk}_padded{padded}", rel_errors=errors)
    assert max(errors) < 2e-2, errors


def test_t5_layer_compiled_with_the_plugin_equals_stock():
    """The bucketed bias of a T5 layer under no_grad: FA4's relative-bias op, its table from the bias's own code."""
    import fa4_inductor
    from fa4_inductor import stats
    from tests.compile.test_position_biases import T5Attention

    torch.manual_seed(2)
    module = T5Attention(causal=True).cuda()
    q, k, v = (torch.randn(2, 4, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        want = torch.compile(module)(q, k, v)
        torch._dynamo.reset()
        with fa4_inductor.enabled(eager=False):
            got = torch.compile(module)(q, k, v)
    assert [r.decision for r in stats.site_records()] == ["fa4"]
    error = ((got.double() - want.double()).norm() / want.double().norm()).item()
    _report("t5_layer_plugin_vs_stock", rel_errors=[error])
    assert error < 2e-2


def test_bloom_layer_compiled_with_the_plugin_equals_stock_forward_and_backward():
    """Bloom's folded-heads form (``baddbmm`` of its bf16 ALiBi over (B * H, 1, S), the causal mask added in 4-D):
    FA4's key-bias op on the unfolded tensors, output and q/k/v gradients against stock compile."""
    import fa4_inductor
    from fa4_inductor import stats
    from tests.compile.test_position_biases import _bloom_form, _causal_hidden

    def alibi(q, k):
        b, h = q.shape[:2]
        slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=q.device)
        return (slopes.repeat(b)[:, None, None] * torch.arange(k.shape[2], device=q.device)).to(q.dtype)

    program = _bloom_form(alibi, _causal_hidden)
    torch.manual_seed(3)
    q, k, v = _leaves(*[(2, 8, 2048, 64)] * 3)
    dout = torch.randn(2, 8, 2048, 64, device="cuda", dtype=torch.bfloat16)
    want = torch.compile(program)(q, k, v)
    want_grads = _grads(want, (q, k, v), dout)
    torch._dynamo.reset()
    with fa4_inductor.enabled(eager=False):
        got = torch.compile(program)(q, k, v)
    got_grads = _grads(got, (q, k, v), dout)
    assert [r.decision for r in stats.site_records()] == ["fa4"]
    errors = [((a.double() - b.double()).norm() / b.double().norm()).item()
              for a, b in zip((got, *got_grads), (want, *want_grads))]
    _report("bloom_layer_plugin_vs_stock", rel_errors=errors)
    assert max(errors) < 2e-2
