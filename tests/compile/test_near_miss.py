"""Sound by construction: near misses of the constructs the patterns accept are exact on whichever path the plugin
takes, and the four red-team causes (slices and size-1 broadcasting, bool conversions of masks, a division's
rounding mode, a broadcast padding input) are each exact or fall back with a reason naming the construct.

Errors are judged against float32 eager with eager bf16 as the noise floor, gradients of a random cotangent on one
scale for q, k and v.
"""

import collections
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from fa4_inductor import stats
from fa4_inductor.compile import modeled_ops
from tests.compare import EXCEPTION_TEXT, rewriting_backend
from tests.compile.near_miss_programs import CONSTRUCTS, MUTATIONS, NearMiss, near_misses

log = logging.getLogger(__name__)
pytestmark = pytest.mark.usefixtures("no_compile_cache")

NEAR_MISSES = 2 * len(CONSTRUCTS) * len(MUTATIONS)


def _grads(weighted, leaves):
    """The gradients of ``weighted.sum()`` (zeros for a leaf the program does not read)."""
    grads = torch.autograd.grad(weighted.sum(), leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def _errors(fn, compiled, leaves, extra, seed):
    """(compiled's, eager bf16's) largest error against float32 eager, output and gradients each relative to the
    reference's largest entry (one scale for all three gradients)."""
    reference = [t.detach().float().requires_grad_(True) for t in leaves]
    want = fn(*reference, *extra)
    cotangent = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed))
    want_grads = _grads(want * cotangent, reference)
    out_scale = want.abs().max().clamp_min(1e-6)
    grad_scale = max(g.abs().max() for g in want_grads).clamp_min(1e-6)

    def error(run):
        got = run(*leaves, *extra)
        grads = _grads(got.float() * cotangent, leaves)
        return max([((got.float() - want).abs().max() / out_scale).item(),
                    *(((g.float() - w).abs().max() / grad_scale).item() for g, w in zip(grads, want_grads))])
    return error(compiled), error(fn)


def _check(miss: NearMiss) -> tuple[list, float, float]:
    leaves, extra = miss.inputs()
    records: list = []
    torch._dynamo.reset()
    compiled = torch.compile(miss.function(), backend=rewriting_backend(records), dynamic=miss.dynamic,
                             fullgraph=True)
    got, eager = _errors(miss.function(), compiled, leaves, extra, miss.seed)
    return records, got, eager


def _within_noise(got: float, eager: float) -> bool:
    return math.isfinite(got) and got <= 2 * eager + 2e-2


def test_near_misses_are_exact_on_whichever_path_the_plugin_takes():
    wrong, decisions = [], collections.Counter()
    for miss in near_misses(NEAR_MISSES):
        records, got, eager = _check(miss)
        assert not [r.reason for r in records if EXCEPTION_TEXT.search(r.reason or "")], miss
        decision = "fa4" if any(r.decision == "fa4" for r in records) else "stays"
        decisions[(miss.mutation, decision)] += 1
        if not _within_noise(got, eager):
            wrong.append((miss, decision, got, eager, [r.reason for r in records]))
    log.warning("near misses: %s", dict(decisions))
    assert not wrong, wrong
    # The unmutated constructs and the meaning-keeping mutants run FA4; the mutants FA4 can express too.
    for mutation in ("none", "bound_plus_one", "bool_to_long_to_bool", "slice_column"):
        assert decisions[(mutation, "fa4")] > 0, (mutation, dict(decisions))


SLICES = {  # a mask or its padding input sliced to one entry along one axis, then broadcast
    "band_rows": lambda keep, pad: keep[:1],
    "band_columns": lambda keep, pad: keep[:, :1],
    "band_batch": lambda keep, pad: (keep & pad[:, None, None, :])[:1],
    "band_heads": lambda keep, pad: (keep & pad[:, None, None, :]).expand(2, 3, -1, -1)[:, :1],
    "padding_rows": lambda keep, pad: pad[:1][:, None, None, :],
    "padding_columns": lambda keep, pad: pad[:, :1][:, None, None, :],
    "padding_rows_after": lambda keep, pad: pad[:, None, None, :][:1],
    "band_middle": lambda keep, pad: keep[2:3],
    "band_from_end": lambda keep, pad: keep[-1:],
    "band_integer_row": lambda keep, pad: keep[3][None, :],
    "band_negative_integer_row": lambda keep, pad: keep[-2][None, :],
}


def _causal(s):
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return j <= i


def _leaves(batch=2, heads=3, s=12, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, s, d, generator=generator).to(torch.bfloat16).requires_grad_(True)
            for _ in range(3)]


def _padding(batch=2, s=12):
    pad = torch.ones(batch, s, dtype=torch.bool)
    pad[-1, s - 4:] = False
    return pad


def _assert_exact_or_reasoned(fn, leaves, extra=(), dynamic=False):
    records: list = []
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=rewriting_backend(records), dynamic=dynamic, fullgraph=True)
    got, eager = _errors(fn, compiled, leaves, extra, seed=3)
    assert _within_noise(got, eager), (got, eager, [(r.decision, r.reason) for r in records])
    for record in records:
        assert record.decision == "fa4" or (record.reason and not EXCEPTION_TEXT.search(record.reason)), record
    return records


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", list(SLICES))
def test_a_mask_sliced_to_one_entry_and_broadcast_is_read_at_that_entry(name, dynamic):
    slicer = SLICES[name]

    def fn(q, k, v, pad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=slicer(_causal(q.shape[2]), pad))
    records = _assert_exact_or_reasoned(fn, _leaves(), (_padding(),), dynamic)
    if name == "band_columns":  # key 0 is visible to every row: full attention, which FA4 computes
        assert [r.decision for r in records] == ["fa4"]


CONVERSIONS = {  # masks of either polarity, converted both ways
    "additive_to_bool": lambda keep, dtype: torch.where(keep, 0.0, -math.inf).bool(),
    "additive_finfo_to_bool": lambda keep, dtype: torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype).bool(),
    "bool_filled_with_inf": lambda keep, dtype: torch.ones_like(keep).masked_fill(~keep, -math.inf),
    "bool_filled_with_zero": lambda keep, dtype: torch.ones_like(keep).masked_fill(~keep, 0),
    "bool_to_float": lambda keep, dtype: keep.to(dtype),
    "bool_to_long_to_bool": lambda keep, dtype: keep.long().bool(),
    "additive_equals_zero": lambda keep, dtype: torch.where(keep, 0.0, -math.inf) == 0,
    "additive_below_zero": lambda keep, dtype: torch.where(keep, 0.0, -math.inf) < 0,
    "logical_not_of_additive": lambda keep, dtype: torch.logical_not(torch.where(keep, 0.0, -math.inf)),
    "long_inverted": lambda keep, dtype: (~keep.long()).bool(),
    "where_of_booleans": lambda keep, dtype: torch.where(keep, True, False),
    "equals_true": lambda keep, dtype: keep == True,  # noqa: E712
    "equals_false": lambda keep, dtype: keep == False,  # noqa: E712
}


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_a_mask_converted_between_bool_and_float_keeps_its_values(name):
    convert = CONVERSIONS[name]

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=convert(_causal(q.shape[2]), q.dtype))
    records = _assert_exact_or_reasoned(fn, _leaves())
    if name in ("bool_filled_with_zero", "bool_to_long_to_bool", "additive_equals_zero", "where_of_booleans",
                "logical_not_of_additive", "equals_true"):
        assert [(r.decision, r.features["causal"]) for r in records] == [("fa4", True)], records
    if name == "bool_filled_with_inf":  # -inf is nonzero: True everywhere, full attention
        assert [(r.decision, r.features["causal"]) for r in records] == [("fa4", False)], records


@pytest.mark.parametrize("where", ["scores", "query", "key"])
@pytest.mark.parametrize("rounding_mode", [None, "trunc", "floor"])
def test_a_division_is_a_scale_only_without_a_rounding_mode(rounding_mode, where):
    def divided(x):
        return torch.div(x, 4.0, rounding_mode=rounding_mode)

    def fn(q, k, v):
        if where == "query":
            q = divided(q * 3.0)
        if where == "key":
            k = divided(k * 3.0)
        scores = q @ k.transpose(-2, -1)
        return (divided(scores) if where == "scores" else scores).softmax(-1) @ v
    records = _assert_exact_or_reasoned(fn, _leaves())
    (record,) = records
    if rounding_mode is None:
        assert record.decision == "fa4"
    else:
        assert record.decision == "fallback" and f"rounding_mode='{rounding_mode}'" in record.reason, record.reason


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("shape", ["(B, S)", "(1, S)", "(B, 1, 1, S)", "(1, 1, 1, S)", "(S,)"])
def test_a_padding_input_of_every_broadcastable_size_is_exact_and_never_crashes(shape, dynamic):
    """Key padding given with one row for the whole batch, or in every broadcastable rank, never reaches FA4 with
    the wrong size."""
    full = _padding()
    pad = {"(B, S)": full, "(1, S)": full[-1:], "(B, 1, 1, S)": full[:, None, None, :],
           "(1, 1, 1, S)": full[-1:, None, None, :], "(S,)": full[-1]}[shape]

    def fn(q, k, v, pad):
        mask = pad if pad.dim() == 4 else pad[None, None, None, :] if pad.dim() == 1 else pad[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    records = _assert_exact_or_reasoned(fn, _leaves(), (pad,), dynamic)
    if shape in ("(B, S)", "(B, 1, 1, S)"):
        assert [(r.decision, r.features["padding"]) for r in records] == [("fa4", True)], records


@pytest.mark.parametrize("rows", [2, 1])
@pytest.mark.parametrize("lengths", ["(B,)", "(1,)"])
def test_segment_ids_and_key_lengths_of_every_broadcastable_size_are_exact(rows, lengths):
    """Document ids (B, S) or one row for the batch, with key lengths (B,) or one for the batch."""
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 8 + [1] * 4])[:rows]
    key_lengths = torch.tensor([12, 9])[: 2 if lengths == "(B,)" else 1]

    def fn(q, k, v, segments, key_lengths):
        j = torch.arange(q.shape[2])
        same = segments[:, None, :, None] == segments[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=same & (j < key_lengths[:, None, None, None]))
    records = _assert_exact_or_reasoned(fn, _leaves(), (segments, key_lengths))
    if rows == 2 and lengths == "(B,)":
        assert [r.decision for r in records] == ["fa4"], [(r.decision, r.reason) for r in records]


def test_a_padding_mask_compared_with_true_and_or_ed_with_causal_stays_exact():
    """``pad == True`` is the padding itself: or-ed with causal it is no FA4 mask (each row sees the keys either
    allows), and must not lose the padding on the way."""
    def fn(q, k, v, pad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(pad[:, None, None, :] == True)  # noqa: E712
                                              | _causal(q.shape[2]))
    (record,) = _assert_exact_or_reasoned(fn, _leaves(), (_padding(),))
    assert record.decision == "fallback", record


def test_a_padding_row_broadcast_over_the_batch_is_checked_at_run_time():
    """One padding row for the whole batch: no compile-time key padding (FA4's has a row per batch row), so its
    values are read at run time, where that row is every row's key padding."""
    pad = _padding()[-1:]

    def fn(q, k, v, pad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :])
    (record,) = _assert_exact_or_reasoned(fn, _leaves(), (pad,))
    assert record.decision == "fa4" and record.features["mask"] == "data, checked at run time", record
    assert stats.counters["data_mask.fa4"] >= 1 and stats.counters["data_mask.pytorch"] == 0


@pytest.mark.parametrize("name, build, words", [
    ("alpha", lambda i, j: torch.sub(j, i, alpha=2) <= 0, "alpha=2"),
    ("add_alpha", lambda i, j: torch.add(j, i, alpha=-1) <= 0, "alpha=-1"),
    ("arange_step", lambda i, j: torch.arange(0, 2 * j.shape[-1], 2)[None, :] <= i, "step"),
    ("transposed", lambda i, j: (j <= i).transpose(0, 1), "transpose"),
])
def test_an_argument_the_table_does_not_model_falls_back_naming_it(name, build, words):
    def fn(q, k, v):
        s = q.shape[2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=build(torch.arange(s)[:, None],
                                                                       torch.arange(s)[None, :]))
    (record,) = _assert_exact_or_reasoned(fn, _leaves())
    assert record.decision == "fallback" and words in record.reason, record.reason


def test_the_table_models_every_parameter_or_names_it():
    """Each entry lists its parameters once; an unknown keyword, an extra positional argument and a non-default
    value are refused with the op's name."""
    for name, entry in modeled_ops.TABLE.items():
        assert len(set(entry.parameters)) == len(entry.parameters), name
        assert entry.semantics, name
    div = modeled_ops.TABLE["div"]
    assert div.unmodeled("div", ("x", 2.0), {}) is None
    assert div.unmodeled("div", ("x", 2.0), {"rounding_mode": None}) is None
    assert "rounding_mode='floor'" in div.unmodeled("div", ("x", 2.0), {"rounding_mode": "floor"})
    assert "out=" in modeled_ops.TABLE["lt"].unmodeled("lt", ("x", 1), {"out": "y"})
    assert "3 positional" in modeled_ops.TABLE["lt"].unmodeled("lt", ("x", 1, 2), {})
    assert modeled_ops.TABLE["add"].unmodeled("add", ("x", 1), {"alpha": 1.0}) is None
    assert modeled_ops.TABLE["expand"].unmodeled("expand", ("x", 2, 3, 4), {}) is None


def test_a_flex_score_mod_with_a_rounding_division_stays(monkeypatch):
    from torch.nn.attention import flex_attention as flex_module
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)

    def fn(q, k, v):
        return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: torch.div(s, 2.0, rounding_mode="floor"))
    records: list = []
    torch.compile(fn, backend=rewriting_backend(records), fullgraph=True)(*(t.detach() for t in _leaves()))
    assert [r.decision for r in records] == ["fallback"] and "rounding_mode" in records[0].reason, records


def _gqa_repeat_kv(x, r):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, r, s, d).reshape(b, h * r, s, d)


def _softcapped(scores, outer, inner):
    return torch.tanh(scores / inner) * outer


HELD = {  # red-team classes that held on main: each stays exact (and runs FA4 where marked)
    "gqa_repeat_kv": (lambda q, k, v: F.scaled_dot_product_attention(
        q, _gqa_repeat_kv(k[:, :1], 3), _gqa_repeat_kv(v[:, :1], 3)), True),
    "gqa_repeat_interleave": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k[:, :1].repeat_interleave(3, dim=1), v[:, :1].repeat_interleave(3, dim=1)), True),
    "gqa_tiled_repeat": (lambda q, k, v: F.scaled_dot_product_attention(  # heads in the other order: no GQA
        q[:, :2].repeat(1, 2, 1, 1), k[:, :2].repeat(1, 2, 1, 1), torch.cat([v[:, :1], v[:, 1:2]] * 2, dim=1)),
        None),
    "gqa_expand_other_axis": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1)), None),
    "top_left_causal_longer_keys": (lambda q, k, v: F.scaled_dot_product_attention(
        q[:, :, :5], k, v, is_causal=True), None),
    "bottom_right_causal_longer_keys": (lambda q, k, v: F.scaled_dot_product_attention(
        q[:, :, :5], k, v, attn_mask=torch.arange(12)[None, :] <= torch.arange(5)[:, None] + 7), True),
    "window_inclusive": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=(
        torch.arange(12)[None, :] <= torch.arange(12)[:, None]) & (
        torch.arange(12)[None, :] >= torch.arange(12)[:, None] - 3)), True),
    "window_exclusive": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=(
        torch.arange(12)[None, :] <= torch.arange(12)[:, None]) & (
        torch.arange(12)[None, :] > torch.arange(12)[:, None] - 3)), True),
    "scale_on_query": (lambda q, k, v: ((q * 0.3) @ k.transpose(-2, -1)).softmax(-1) @ v, True),
    "scale_on_key_and_query": (lambda q, k, v: ((q * 0.5) @ (k * 0.6).transpose(-2, -1)).softmax(-1) @ v, True),
    "scale_on_value": (lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ (v * 0.5), True),
    "softcap": (lambda q, k, v: _softcapped(q @ k.transpose(-2, -1) * 0.25, 5.0, 5.0).softmax(-1) @ v, True),
    "softcap_mismatched": (lambda q, k, v: _softcapped(q @ k.transpose(-2, -1) * 0.25, 5.0, 4.0).softmax(-1) @ v,
                           None),
    "transposed_layout": (lambda q, k, v: F.scaled_dot_product_attention(
        *(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))), True),
    "q_is_k": (lambda q, k, v: F.scaled_dot_product_attention(q, q, v, is_causal=True), True),
}


@pytest.mark.parametrize("name", list(HELD))
def test_red_team_classes_that_held_stay_held(name):
    fn, runs_fa4 = HELD[name]
    records = _assert_exact_or_reasoned(fn, _leaves())
    if runs_fa4:
        assert [r.decision for r in records] == ["fa4"], [(r.decision, r.reason) for r in records]
