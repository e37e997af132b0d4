"""Spellings of attention and masks from real codebases, folded to one form before matching.

Each program is written from the idiom of a public codebase (timm's ViT, OpenAI Whisper, Meta's reference
Llama, nanoGPT, BERT's extended mask), compiled with the plugin on CPU (reference kernels), static and
dynamic: the site must run FA4, and output and gradients must match eager.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats
from tests.compare import EXCEPTION_TEXT, assert_matches_eager

pytestmark = pytest.mark.usefixtures("no_compile_cache")

B, H, S, D = 2, 4, 24, 16


def _qkv():
    torch.manual_seed(0)
    return [torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]


def _causal(q, k):
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    return j <= i


def einsum(q, k, v):
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * (q.shape[-1] ** -0.5)
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)


def timm_vit(q, k, v):
    q = q * (q.shape[-1] ** -0.5)
    attn = q @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return attn @ v


def whisper(q, k, v):
    scale = (q.shape[-1]) ** -0.25
    qk = (q * scale) @ (k * scale).transpose(-1, -2)
    qk = qk + torch.where(_causal(q, k), 0.0, float("-inf"))
    w = F.softmax(qk.float(), dim=-1).to(q.dtype)
    return w @ v


def whisper_permuted_key(q, k, v):
    """Whisper permutes K to (B, H, D, S) itself, scaled before the product."""
    scale = (q.shape[-1]) ** -0.25
    kt = k.permute(0, 1, 3, 2) * scale
    return F.softmax(((q * scale) @ kt).float(), dim=-1).to(q.dtype) @ v


def meta_llama(q, k, v):
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    scores = scores + torch.full((q.shape[2], k.shape[2]), float("-inf")).triu(1)
    scores = F.softmax(scores.float(), dim=-1).type_as(q)
    return torch.matmul(scores, v)


def nanogpt_manual(q, k, v):
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril() == 0, float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v


def nanogpt_flash(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)


def module_softmax(q, k, v):
    return torch.nn.Softmax(dim=-1)(q @ k.mT * 0.25) @ v


def abs_window(q, k, v):
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i - j).abs() <= 3)


def zeros_masked_fill(q, k, v):
    mask = torch.zeros(q.shape[2], k.shape[2], dtype=q.dtype).masked_fill(~_causal(q, k), float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def einsum_additive_mask(q, k, v):
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores + torch.where(_causal(q, k), 0.0, torch.finfo(q.dtype).min).to(q.dtype)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v)


def meta_llama_prefill(q, k, v, start_pos=0):
    """meta-llama's mask with its cache-offset part, empty at ``start_pos`` 0 (a prefill with no cache)."""
    mask = torch.full((q.shape[2], k.shape[2]), float("-inf")).triu(1)
    mask = torch.hstack([torch.zeros((q.shape[2], start_pos)), mask]).type_as(q)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1]) + mask
    return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v)


def hf_make_causal_mask(q, k, v):
    """transformers 4.x ``_make_causal_mask``: a finfo.min matrix whose lower triangle is filled with 0 in place."""
    mask = torch.full((q.shape[2], q.shape[2]), torch.finfo(q.dtype).min)
    condition = torch.arange(mask.size(-1))
    mask.masked_fill_(condition < (condition + 1).view(mask.size(-1), 1), 0)
    mask = mask.to(q.dtype)[None, None, :, :].expand(q.shape[0], 1, q.shape[2], q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def fixed_blocks(q, k, v):
    """Block-diagonal attention over fixed blocks of 8 positions (torchtitan's ``q_idx // c == kv_idx // c``)."""
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i // 8) == (j // 8))


def causal_fixed_blocks(q, k, v):
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    scores = (q @ k.transpose(-2, -1) * 0.25).masked_fill((torch.div(i, 5, rounding_mode="floor") != j // 5) | (j > i),
                                                         float("-inf"))
    return scores.softmax(-1) @ v


def truncated_fixed_blocks(q, k, v):
    """Truncating division, floor division on positions."""
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    same = torch.div(i, 6, rounding_mode="trunc") == torch.div(j, 6, rounding_mode="trunc")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same)


def padded_nothing(q, k, v):
    """``F.pad`` with widths (0, 0), as export-friendly mask code writes it."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(_causal(q, k), (0, 0)))


def padded_prefix(q, k, v):
    """A causal block shifted right by 4 keys every row keeps (``F.pad(..., (4, 0), value=True)``): ``kv_idx -
    q_idx <= 4``, FA4's window (-1, 4)."""
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2] - 4)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(j <= i, (4, 0), value=True))


def padded_additive_prefix(q, k, v):
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2] - 4)[None, :]
    mask = torch.where(j <= i, 0.0, float("-inf")).to(q.dtype)
    scores = q @ k.transpose(-2, -1) * 0.25 + F.pad(mask, (4, 0))
    return scores.softmax(-1) @ v


def cloned_probabilities(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.25).softmax(-1).clone().matmul(v)


def cast_after_dropout(q, k, v):
    probs = F.softmax((q @ k.transpose(-2, -1)).float() * 0.25, dim=-1)
    return F.dropout(probs, p=0.0, training=True).to(q.dtype) @ v


def zero_dim_tensor_scale_and_fill(q, k, v):
    scores = q @ k.transpose(-2, -1) / torch.full([], math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~_causal(q, k), torch.full((), float("-inf")))
    return scores.softmax(-1) @ v


def falcon_inplace_div(q, k, v):
    """Falcon eager: the scores divided in place, a float mask added inside the softmax call."""
    mask = torch.where(_causal(q, k), 0.0, float("-inf")).to(q.dtype)
    scores = q @ k.transpose(-1, -2)
    scores /= math.sqrt(q.shape[-1])
    return F.softmax(scores + mask, dim=-1, dtype=q.dtype) @ v


def inplace_mul(q, k, v):
    scores = q @ k.transpose(-1, -2)
    scores *= q.shape[-1] ** -0.5
    return scores.softmax(-1) @ v


def zero_dim_tensor_factor(q, k, v):
    return (torch.tensor(0.25) * (q @ k.transpose(-2, -1))).softmax(-1) @ v


SPELLINGS = {  # name: (program, causal, window)
    "einsum": (einsum, False, None), "timm_vit": (timm_vit, False, None), "whisper": (whisper, True, None),
    "whisper_permuted_key": (whisper_permuted_key, False, None), "meta_llama": (meta_llama, True, None),
    "nanogpt_manual": (nanogpt_manual, True, None), "nanogpt_flash": (nanogpt_flash, True, None),
    "module_softmax": (module_softmax, False, None), "abs_window": (abs_window, False, (3, 3)),
    "zeros_masked_fill": (zeros_masked_fill, True, None), "einsum_additive_mask": (einsum_additive_mask, True, None),
    "meta_llama_prefill": (meta_llama_prefill, True, None), "cloned_probabilities": (cloned_probabilities, False, None), "cast_after_dropout": (cast_after_dropout, False, None),
    "zero_dim_tensor_scale_and_fill": (zero_dim_tensor_scale_and_fill, True, None),
    "zero_dim_tensor_factor": (zero_dim_tensor_factor, False, None),
    "falcon_inplace_div": (falcon_inplace_div, True, None), "inplace_mul": (inplace_mul, False, None),
    "hf_make_causal_mask": (hf_make_causal_mask, True, None), "fixed_blocks": (fixed_blocks, False, None),
    "causal_fixed_blocks": (causal_fixed_blocks, True, None),
    "truncated_fixed_blocks": (truncated_fixed_blocks, False, None),
    "padded_nothing": (padded_nothing, True, None), "padded_prefix": (padded_prefix, False, (-1, 4)),
    "padded_additive_prefix": (padded_additive_prefix, False, (-1, 4)),
}


def _compare(fn, inputs, extra=(), dynamic=False):
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(fn, torch.compile(fn, fullgraph=True, dynamic=dynamic), inputs, extra)
    records = stats.site_records()
    assert len(records) == 1, records
    assert records[0].decision == "fa4", records[0].reason
    return records[0]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_runs_fa4_and_matches_eager(name, dynamic):
    fn, causal, window = SPELLINGS[name]
    record = _compare(fn, _qkv(), dynamic=dynamic)
    assert record.features["causal"] == causal and record.features["window"] == window


def meta_llama_chunk(q, k, v, start_pos):
    """meta-llama's prefill of a chunk after ``start_pos`` cached tokens: every cached key kept, causal within the
    chunk, joined with ``hstack``: FA4's bottom-right causal over S_kv = start_pos + S_q keys."""
    mask = torch.full((q.shape[2], q.shape[2]), float("-inf")).triu(1)
    mask = torch.hstack([torch.zeros((q.shape[2], start_pos)), mask]).type_as(q)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1]) + mask
    return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_meta_llama_chunk_after_a_cache_is_bottom_right_causal(dynamic):
    q, _, _ = _qkv()
    compiled = torch.compile(meta_llama_chunk, fullgraph=True, dynamic=dynamic)
    for start_pos in (8, 13):
        k, v = (torch.randn(B, H, S + start_pos, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        with fa4_inductor.enabled(eager=False, devices=("cpu",)):
            assert_matches_eager(meta_llama_chunk, compiled, [q, k, v], (start_pos,))
        (record,) = stats.site_records()[-1:]
        assert record.decision == "fa4" and record.features["causal"], record.reason
    assert len(stats.site_records()) == (1 if dynamic else 2)  # dynamic: one graph serves both cache lengths


def per_head_temperature(q, k, v, temperature):
    """A learned temperature per head, (H, 1, 1), on the scores."""
    return (q @ k.transpose(-2, -1) * temperature).softmax(-1) @ v


def per_head_divisor(q, k, v, temperature):
    return F.softmax(q @ k.transpose(-2, -1) / temperature.view(1, H, 1, 1), dim=-1) @ v


def per_head_query_factor(q, k, v, temperature):
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    scores = (q * temperature) @ k.transpose(-2, -1)
    return scores.masked_fill(j > i, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("fn, low", [(per_head_temperature, 0.15), (per_head_divisor, 3.0),
                                     (per_head_query_factor, 0.15)], ids=["temperature", "divisor", "query_factor"])
def test_a_per_head_factor_is_written_into_q_and_gets_its_gradient(fn, low, dynamic):
    """FA4 has one softmax scale; a factor per head (a learned temperature) is multiplied into q before the call,
    where autograd gives it its gradient (compared with eager's here, as an input). Factors near 1/sqrt(D) (divisors
    near sqrt(D)): larger scores make bf16 eager's own rounding the larger error."""
    temperature = (low * (1 + torch.rand(H, 1, 1))).to(torch.bfloat16).requires_grad_()
    _compare(fn, [*_qkv(), temperature], dynamic=dynamic)


@pytest.mark.parametrize("form", ["extended", "extended_eager"])
def test_bert_extended_padding_mask(form):
    """``(1.0 - mask) * finfo.min`` over a (B, 1, 1, S) 0/1 attention mask: FA4 key padding."""
    def fn(q, k, v, attention_mask):
        extended = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        if form == "extended":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=extended)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + extended
        return torch.softmax(scores, dim=-1) @ v

    attention_mask = torch.ones(B, S, dtype=torch.long)
    attention_mask[1, 17:] = 0
    record = _compare(fn, _qkv(), (attention_mask,))
    assert record.features["padding"]


def test_a_position_bias_tensor_takes_pytorchs_route_at_run_time():
    """A frozen position bias added to the scores (T5's, precomputed) is data: read at run time, where its values
    are no FA4 mask, so the call runs PyTorch's attention on it."""
    bias = torch.randn(1, H, S, S, dtype=torch.bfloat16)

    def fn(q, k, v):
        scores = q @ k.transpose(-1, -2) + bias
        return torch.softmax(scores.float(), dim=-1).type_as(q) @ v

    q, k, v = _qkv()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(fn, fullgraph=True)(q, k, v)
    # PyTorch's SDPA adds the bias in bf16 where this eager code adds it before a float32 softmax: bf16 apart.
    torch.testing.assert_close(got, fn(q, k, v), atol=6e-2, rtol=3e-2)
    (record,) = stats.site_records()
    assert record.decision == "fa4" and record.features["mask"] == "data, checked at run time"
    assert stats.counters["data_mask.pytorch"] >= 1 and stats.counters["data_mask.fa4"] == 0


def test_a_mask_joined_from_two_filled_pieces_is_read_piece_by_piece():
    """meta-llama's cache-offset join at S_q == S_kv: 8 keys all kept, then causal shifted by 8: ``kv_idx - q_idx <=
    8`` everywhere (the kept block lies inside that band), FA4's window (-1, 8)."""
    def fn(q, k, v):
        offset = 8
        mask = torch.full((q.shape[2], k.shape[2] - offset), float("-inf")).triu(1)
        mask = torch.cat([torch.zeros((q.shape[2], offset)), mask], dim=-1).type_as(q)
        return torch.softmax((q @ k.transpose(-1, -2) + mask).float(), dim=-1).type_as(q) @ v

    record = _compare(fn, _qkv())
    assert record.features["window"] == (-1, 8) and not record.features["causal"]


def _assert_falls_back(fn, reason: str, extra=(), exact: bool = True):
    """``fn`` compiled with the plugin leaves its one site to PyTorch with ``reason`` and computes what eager does
    (``exact``: to the bit; else within Inductor's own rounding)."""
    q, k, v = (t.detach() for t in _qkv())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(fn)(q, k, v, *extra)
    (record,) = stats.site_records()
    assert record.decision == "fallback" and reason in record.reason, record.reason
    tolerance = {} if exact else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, fn(q, k, v, *extra), **tolerance)


def t5_eager(q, k, v, padding, bias):
    """T5's eager attention: a position bias, then the padding mask, added to the scores one after the other."""
    extended = (1.0 - padding[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    scores = scores + bias
    scores = scores + extended
    return F.softmax(scores.float(), dim=-1).type_as(q) @ v


def test_masks_added_one_after_another_keep_what_both_keep():
    """Cross-attention's bias is zeros made in the graph: the sum is the padding, FA4's key padding."""
    padding = torch.ones(B, S, dtype=torch.long)
    padding[1, 17:] = 0

    def fn(q, k, v, padding):
        return t5_eager(q, k, v, padding, torch.zeros(1, H, q.shape[2], k.shape[2], dtype=q.dtype))

    record = _compare(fn, _qkv(), (padding,))
    assert record.features["padding"] and not record.features["causal"]


def test_a_bias_given_as_data_added_before_a_mask_falls_back_with_its_reason():
    padding, bias = torch.ones(B, S, dtype=torch.long), torch.randn(1, H, S, S, dtype=torch.bfloat16)
    _assert_falls_back(t5_eager, "masks added one after another", (padding, bias), exact=False)


@pytest.mark.parametrize("widths, value, reason", [
    ((0, 4), False, "not a bound on kv_idx - q_idx"),  # the last 4 keys hidden from every row: no band
    ((4, 0), 0.5, "pad of an indicator"),
], ids=["hidden_suffix", "fill_not_a_mask_entry"])
def test_a_pad_that_is_no_band_falls_back_with_its_reason(widths, value, reason):
    def fn(q, k, v):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2] - 4)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=F.pad(j <= i, widths, value=value))

    _assert_falls_back(fn, reason, exact=False)


def test_a_truncating_division_of_signed_values_falls_back_with_its_reason():
    """``trunc((i - j) / 4) == 0`` is ``|i - j| <= 3``, not what floor division would give: not read as floor."""
    def fn(q, k, v):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.div(i - j, 4, rounding_mode="trunc") == 0)

    _assert_falls_back(fn, "truncating division")


def test_a_joined_mask_that_is_no_band_falls_back_with_its_reason():
    """The first 8 keys kept, the rest hidden: a bound on kv_idx alone, which FA4 has no parameter for."""
    def fn(q, k, v):
        mask = torch.cat([torch.zeros((q.shape[2], 8)), torch.full((q.shape[2], k.shape[2] - 8), float("-inf"))], 1)
        return torch.softmax((q @ k.transpose(-1, -2) + mask.type_as(q)).float(), dim=-1).type_as(q) @ v

    _assert_falls_back(fn, "not a bound on kv_idx - q_idx")


def _kept(q, k):
    return torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()


FINITE_FILLS = {
    "masked_fill_scores": lambda q, k, v: (q @ k.mT * 0.25).masked_fill(~_kept(q, k), -1e9).softmax(-1) @ v,
    "where_scores": lambda q, k, v: torch.where(_kept(q, k), q @ k.mT, -1e4).softmax(-1) @ v,
    "full_mask": lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.full((q.shape[2], k.shape[2]), -1e9).triu(1).to(q.dtype)),
}


@pytest.mark.parametrize("name", list(FINITE_FILLS))
def test_finite_fills_stay_with_the_reason(name):
    """-1e4 and -1e9 fills leave hidden keys a weight FA4 drops: exact only under a score bound no graph gives, so
    the site stays, saying so, and gives eager's result."""
    fn = FINITE_FILLS[name]
    q, k, v = (t.detach() for t in _qkv())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(fn, fullgraph=True)(q, k, v)
    (record,) = stats.site_records()
    assert record.decision == "fallback" and "the finite fill" in record.reason, record.reason
    assert not EXCEPTION_TEXT.search(record.reason)
    torch.testing.assert_close(got, fn(q, k, v))


def test_a_finite_fill_mask_of_the_offset_runs_the_relative_bias_op_exactly():
    """``where(kept, 0, -1e4)`` given to SDPA is a bias of ``kv - q`` alone: FA4's relative-bias op adds those very
    values (hidden keys keep their weight), no causal masking assumed."""
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(_kept(q, k), 0.0, -1e4).to(q.dtype))
    q, k, v = (t.detach() for t in _qkv())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(fn, fullgraph=True)(q, k, v)
    (record,) = stats.site_records()
    assert record.decision == "fa4" and record.features["relative_bias"] and not record.features["causal"]
    torch.testing.assert_close(got, fn(q, k, v), atol=2e-2, rtol=2e-2)


H_KV = 2


def _repeat_getitem_reshape(x, n):  # Hugging Face's repeat_kv
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def _repeat_unsqueeze_flatten(x, n):
    return x.unsqueeze(2).expand(-1, -1, n, -1, -1).flatten(1, 2)


def _repeat_contiguous_view(x, n):
    b, h, s, d = x.size()
    return x.unsqueeze(2).expand(b, h, n, s, d).contiguous().view(b, h * n, s, d)


def _repeat_interleave_keyword(x, n):
    return torch.repeat_interleave(x, repeats=n, dim=1)


def _repeat_interleave_method(x, n):
    return x.repeat_interleave(n, dim=1)


GQA_SPELLINGS = {f.__name__.lstrip("_"): f for f in (
    _repeat_getitem_reshape, _repeat_unsqueeze_flatten, _repeat_contiguous_view, _repeat_interleave_keyword,
    _repeat_interleave_method)}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", list(GQA_SPELLINGS))
def test_gqa_repeat_spellings_run_fa4_on_the_unrepeated_heads(name, dynamic):
    """Each spelling of a GQA repeat, its count computed from the shapes, is seen through (FA4 runs GQA itself)."""
    repeat = GQA_SPELLINGS[name]

    def fn(q, k, v):
        n = q.shape[1] // k.shape[1]
        k, v = repeat(k, n), repeat(v, n)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
        return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)

    torch.manual_seed(0)
    q = torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, H_KV, S, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    record = _compare(fn, [q, k, v], dynamic=dynamic)
    assert record.features["gqa_repeat_removed"] and record.features["gqa_ratio"] in (H // H_KV, None)


def test_scores_read_before_an_in_place_scale_keep_their_own_value():
    """The in-place division writes the scores another output read before it: the site stays as written, naming
    the write (a rewrite would drop the scores that read needs), and matches eager."""
    def fn(q, k, v):
        scores = q @ k.transpose(-1, -2)
        raw = scores.sum(-1, keepdim=True)  # read before the write
        scores /= math.sqrt(q.shape[-1])
        return scores.softmax(-1) @ v + raw

    q, k, v = _qkv()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(fn, torch.compile(fn, fullgraph=True), [q, k, v])
    (record,) = stats.site_records()
    assert record.decision == "fallback" and "written in place (itruediv" in record.reason, record
