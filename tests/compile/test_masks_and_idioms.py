"""Mask analysis, GQA-repeat removal and hand-written attention, on small graphs (CPU reference)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats

pytestmark = pytest.mark.usefixtures("no_compile_cache")

B, H, S, D = 2, 4, 12, 16


def _qkv(sq=S, sk=S, hkv=H):
    torch.manual_seed(0)
    return (torch.randn(B, H, sq, D, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(B, hkv, sk, D, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(B, hkv, sk, D, dtype=torch.bfloat16, requires_grad=True))


def _check(fn, *inputs, expect_fa4=True):
    """Compile ``fn`` with the plugin; compare output and input grads with the stock run."""
    want = fn(*inputs)
    want_grads = torch.autograd.grad(want.float().square().sum(), inputs)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(fn, fullgraph=True)(*inputs)
    got_grads = torch.autograd.grad(got.float().square().sum(), inputs)
    records = stats.site_records()
    assert len(records) == 1
    assert (records[0].decision == "fa4") == expect_fa4, records[0].reason
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=8e-2, rtol=8e-2)
    return records[0]


def _idx(sq, sk):
    return torch.arange(sq)[None, None, :, None], torch.arange(sk)[None, None, None, :]


MASKS = {
    "causal": (lambda i, j: j <= i, dict(causal=True, window=None)),
    "causal_lt": (lambda i, j: ~(j > i), dict(causal=True, window=None)),
    "window": (lambda i, j: (j > i - 4) & (j <= i), dict(causal=False, window=(3, 0))),
    "two_sided": (lambda i, j: (j - i <= 2) & (i - j <= 5), dict(causal=False, window=(5, 2))),
    "full": (lambda i, j: (j >= 0) | (j < 0), dict(causal=False, window=None)),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("additive", [False, True])
def test_index_masks_become_fa4_parameters(name, additive):
    build, features = MASKS[name]

    def fn(q, k, v):
        i, j = _idx(q.shape[2], k.shape[2])
        mask = build(i, j).expand(q.shape[0], 1, q.shape[2], k.shape[2])
        if additive:
            mask = torch.where(mask, 0.0, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    record = _check(fn, *_qkv())
    assert {k: record.features[k] for k in features} == features


def test_bottom_right_causal_with_longer_keys():
    def fn(q, k, v):
        i, j = _idx(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + (k.shape[2] - q.shape[2]))
    record = _check(fn, *_qkv(sq=5, sk=12))
    assert record.features["causal"] is True


@pytest.mark.parametrize("mask_fn, reason", [
    (lambda i, j: j <= 3, "not a bound on kv_idx - q_idx"),
    (lambda i, j: (j - i) % 2 == 0, "does not model"),
    (lambda i, j: j < i, "negative"),  # strictly causal: the diagonal hidden
])
def test_unprovable_masks_fall_back_with_reason(mask_fn, reason):
    def fn(q, k, v):
        i, j = _idx(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_fn(i, j) | (i == 0) & (j == 0))
    q, k, v = (t.detach() for t in _qkv())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(fn)(q, k, v)
    assert reason in stats.site_records()[0].reason or "not a bound" in stats.site_records()[0].reason


def _padding(right=True):
    pad = torch.ones(B, S, dtype=torch.bool)
    if right:
        pad[1, 8:] = False
    else:
        pad[1, :5] = False
    return pad


PADDED = {
    "alone": (lambda i, j, b, pad: pad[:, None, None, :], False),
    "gather_and_causal": (lambda i, j, b, pad: (j <= i) & pad[b, j], True),
    "int_mask_and_causal": (lambda i, j, b, pad: pad.long().bool()[b, j] & (j <= i), True),
    # (B, 1, 1, S) by a shape given as sizes, as a tuple with -1, or read from the tensor (x-transformers, timm).
    "view": (lambda i, j, b, pad: pad.view(pad.shape[0], 1, 1, pad.shape[1]), False),
    "reshape_tuple_and_causal": (lambda i, j, b, pad: (j <= i) & pad.reshape((pad.shape[0], 1, 1, -1)), True),
    "view_of_a_view": (lambda i, j, b, pad: pad.view(pad.shape[0], 1, pad.shape[1]).view(pad.shape[0], 1, 1, -1),
                       False),
}


@pytest.mark.parametrize("right", [True, False], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("name", list(PADDED))
def test_key_padding_masks_become_fa4_key_padding(name, additive, right):
    build, causal = PADDED[name]

    def fn(q, k, v, pad):
        i, j = _idx(q.shape[2], k.shape[2])
        b = torch.arange(q.shape[0])[:, None, None, None]
        mask = build(i, j, b, pad).expand(q.shape[0], 1, q.shape[2], k.shape[2])
        if additive:
            mask = torch.where(mask, 0.0, torch.finfo(q.dtype).min).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    pad = _padding(right)
    # Left padding + causal leaves query rows with no key, where stock and FA4 differ (don't-care rows):
    # compare the rows that see a key.
    q, k, v = _qkv()
    seen = (pad[:, None, None, :] & (torch.ones(S, S, dtype=torch.bool).tril() if causal else True)).any(-1)
    want = fn(q, k, v, pad) * seen[..., None]
    want_grads = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(fn, fullgraph=True)(q, k, v, pad)
    assert torch.isfinite(got).all() and not got[~seen.expand_as(got[..., 0])].any()  # empty rows are zeros
    got_grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    (record,) = stats.site_records()
    assert record.decision == "fa4", record.reason
    assert record.features["padding"] and record.features["causal"] == causal
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=8e-2, rtol=8e-2)


def test_key_padding_under_dynamic_shapes_guards_mask_width_equals_key_length():
    """The (B, S) mask input's width is its own symbol under dynamic=True: a guard ties it to S_kv."""
    def fn(x, pad):
        q, k, v = x, x * 0.5, x + 1.0  # one input, like q/k/v projected from one hidden state
        i, j = _idx(q.shape[2], k.shape[2])
        b = torch.arange(q.shape[0])[:, None, None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & pad[b, j])
    x = torch.randn(B, H, S, D, dtype=torch.bfloat16)
    x2 = torch.randn(B, H, S + 4, D, dtype=torch.bfloat16)
    pad2 = torch.ones(B, S + 4, dtype=torch.bool)
    pad2[0, -3:] = False
    # Without duck shaping, equal sizes of different inputs get different symbols (as HF's mask does).
    with torch.fx.experimental._config.patch(use_duck_shape=False), \
            fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        got = compiled(x, _padding(right=False))
        assert stats.site_records()[-1].decision == "fa4", stats.site_records()[-1].reason
        got2 = compiled(x2, pad2)
    assert len(stats.site_records()) == 1, "a new length recompiled"
    torch.testing.assert_close(got2, fn(x2, pad2), atol=3e-2, rtol=3e-2)
    seen = _padding(right=False)[:, None, None, :] & torch.ones(S, S, dtype=torch.bool).tril()
    want = fn(x, _padding(right=False)) * seen.any(-1)[..., None]
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


OVER_A_BIAS = {  # Hugging Face's SDPA path lays a boolean mask over a position bias: T5's cross-attention's is zeros
    "zeros_bias": (lambda q, i, j, pad: torch.where(
        pad[:, None, None, :], torch.zeros(1, q.shape[1], q.shape[2], q.shape[2], dtype=q.dtype),
        torch.finfo(q.dtype).min), False),
    "negated_condition": (lambda q, i, j, pad: torch.where(
        ~pad[:, None, None, :], -math.inf, torch.zeros(1, 1, q.shape[2], q.shape[2], dtype=q.dtype)), False),
    "causal_bias": (lambda q, i, j, pad: torch.where(
        pad[:, None, None, :], torch.full((q.shape[2], q.shape[2]), -math.inf, dtype=q.dtype).triu(1),
        torch.finfo(q.dtype).min), True),
}


@pytest.mark.parametrize("name", list(OVER_A_BIAS))
def test_boolean_mask_laid_over_a_zero_or_causal_bias_is_key_padding(name):
    build, causal = OVER_A_BIAS[name]

    def fn(q, k, v, pad):
        i, j = _idx(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build(q, i, j, pad))
    pad = _padding()
    record = _check(lambda q, k, v: fn(q, k, v, pad), *_qkv())
    assert record.features["padding"] and record.features["causal"] == causal


def test_boolean_mask_laid_over_a_bias_tensor_takes_pytorchs_route_at_run_time():
    """A bias tensor under a padding mask: data, read at run time, where its values are no FA4 mask."""
    bias, pad = torch.randn(1, H, S, S, dtype=torch.bfloat16), _padding()

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(
            pad[:, None, None, :], bias * 2, torch.finfo(q.dtype).min))
    record = _check(fn, *_qkv())
    assert record.features["mask"] == "data, checked at run time"
    assert stats.counters["data_mask.pytorch"] >= 1 and stats.counters["data_mask.fa4"] == 0


def test_a_learned_bias_stays_pytorchs_saying_it_needs_a_gradient():
    bias = torch.nn.Parameter(torch.randn(1, H, S, S, dtype=torch.bfloat16))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    record = _check(fn, *_qkv(), expect_fa4=False)
    assert "needs a gradient" in record.reason, record.reason


@pytest.mark.parametrize("build, pad", [
    (lambda i, j, pad: pad[:, None, :, None], _padding()),  # padding along the queries
    (lambda i, j, pad: pad[:, None], torch.rand(B, S, S) > 0.5),  # a dense (B, S, S) mask
])
def test_masks_read_from_data_are_checked_at_run_time(build, pad):
    def fn(q, k, v):
        i, j = _idx(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build(i, j, pad))
    record = _check(fn, *_qkv())
    assert record.features["mask"] == "data, checked at run time"


@pytest.mark.parametrize("build, pad, reason", [
    (lambda i, j, pad: (j <= i) | pad[:, None, None, :], torch.ones(B, S, dtype=torch.bool), "not and-ed"),
    (lambda i, j, pad: pad.view(B * S).view(B, 1, 1, S), torch.ones(B, S, dtype=torch.bool),
     "only adding or removing axes of size 1"),
])
def test_padding_masks_fa4_cannot_express_fall_back(build, pad, reason):
    def fn(q, k, v, pad):
        i, j = _idx(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build(i, j, pad))
    q, k, v = (t.detach() for t in _qkv())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(fn)(q, k, v, pad)
    assert reason in stats.site_records()[0].reason


@pytest.mark.parametrize("q_len", [1, 3])
def test_decoding_step_mask_input_becomes_key_padding(q_len):
    """A (B, 1, 1, S_kv) bool mask input, what a static-cache decoding step gets: FA4 key padding."""
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., :7] = True  # the cache filled up to position 7 in row 0
    mask[1, ..., 3:10] = True  # row 1 left-padded by 3

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    record = _check(fn, *_qkv(sq=q_len))
    assert record.features["padding"] and not record.features["causal"]


@pytest.mark.parametrize("style", ["expand_reshape", "repeat_interleave"])
def test_gqa_repeat_is_removed(style):
    def repeat(x, r):
        if style == "repeat_interleave":
            return x.repeat_interleave(r, dim=1)
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, r, s, d).reshape(b, h * r, s, d)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, repeat(k, 2), repeat(v, 2), is_causal=True)
    record = _check(fn, *_qkv(hkv=2))
    assert record.features["gqa_repeat_removed"] is True and record.features["gqa_ratio"] == 2


def _eager_attention(scale_style="mul", softcap=None, mask=True, dropout=(0.0, False), cast=True):
    def fn(q, k, v):
        scores = torch.matmul(q, k.transpose(2, 3))
        scores = scores * (D ** -0.5) if scale_style == "mul" else scores / math.sqrt(D)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if mask:
            i, j = _idx(q.shape[2], k.shape[2])
            scores = scores + torch.where(j <= i, 0.0, torch.finfo(q.dtype).min).to(q.dtype)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        if cast:
            probs = probs.to(q.dtype)
        probs = F.dropout(probs, p=dropout[0], training=dropout[1])
        return torch.matmul(probs, v)
    return fn


@pytest.mark.parametrize("kwargs", [dict(), dict(scale_style="div"), dict(softcap=3.0), dict(mask=False),
                                    dict(dropout=(0.1, False))], ids=str)
def test_hand_written_attention_becomes_fa4(kwargs):
    record = _check(_eager_attention(**kwargs), *_qkv())
    assert record.pattern == "eager_attention"
    assert record.features["causal"] is kwargs.get("mask", True)
    assert record.features["softcap"] == kwargs.get("softcap")


def test_hand_written_attention_with_training_dropout_falls_back():
    q, k, v = (t.detach() for t in _qkv())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(_eager_attention(dropout=(0.1, True)))(q, k, v)
    assert "dropout_p=0.1" in stats.site_records()[0].reason


def test_attention_weights_used_elsewhere_fall_back():
    def fn(q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return probs @ v, probs
    q, k, v = (t.detach() for t in _qkv())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(fn)(q, k, v)
    assert "users" in stats.site_records()[0].reason


def test_non_attention_softmax_is_not_a_site():
    def fn(x):
        return torch.softmax(x, dim=-1)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(fn)(torch.randn(4, 8))
    assert stats.site_records() == []


def _window_env():
    """A ShapeEnv with a captured window size (8), cache offsets and query / key lengths, as ``dynamic=True`` makes
    them of a Hugging Face mask function: sizes come from tensors, the rest from captured ints."""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv(specialize_zero_one=False)

    def symbol(value, source):
        return env.create_symbol(value, source, dynamic_dim=DimDynamic.DYNAMIC)

    def size(name, value):
        return symbol(value, TensorPropertySource(LocalSource(name), TensorProperty.SIZE, 1))

    return env, symbol, size


@pytest.mark.parametrize("offsets, lengths", [((0, 0), (16, 16)), ((17, 0), (1, 18))], ids=["prefill", "decoding"])
def test_captured_window_size_is_taken_at_its_value_and_cache_offsets_stay_symbolic(offsets, lengths):
    """The left window of ``kv_idx + kv_offset > q_idx + q_offset - window`` with FA4's bottom-right alignment
    (``S_kv - S_q``): the window becomes 8 under a guard on it alone; the offsets are only guarded to cancel with
    the lengths, so a decoding step's next offset reuses the graph."""
    from torch._dynamo.source import LocalSource

    from fa4_inductor.compile import mask_analysis

    env, symbol, size = _window_env()
    window = symbol(8, LocalSource("window"))
    q_offset, kv_offset = (symbol(value, LocalSource(name)) for value, name in zip(offsets, ("q_offset", "kv_offset")))
    q_len, kv_len = size("q", lengths[0]), size("k", lengths[1])
    left = (kv_len - q_len) - (q_offset - kv_offset - window + 1)
    assert mask_analysis._constant_part(left, env) == 7
    guarded = [str(guard.expr) for guard in env.guards]
    assert f"Eq({window}, 8)" in guarded and len(guarded) == 2  # the window, and the offsets cancelling the lengths
    assert not any(str(q_offset) in g and str(kv_offset) not in g for g in guarded)


def test_a_window_made_of_a_length_or_of_two_captured_ints_stays_symbolic():
    from torch._dynamo.source import LocalSource

    from fa4_inductor.compile import mask_analysis

    env, symbol, size = _window_env()
    q_len = size("q", 16)
    first, second = symbol(4, LocalSource("a")), symbol(4, LocalSource("b"))
    for left in (q_len - 1, first + second - 1):
        assert mask_analysis._constant_part(left, env).free_symbols
