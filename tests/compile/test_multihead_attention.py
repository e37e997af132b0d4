"""``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers under the plugin, compiled on CPU (reference
kernels) against eager: the attention runs FA4 with the structure its masks have, output and gradients match;
what FA4 can't compute stays PyTorch's, with the reason."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats
from tests.compare import assert_matches_eager

pytestmark = pytest.mark.usefixtures("no_compile_cache")

E, H, L, S, B = 32, 4, 12, 16, 2
BF16 = torch.bfloat16


def _module(cls=nn.MultiheadAttention, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).to(BF16)


def _tokens(*shape, seed=1):
    return torch.randn(*shape, dtype=BF16, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def _padding(rows=B, length=L):
    """True marks a padded key, as nn.MultiheadAttention takes it: row 1 has its last 5 keys padded."""
    padding = torch.zeros(rows, length, dtype=torch.bool)
    padding[1, length - 5:] = True
    return padding


def _causal_float(length):
    return nn.Transformer.generate_square_subsequent_mask(length, dtype=BF16)


def _sequence_first(batch_first):
    return (B, L, E) if batch_first else (L, B, E)


# name: (module kwargs, inputs(batch_first) -> (leaves, extra), call(module, *leaves, *extra), causal, padding)
CASES = {
    "self_weights_unread": ({}, lambda bf: ([_tokens(*_sequence_first(bf))], ()),
                            lambda m, x: m(x, x, x)[0], False, False),
    "self_need_weights_false": ({}, lambda bf: ([_tokens(*_sequence_first(bf))], ()),
                                lambda m, x: m(x, x, x, need_weights=False)[0], False, False),
    "causal_hint": ({}, lambda bf: ([_tokens(*_sequence_first(bf))], ()),
                    lambda m, x: m(x, x, x, need_weights=False, attn_mask=_causal_float(L), is_causal=True)[0],
                    True, False),
    "causal_float_mask_weights_unread": ({}, lambda bf: ([_tokens(*_sequence_first(bf))], ()),
                                         lambda m, x: m(x, x, x, attn_mask=_causal_float(L))[0], True, False),
    "causal_bool_mask": ({}, lambda bf: ([_tokens(*_sequence_first(bf))], ()),
                         lambda m, x: m(x, x, x, need_weights=False,
                                        attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1))[0], True, False),
    "key_padding": ({}, lambda bf: ([_tokens(*_sequence_first(bf))], (_padding(),)),
                    lambda m, x, p: m(x, x, x, key_padding_mask=p, need_weights=False)[0], False, True),
    "key_padding_and_causal": ({}, lambda bf: ([_tokens(*_sequence_first(bf))], (_padding(),)),
                               lambda m, x, p: m(x, x, x, key_padding_mask=p, need_weights=False,
                                                 attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1))[0],
                               True, True),
    "cross_attention": ({}, lambda bf: ([_tokens(*_sequence_first(bf)),
                                         _tokens(*((B, S, E) if bf else (S, B, E)), seed=2)], ()),
                        lambda m, x, y: m(x, y, y, need_weights=False)[0], False, False),
    "cross_attention_padded_memory": ({}, lambda bf: ([_tokens(*_sequence_first(bf)),
                                                       _tokens(*((B, S, E) if bf else (S, B, E)), seed=2)],
                                                      (_padding(length=S),)),
                                      lambda m, x, y, p: m(x, y, y, key_padding_mask=p, need_weights=False)[0],
                                      False, True),
    "three_inputs": ({}, lambda bf: ([_tokens(*_sequence_first(bf), seed=s) for s in (1, 2, 3)], ()),
                     lambda m, q, k, v: m(q, k, v, need_weights=False)[0], False, False),
    "separate_projections": ({"kdim": 24, "vdim": 40},
                             lambda bf: ([_tokens(*_sequence_first(bf)),
                                          _tokens(*((B, S, 24) if bf else (S, B, 24)), seed=2),
                                          _tokens(*((B, S, 40) if bf else (S, B, 40)), seed=3)], ()),
                             lambda m, q, k, v: m(q, k, v, need_weights=False)[0], False, False),
    "no_bias": ({"bias": False}, lambda bf: ([_tokens(*_sequence_first(bf))], ()),
                lambda m, x: m(x, x, x, need_weights=False, attn_mask=_causal_float(L), is_causal=True)[0],
                True, False),
    "unbatched": ({}, lambda bf: ([_tokens(L, E)], ()),
                  lambda m, x: m(x, x, x, need_weights=False, attn_mask=_causal_float(L), is_causal=True)[0],
                  True, False),
}


def _site_records():
    return [r for r in stats.site_records() if r.pattern == "multihead_attention"]


# Both layouts where the layout changes what the graph holds (the transposes MultiheadAttention adds around
# F.multi_head_attention_forward keep which inputs are one tensor); the rest batch-first only.
BOTH_LAYOUTS = ("self_weights_unread", "key_padding", "cross_attention", "separate_projections")


@pytest.mark.parametrize("name, batch_first", [
    pytest.param(name, batch_first, id=f"{name}-{'batch_first' if batch_first else 'sequence_first'}")
    for name in CASES for batch_first in ((True, False) if name in BOTH_LAYOUTS else (True,))])
def test_multihead_attention_runs_fa4_and_matches_eager(name, batch_first):
    causal, padding = _compile_case(name, batch_first)
    (record,) = _site_records()
    assert record.decision == "fa4", record.reason
    assert (record.features["causal"], record.features["padding"]) == (causal, padding)


def _compile_case(name, batch_first, dynamic=False):
    """Compile the case with the plugin and check it against eager; returns its expected (causal, padding)."""
    kwargs, inputs, call, causal, padding = CASES[name]
    module = _module(nn.MultiheadAttention, E, H, batch_first=batch_first, **kwargs)
    leaves, extra = inputs(batch_first)

    def fn(*args):
        return call(module, *args)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(fn, torch.compile(fn, fullgraph=True, dynamic=dynamic), leaves, extra, label=name)
    return causal, padding


@pytest.mark.parametrize("name", ["key_padding_and_causal", "cross_attention"])
def test_multihead_attention_under_dynamic_shapes(name):
    _compile_case(name, True, dynamic=True)
    # Dynamo compiles this frame twice under dynamic=True, without the plugin too.
    assert {(r.decision, r.reason) for r in _site_records()} == {("fa4", None)}


def test_multihead_attention_in_inference():
    module = _module(nn.MultiheadAttention, E, H, batch_first=True).eval()
    x, padding = _tokens(B, L, E).detach(), _padding()

    def fn(x, padding):
        return module(x, x, x, key_padding_mask=padding, need_weights=False)[0]

    with torch.no_grad(), fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, padding), fn(x, padding), atol=3e-2, rtol=3e-2)
    assert [r.decision for r in _site_records()] == ["fa4"]


def _coca_cls_mask(padding):
    """open_clip CoCa's text-tower mask over L tokens, the last a CLS token: causal, and the CLS row alone hides
    the padded text tokens (``F.pad`` of the kept tokens, an additive mask repeated over heads with
    ``repeat_interleave``: (B * heads, L, L)). The rows before the CLS see padded keys, so this is no FA4 mask."""
    kept = F.pad(~padding[:, None, :-1], (1, 0, padding.shape[1] - 1, 0), value=True)
    additive = torch.empty(kept.shape, dtype=BF16)
    additive.fill_(0)
    additive.masked_fill_(~kept, float("-inf"))
    causal = torch.full((L, L), float("-inf")).triu(1).to(BF16)
    return causal[None] + torch.repeat_interleave(additive, H, 0)


FALLBACKS = {  # name: (module kwargs, call, reason fragment)
    "weights_read": ({}, lambda m, x, p: (lambda out: out[0] + out[1].sum())(m(x, x, x)),
                     "the attention weights are read"),
    "weights_unread_with_padding": ({}, lambda m, x, p: m(x, x, x, key_padding_mask=p)[0],
                                    "PyTorch's weights path gives NaN in a row whose every key is masked"),
    "bias_kv": ({"add_bias_kv": True}, lambda m, x, p: m(x, x, x, need_weights=False)[0], "add_bias_kv=True"),
    "zero_attn": ({"add_zero_attn": True}, lambda m, x, p: m(x, x, x, need_weights=False)[0], "add_zero_attn=True"),
    "open_clip_coca_cls_mask": ({}, lambda m, x, p: m(x, x, x, attn_mask=_coca_cls_mask(p), need_weights=False)[0],
                                "heads folded into the batch"),
}


@pytest.mark.parametrize("name", FALLBACKS)
def test_what_fa4_cannot_compute_stays_with_its_reason(name):
    kwargs, call, reason = FALLBACKS[name]
    module = _module(nn.MultiheadAttention, E, H, batch_first=True, **kwargs)

    def fn(x, padding):
        return call(module, x, padding)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(fn, torch.compile(fn, fullgraph=True), [_tokens(B, L, E)], (_padding(),), label=name)
    (record,) = _site_records()
    assert record.decision == "fallback" and reason in record.reason


def test_dropout_in_training_stays_with_its_reason():
    module = _module(nn.MultiheadAttention, E, H, batch_first=True, dropout=0.1)
    x = _tokens(B, L, E)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(lambda x: module(x, x, x, need_weights=False)[0], fullgraph=True)(x).sum().backward()
    (record,) = _site_records()
    assert record.decision == "fallback" and "FA4 has no dropout" in record.reason


def _encoder_layer(**kwargs):
    return _module(nn.TransformerEncoderLayer, E, H, 64, dropout=0.0, batch_first=True, **kwargs)


LAYERS = {  # name: (layer, inputs -> (leaves, extra), call, sites as (causal, padding))
    "encoder_causal": (_encoder_layer, lambda: ([_tokens(B, L, E)], ()),
                       lambda m, x: m(x, src_mask=_causal_float(L), is_causal=True), [(True, False)]),
    "encoder_norm_first_gelu_padded": (lambda: _encoder_layer(norm_first=True, activation="gelu"),
                                       lambda: ([_tokens(B, L, E)], (_padding(),)),
                                       lambda m, x, p: m(x, src_key_padding_mask=p), [(False, True)]),
    "decoder": (lambda: _module(nn.TransformerDecoderLayer, E, H, 64, dropout=0.0, batch_first=True),
                lambda: ([_tokens(B, L, E), _tokens(B, S, E, seed=2)], (_padding(length=S),)),
                lambda m, x, memory, p: m(x, memory, tgt_mask=_causal_float(L), tgt_is_causal=True,
                                          memory_key_padding_mask=p), [(True, False), (False, True)]),
}


@pytest.mark.parametrize("name", LAYERS)
def test_transformer_layers_run_fa4_in_training(name):
    layer, inputs, call, sites = LAYERS[name]
    module = layer()
    leaves, extra = inputs()

    def fn(*args):
        return call(module, *args)

    # Eager's bf16 gradients are ~0.02 (of the largest) from float32 ones here; the plugin's ~0.007.
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(fn, torch.compile(fn, fullgraph=True), leaves, extra, grad_atol=4e-2, label=name)
    records = _site_records()
    assert [r.decision for r in records] == ["fa4"] * len(sites), [r.reason for r in records]
    assert [(r.features["causal"], r.features["padding"]) for r in records] == sites


INFERENCE = {  # name: (layer kwargs, call, sites as (causal, padding))
    "plain": ({}, lambda m, x, p: m(x), (False, False)),
    "padded": ({}, lambda m, x, p: m(x, src_key_padding_mask=p), (False, True)),
    "causal": ({}, lambda m, x, p: m(x, src_mask=_causal_float(L), is_causal=True), (True, False)),
    "norm_first_gelu_padded": ({"norm_first": True, "activation": "gelu"},
                               lambda m, x, p: m(x, src_key_padding_mask=p), (False, True)),
}


def _encoder_fast_path_inputs(every_key_padded=False):
    padding = _padding()
    if every_key_padded:
        padding[1] = True
    return _tokens(B, L, E).detach(), padding


@pytest.mark.parametrize("name", INFERENCE)
def test_encoder_layer_fast_path_runs_fa4_in_inference(name):
    kwargs, call, site = INFERENCE[name]
    module = _encoder_layer(**kwargs).eval()
    x, padding = _encoder_fast_path_inputs()

    def fn(x, padding):
        return call(module, x, padding)

    with torch.no_grad(), fa4_inductor.enabled(eager=False, devices=("cpu",)):
        want = fn(x, padding)  # eager: the fused torch._transformer_encoder_layer_fwd
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, padding), want, atol=3e-2, rtol=3e-2)
    (record,) = [r for r in stats.site_records() if r.pattern == "transformer_encoder_layer"]
    assert record.decision == "fa4", record.reason
    assert (record.features["causal"], record.features["padding"]) == site


def test_encoder_layer_fast_path_keeps_nan_where_every_key_is_padded():
    """The fused op gives NaN in a batch row with no key to attend to; so does its FA4 form (FA4 gives zeros)."""
    module = _encoder_layer().eval()
    x, padding = _encoder_fast_path_inputs(every_key_padded=True)

    def fn(x, padding):
        return module(x, src_key_padding_mask=padding)

    with torch.no_grad(), fa4_inductor.enabled(eager=False, devices=("cpu",)):
        want, got = fn(x, padding), torch.compile(fn, fullgraph=True)(x, padding)
    assert want[1].isnan().all() and not want[0].isnan().any()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2, equal_nan=True)
    assert [r.decision for r in stats.site_records()] == ["fa4"]


def test_encoder_layer_fast_path_with_a_mask_that_may_hide_rows_stays_with_its_reason():
    module = _encoder_layer().eval()
    x, padding = _encoder_fast_path_inputs()

    def fn(x, padding):
        return module(x, src_mask=_causal_float(L), src_key_padding_mask=_additive(padding))

    with torch.no_grad(), fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, padding), fn(x, padding), atol=3e-2, rtol=3e-2)
    (record,) = stats.site_records()
    assert record.decision == "fallback" and "gives NaN in a row whose every key is masked" in record.reason


def _additive(padding):
    return torch.zeros(padding.shape, dtype=BF16).masked_fill(padding, float("-inf"))
