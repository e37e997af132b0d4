"""Position biases written in model code (added to the scores, or carried in a mask) become FA4's ops, forward and
backward, exactly: ALiBi, and biases of the head and kv_idx - q_idx only (T5's bucketed table) read once per offset;
any other bias stays on PyTorch with a reason that names it (CPU reference)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats
from tests.compare import assert_matches_eager
from tests.t5_buckets import relative_position_buckets

pytestmark = pytest.mark.usefixtures("no_compile_cache")

B, H, S, D = 2, 4, 24, 16


def _qkv(heads_kv=H, length=S):
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, h, length, D, generator=generator, dtype=torch.bfloat16).requires_grad_()
                 for h in (H, heads_kv, heads_kv))


def _mpt_slopes(heads):
    """MPT's slopes, computed in the graph with pow, shaped (1, H, 1, 1)."""
    base = torch.arange(1, heads + 1, dtype=torch.int64).float() * (8 / heads)
    return (1.0 / torch.pow(2, base)).view(1, heads, 1, 1)


def _mpt_bias(q, k, max_len=64):
    """MPT's ALiBi: ``slopes * arange(1 - max_len, 1)`` made over the longest sequence, then sliced to the keys."""
    bias = (torch.arange(1 - max_len, 1, dtype=torch.int32).view(1, 1, 1, max_len) * _mpt_slopes(q.shape[1])).squeeze(0)
    return bias[:, max(0, bias.size(1) - q.shape[2]):, max(0, bias.size(2) - k.shape[2]):]


def _relative_positions(q, k):
    return torch.arange(k.shape[2], device=q.device)[None, :] - torch.arange(q.shape[2], device=q.device)[:, None]


def _causal_hidden(q, k):
    return torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)


def _repeat_kv(x, times):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, times, s, d).reshape(b, h * times, s, d)


def _eager(bias_of, hidden_of=_causal_hidden):
    """Hand-written attention: scaled scores plus the bias, hidden keys filled with finfo.min (MPT's code)."""
    def program(q, k, v):
        k, v = (_repeat_kv(t, q.shape[1] // t.shape[1]) for t in (k, v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D) + bias_of(q, k)
        if hidden_of is not None:
            scores = scores.masked_fill(hidden_of(q, k), torch.finfo(q.dtype).min)
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
    return program


SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def _slopes_buffer_bias(q, k):
    return SLOPES[:, None, None] * _relative_positions(q, k)


def _key_positions_bias(q, k):  # a constant per row away from slope * (kv - q)
    return -0.5 * SLOPES.view(1, H, 1, 1) * torch.arange(k.shape[2]).view(1, 1, 1, -1)


def _head_index_bias(q, k):  # attention-gym's slopes, from the head index
    heads = torch.arange(q.shape[1], dtype=torch.float32)
    return torch.exp2(-(heads + 1) * 8 / q.shape[1]).view(-1, 1, 1) * _relative_positions(q, k)


def _window_hidden(q, k):
    offset = _relative_positions(q, k)
    return (offset > 0) | (offset < -5)


ALIBI_PROGRAMS = {
    "mpt_causal": (_eager(_mpt_bias), H, True),
    "slopes_buffer_causal_gqa": (_eager(_slopes_buffer_bias), 2, True),
    "key_positions_window": (_eager(_key_positions_bias, _window_hidden), H, False),
    "head_index_no_mask": (_eager(_head_index_bias, None), H, False),
    "slopes_buffer_padded_causal_gqa": (_eager(_slopes_buffer_bias, lambda q, k: _padding_hidden(q, k)), 2, True),
}


@pytest.mark.parametrize("name", list(ALIBI_PROGRAMS))
def test_alibi_in_model_code_runs_fa4_alibi_and_matches(name):
    program, heads_kv, causal = ALIBI_PROGRAMS[name]
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv(heads_kv), label=name)
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    assert record.features["alibi"] is True and record.features["causal"] is causal


def test_mpt_alibi_under_dynamic_shapes_keeps_one_graph():
    program = _eager(_mpt_bias)
    compiled = torch.compile(program, fullgraph=True, dynamic=True)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        for length in (24, 40):
            assert_matches_eager(program, compiled, _qkv(length=length), label=str(length))
    records = stats.site_records()
    assert [r.decision for r in records] == ["fa4"] and records[0].features["alibi"] is True


def _alibi_plus_causal(q, k):
    return _slopes_buffer_bias(q, k) + torch.zeros(q.shape[2], k.shape[2]).masked_fill(_causal_hidden(q, k),
                                                                                      float("-inf"))


def _alibi_filled(q, k):  # Falcon's way: the causal mask laid over the ALiBi with masked_fill
    return _slopes_buffer_bias(q, k).masked_fill(_causal_hidden(q, k), float("-inf"))


@pytest.mark.parametrize("mask_of", [_alibi_plus_causal, _alibi_filled], ids=["added", "masked_fill"])
def test_alibi_carried_in_a_float32_mask_runs_fa4_alibi(mask_of):
    """One float32 mask that carries the ALiBi and the causal mask, added to the scores."""
    def program(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D) + mask_of(q, k)
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    assert record.features["alibi"] is True and record.features["causal"] is True


@pytest.mark.parametrize("mask_of", [_alibi_plus_causal, _alibi_filled], ids=["added", "masked_fill"])
def test_alibi_in_an_sdpa_mask_rounded_to_the_dtype_runs_the_relative_bias_op(mask_of):
    """SDPA takes a float mask in q's dtype: the ALiBi is rounded to bfloat16 there (up to a few units at long
    positions), which FA4's float32 ALiBi would not reproduce; the table of those rounded values reproduces it."""
    def program(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_of(q, k).to(q.dtype))
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.pattern == "sdpa" and record.decision == "fa4", record.reason
    assert record.features["relative_bias"] is True and record.features["causal"] is True


def _symmetric_bias(q, k):
    return -SLOPES[:, None, None] * _relative_positions(q, k).abs()


def _bf16_bias(q, k):  # Bloom and Falcon round slope * position to bfloat16
    return SLOPES.bfloat16()[:, None, None] * _relative_positions(q, k)


def _table_bias(q, k):  # a relative-position table read at kv - q (T5-like)
    table = torch.linspace(-1, 1, 2 * S - 1).view(1, -1).expand(H, -1)
    return table[:, _relative_positions(q, k) + S - 1]


PADDED_KEYS = torch.arange(S)[None, :] >= torch.tensor([S, S - 5])[:, None]  # (B, S): the second row's last 5


def _padding_hidden(q, k):
    return PADDED_KEYS[:, None, None, :] | _causal_hidden(q, k)


REFUSED = {
    "table_times_query_position": (_eager(lambda q, k: _table_bias(q, k) * torch.arange(q.shape[2])[:, None]),
                                   "depends on q_idx besides the head and kv_idx - q_idx"),
}


@pytest.mark.parametrize("bias_of", [_symmetric_bias, _bf16_bias], ids=["symmetric", "rounded_to_bf16"])
def test_biases_of_the_offset_that_are_not_alibi_run_the_relative_bias_op(bias_of):
    """``-slope * |kv - q|`` (not linear in kv) and ALiBi rounded to bfloat16 (Bloom's and Falcon's values) depend
    on the head and kv - q only: FA4 adds them from a table of those very values."""
    program = _eager(bias_of)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    assert record.features["relative_bias"] is True and record.features["causal"] is True


@pytest.mark.parametrize("name", list(REFUSED))
def test_other_biases_stay_with_the_reason(name):
    program, reason = REFUSED[name]
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv(), label=name)
    (record,) = stats.site_records()
    assert record.decision == "fallback" and reason in record.reason, record.reason


def test_learned_slopes_stay_with_the_reason():
    """FA4's ALiBi backward gives the slopes no gradient: learned slopes keep PyTorch's attention."""
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.slopes = torch.nn.Parameter(SLOPES.clone())

        def forward(self, q, k, v):
            return _eager(lambda q, k: self.slopes[:, None, None] * _relative_positions(q, k))(q, k, v)

    module = Attention()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(module, torch.compile(module, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.decision == "fallback" and "needs a gradient" in record.reason, record.reason


NUM_BUCKETS, MAX_DISTANCE = 8, 16


class T5Attention(torch.nn.Module):
    """T5's self-attention scores: unscaled, plus a learned bias per (head, bucket of kv - q)."""

    def __init__(self, causal: bool, sdpa: bool = False):
        super().__init__()
        self.causal, self.sdpa = causal, sdpa
        table = torch.randn(NUM_BUCKETS, H, generator=torch.Generator().manual_seed(0))
        self.relative_attention_bias = torch.nn.Embedding(NUM_BUCKETS, H, _weight=table).to(torch.bfloat16)

    def forward(self, q, k, v):
        relative_position = _relative_positions(q, k)
        bias = self.relative_attention_bias(relative_position_buckets(relative_position, not self.causal, NUM_BUCKETS,
                                                                      MAX_DISTANCE))
        bias = bias.permute([2, 0, 1]).unsqueeze(0)
        if self.sdpa:  # Hugging Face's SDPA route: the bias under the causal mask, in q's dtype
            mask = bias if not self.causal else torch.where(~_causal_hidden(q, k), bias, torch.finfo(q.dtype).min)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.contiguous(), scale=1.0)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) + bias.float()  # float32, as FA4 computes
        if self.causal:
            scores = scores + torch.zeros(q.shape[2], k.shape[2], device=q.device).masked_fill(
                _causal_hidden(q, k), float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("sdpa", [False, True], ids=["eager", "sdpa"])
def test_t5_relative_bias_with_a_frozen_table_runs_fa4_and_matches(causal, sdpa):
    module = T5Attention(causal, sdpa).requires_grad_(False)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(module, torch.compile(module, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    assert record.features["relative_bias"] is True and record.features["causal"] is causal


def test_t5_relative_bias_under_no_grad_runs_fa4_and_the_grid_is_not_built():
    """Inference with the learned table: FA4's op, its table of S_q + S_kv - 1 entries per head gathered from the
    bias's code, which Inductor inlines into the gather (no (H, S_q, S_kv) bias buffer in the compiled code)."""
    from torch._inductor.utils import run_and_get_code
    module = T5Attention(causal=True)
    q, k, v = (t.detach() for t in _qkv())
    with torch.no_grad():
        want = module(q, k, v)
        with fa4_inductor.enabled(eager=False, devices=("cpu",)):
            got, codes = run_and_get_code(torch.compile(module, fullgraph=True), q, k, v)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    (record,) = stats.site_records()
    assert record.decision == "fa4" and record.features["relative_bias"] is True, record.reason
    code = "\n".join(codes)
    assert "flash_attn_relative_bias_fwd_kernel" in code and f"{S}, {S})" not in code


def test_t5_relative_bias_with_a_learned_table_in_training_stays_with_the_reason():
    module = T5Attention(causal=True)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(module, torch.compile(module, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.decision == "fallback" and "needs a gradient" in record.reason, record.reason


def _graphs_at_two_lengths(program) -> int:
    """``program`` compiled with ``dynamic=True`` and the plugin, matched against eager at two lengths: the number of
    graphs Dynamo made."""
    compiled = torch.compile(program, fullgraph=True, dynamic=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        for length in (24, 40):
            assert_matches_eager(program, compiled, _qkv(length=length), label=str(length))
    return counters["stats"]["unique_graphs"]


def test_t5_relative_bias_under_dynamic_shapes_keeps_one_graph():
    """dynamic=True: the table of S_q + S_kv - 1 offsets is sized by the graph's symbols; a new length recompiles
    nothing."""
    assert _graphs_at_two_lengths(T5Attention(causal=True).requires_grad_(False)) == 1
    # (Dynamo restarts its analysis once for the embedding's float norm_type: the pass may run on both attempts.)
    assert all(r.decision == "fa4" and r.features["relative_bias"] for r in stats.site_records())


def _positions_counted_from_the_mask(q, k):
    """Bloom's and Falcon's ALiBi: positions counted from the padding mask (``cumsum``), ``slope * position`` in
    bfloat16: per batch row, head and key, the same for every query."""
    kept = (~PADDED_KEYS).long()
    positions = ((kept.cumsum(-1) - 1) * kept)[:, None, :]
    return (SLOPES.bfloat16()[:, None] * positions)[:, :, None, :]


def test_alibi_counted_from_the_padding_mask_runs_the_key_bias_op():
    program = _eager(_positions_counted_from_the_mask, _padding_hidden)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    assert record.features["key_bias"] and record.features["padding"] and record.features["causal"]


def test_alibi_over_the_keys_rounded_in_an_sdpa_mask_runs_the_key_bias_op():
    """MPT's ``slope * (kv - (S - 1))`` rounded to q's dtype in an SDPA mask: not a function of kv - q once rounded,
    the same for every query: the key-bias op adds those rounded values."""
    def program(q, k, v):
        bias = _mpt_bias(q, k).masked_fill(_causal_hidden(q, k), float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.decision == "fa4" and record.features["key_bias"] and record.features["causal"], record.reason


@pytest.mark.parametrize("mask", ["bool", "float", "float_cast"])
def test_a_mask_given_as_data_is_never_read_as_a_bias(mask):
    """A padding mask passed in (bool, or additive float, or cast to q's dtype) is a mask read at run time, not a
    bias: 0/1 or its values are never added to the scores as a per-key table."""
    kept = ~PADDED_KEYS[:, None, None, :]
    given = {"bool": kept, "float": torch.zeros(kept.shape).masked_fill(~kept, float("-inf")),
             "float_cast": torch.zeros(kept.shape).masked_fill(~kept, float("-inf"))}[mask]

    def program(q, k, v, given):
        attn_mask = given.to(q.dtype) if mask == "float_cast" else given
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    q, k, v = (t.detach() for t in _qkv())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(program, fullgraph=True)(q, k, v, given)
    torch.testing.assert_close(got, program(q, k, v, given), atol=2e-2, rtol=2e-2)
    (record,) = stats.site_records()
    assert not any(record.features.get(name) for name in ("alibi", "relative_bias", "key_bias")), record.features


def _bloom_form(bias_of, hidden_of=_padding_hidden):
    """Bloom's code: a bias over (B * H, 1 or S_q, S_kv) added by ``baddbmm`` to the scores of (B * H, S, D)
    operands (the heads folded into the batch), viewed as (B, H, S_q, S_kv) for the mask and the softmax, folded
    again for ``bmm`` with v."""
    def program(q, k, v):
        b, h, s, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
        scores = bias_of(q, k).baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0, alpha=1 / math.sqrt(d))
        hidden = torch.zeros(hidden_of(q, k).shape, dtype=q.dtype, device=q.device).masked_fill(hidden_of(q, k), -3e38)
        probs = F.softmax(scores.view(b, h, s, -1) + hidden, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs.view(b * h, s, -1), v3).view(b, h, s, d)
    return program


def _bloom_alibi(q, k):
    """Bloom's ``build_alibi_tensor``: positions counted from the padding mask, ``slope * position`` shaped (B * H,
    1, S_kv) and rounded to q's dtype."""
    kept = (~PADDED_KEYS).long()
    positions = ((kept.cumsum(-1) - 1) * kept)[:, None, :]
    return (SLOPES[..., None] * positions).reshape(B * H, 1, S).to(q.dtype)


def _slopes_per_folded_row(q, k):
    """Slopes repeated for every batch row, then ``slope * kv_idx``; small, as eager's ``baddbmm`` rounds bias +
    q·kᵀ to bfloat16 (FA4 adds in float32), an error that grows with the bias."""
    return (SLOPES.repeat(B)[:, None, None] / 8 * torch.arange(k.shape[2], dtype=torch.float32)).to(q.dtype)


def _symmetric_offsets(q, k):  # one (S_q, S_kv) bias every folded row shares
    return (-0.125 * _relative_positions(q, k).abs()).to(q.dtype)


BLOOM_FORM = {
    "bloom_alibi_padded": (_bloom_form(_bloom_alibi), "key_bias", True),
    "slopes_per_folded_row_causal": (_bloom_form(_slopes_per_folded_row, _causal_hidden), "key_bias", False),
    "symmetric_offsets_padded": (_bloom_form(_symmetric_offsets), "relative_bias", True),
}


@pytest.mark.parametrize("name", list(BLOOM_FORM))
def test_bias_added_by_baddbmm_over_folded_heads_runs_fa4(name):
    """The bias's row ``b * H + h`` of the folded form is head ``h`` of batch row ``b``: FA4's key-bias op (or the
    relative-bias op) reads it so, with the (B, H, S, D) tensors the operands fold as q, k and v."""
    program, feature, padded = BLOOM_FORM[name]
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv(), label=name)
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    assert record.features[feature] and record.features["causal"] and record.features["padding"] is padded


def test_bloom_form_under_dynamic_shapes_keeps_one_graph():
    assert _graphs_at_two_lengths(_bloom_form(_slopes_per_folded_row, _causal_hidden)) == 1
    assert all(r.decision == "fa4" and r.features["key_bias"] for r in stats.site_records())


def _query_dependent(q, k):  # differs per query and per folded row: no bias FA4 adds
    return (torch.arange(B * H * S).view(B * H, S, 1) * 0.01 + torch.zeros(1, 1, k.shape[2])).to(q.dtype)


def _heads_folded_otherwise(q, k, v):
    """Scores viewed as (B, H, S, S) over k folded from (H, B, S, D): its rows are not the scores' (b, h)."""
    b, h, s, d = q.shape
    q3, v3 = (t.reshape(b * h, -1, d) for t in (q, v))
    k3 = k.transpose(0, 1).reshape(h * b, -1, d)
    probs = torch.softmax(torch.bmm(q3, k3.transpose(1, 2)).view(b, h, s, -1) / math.sqrt(d), dim=-1)
    return torch.bmm(probs.view(b * h, s, -1), v3).view(b, h, s, d)


@pytest.mark.parametrize("program, reason", [
    (_bloom_form(_query_dependent), "a mask that baddbmm adds to scores with the heads folded"),
    (_heads_folded_otherwise, "is not a (B, H, S, D) tensor with its heads folded"),
], ids=["query_dependent_bias", "key_folded_from_other_axes"])
def test_folded_heads_fa4_does_not_read_so_stay_with_the_reason(program, reason):
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.decision == "fallback" and reason in record.reason, record.reason


def _given_alibi(name: str) -> torch.Tensor:
    """An ALiBi given as data, (B, H, S, S) in bf16: over the keys under the causal mask (and the padding), or
    symmetric (an encoder's) with no mask."""
    offsets = _relative_positions(*_qkv()[:2])
    if name == "symmetric":
        return (-SLOPES.view(1, H, 1, 1) * offsets.abs()).expand(B, H, S, S).to(torch.bfloat16)
    hidden = _causal_hidden(*_qkv()[:2]) | (PADDED_KEYS[:, None, None, :] if name == "keys_padded" else False)
    alibi = SLOPES.view(1, H, 1, 1) * torch.arange(S)
    return alibi.expand(B, H, S, S).masked_fill(hidden, float("-inf")).to(torch.bfloat16)


@pytest.mark.parametrize("name", ["keys", "keys_padded", "symmetric"])
def test_alibi_given_as_data_runs_a_bias_op_at_run_time(name):
    """An ALiBi a model caches or builds outside the compiled graph, passed in (with the causal mask and the padding
    laid over it) in q's dtype: the data route reads it at run time, finds a bias per head and key under a causal
    band (FA4's key-bias op) or a function of the head and j - i (the relative-bias op), forward and backward, no
    dense attention."""
    def program(q, k, v, given):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=given)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv(), (_given_alibi(name),))
    (record,) = stats.site_records()
    assert record.decision == "fa4" and record.features["mask"] == "data, checked at run time", record
    assert stats.counters["data_mask.fa4"] >= 2 and stats.counters["data_mask.pytorch"] == 0


def _scaled_after(bias_of, hidden_of=_causal_hidden, carried_of=None):
    """Falcon's eager code before transformers 5.23: the bias added to the unscaled float32 scores (viewed to their
    own shape), the sum scaled in place, then the mask (carrying ``carried_of``'s bias, where given) added."""
    def program(q, k, v):
        b, h, s, _ = q.shape
        scores = torch.matmul(q, k.transpose(-1, -2)).view(b, h, s, -1).float() + bias_of(q, k)
        scores *= 1 / math.sqrt(D)
        carried = carried_of(q, k) if carried_of is not None else torch.zeros(())
        mask = carried.masked_fill(hidden_of(q, k), torch.finfo(torch.float32).min)
        return torch.matmul(torch.softmax(scores + mask, dim=-1).to(v.dtype).view(b, h, s, -1), v)
    return program


SCALED_AFTER = {
    "alibi": (_scaled_after(_slopes_buffer_bias), "alibi"),
    "symmetric": (_scaled_after(_symmetric_bias), "relative_bias"),
    "key_bias_padded": (_scaled_after(_positions_counted_from_the_mask, _padding_hidden), "key_bias"),
    "two_key_biases_padded": (_scaled_after(_positions_counted_from_the_mask, _padding_hidden,
                                            lambda q, k: _positions_counted_from_the_mask(q, k).float() / 4), "key_bias"),
}


@pytest.mark.parametrize("name", list(SCALED_AFTER))
def test_a_scale_after_the_bias_scales_the_bias_and_biases_per_key_add_up(name):
    """``(q·kᵀ + bias) * s`` is ``q·kᵀ * s + bias * s``: FA4's op with the bias scaled; a second bias per key carried
    in the mask is summed into the same table (Falcon's ALiBi, twice in its older eager code)."""
    program, feature = SCALED_AFTER[name]
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv(), label=name)
    (record,) = stats.site_records()
    assert record.decision == "fa4" and record.features[feature] and record.features["causal"], record.reason


def test_two_biases_that_do_not_add_as_one_stay_with_the_reason():
    program = _scaled_after(_slopes_buffer_bias, _padding_hidden,
                            lambda q, k: _positions_counted_from_the_mask(q, k).float())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(program, torch.compile(program, fullgraph=True), _qkv())
    (record,) = stats.site_records()
    assert record.decision == "fallback" and "two position biases" in record.reason, record.reason
