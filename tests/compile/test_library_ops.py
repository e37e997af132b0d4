"""FA2 and FA3 in a compiled program become the fa4 ops: FA3's custom op (training and inference), FA2's ops where
Dynamo inlines its autograd.Function (inference), FA2's ``flash_attn_*func`` API (training too). FA2 and FA3 are on
none of our machines: these tests run on STAND-INS registered under their published op names and schemas
(:mod:`tests.stand_ins`), whose CPU kernels compute the libraries' semantics independently of our ops. Every
rewrite is checked against the stand-in run eagerly, forward and backward, under a random cotangent."""

import pytest
import torch

import fa4_inductor
from fa4_inductor import stats
from fa4_inductor.compile import library_ops
from tests import stand_ins

STAND_INS = stand_ins.install()
FA2_OP, FA3_OP = "flash_attn (FA2) _flash_attn_forward", "flash_attn_3 (FA3) _flash_attn_forward"


def _inputs(heads_kv=4, lengths=None, dtype=torch.bfloat16):
    torch.manual_seed(0)
    shape = (sum(lengths),) if lengths else (2, 9)
    q = torch.randn(*shape, 4, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(*shape, heads_kv, 16, dtype=dtype, requires_grad=True) for _ in "kv")
    return q, k, v


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _assert_same(got, want, inputs, grads=True):
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    if grads:
        cotangent = torch.randn(got.shape, generator=torch.Generator().manual_seed(5)).to(got.dtype)
        for g, w in zip(torch.autograd.grad(got, inputs, cotangent), torch.autograd.grad(want, inputs, cotangent)):
            torch.testing.assert_close(g, w, atol=3e-2, rtol=3e-2)


FA3_CASES = [
    dict(causal=True), dict(), dict(window_size=(3, 0)), dict(window_size=(2, 2), softcap=4.0),
    dict(causal=True, softmax_scale=0.2), dict(heads_kv=2, causal=True), dict(lengths=[4, 9, 2], causal=True),
    dict(lengths=[6, 5], window_size=(1, 3)),
]


@pytest.mark.parametrize("case", FA3_CASES, ids=str)
def test_fa3_op_trains_on_the_fa4_op(case):
    case = dict(case)
    lengths = case.pop("lengths", None)
    inputs = _inputs(case.pop("heads_kv", 4), lengths)
    extra = {}
    if lengths:
        cu = _cu(lengths)
        extra = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))

    def attend(q, k, v):
        window = case.get("window_size", (-1, -1))
        out = torch.ops.flash_attn_3._flash_attn_forward(
            q, k, v, softmax_scale=case.get("softmax_scale"), causal=case.get("causal", False),
            window_size_left=window[0], window_size_right=window[1], softcap=case.get("softcap", 0.0), **extra)[0]
        return out * 2

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(attend, fullgraph=True)(*inputs)
    (record,) = stats.site_records()
    assert (record.pattern, record.decision, record.features["packed"]) == (FA3_OP, "fa4", bool(lengths)), record
    _assert_same(got, attend(*inputs), inputs)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fa2_ops_of_an_inference_graph_run_the_fa4_op(varlen):
    """Where no gradient is needed Dynamo inlines FA2's autograd.Function: the op is a node of the graph."""
    q, k, v = (t.detach() for t in _inputs(2, [5, 8] if varlen else None))

    def attend(q, k, v):  # FA2's autograd.Function itself (its API functions are traced as our ops: below)
        lengths = (_cu([5, 8]), _cu([5, 8]), 8, 8) if varlen else None
        return stand_ins.FlashAttnFunc.apply(q, k, v, lengths, 0.0, None, True, (3, -1), 0.0, None, False)

    with torch.no_grad(), fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(attend, fullgraph=True)(q, k, v)
    (record,) = stats.site_records()
    api = "flash_attn (FA2) _flash_attn_varlen_forward" if varlen else FA2_OP
    assert (record.pattern, record.decision, record.features["window"]) == (api, "fa4", (3, -1)), record
    _assert_same(got, attend(q, k, v), (q, k, v), grads=False)


@pytest.mark.parametrize("api", ["flash_attn_func", "flash_attn_varlen_func"])
def test_fa2_api_calls_train_on_the_fa4_ops(api):
    """FA2's API functions are traced as the fa4 ops (as FA4's are), so training graphs run FA4 too."""
    import flash_attn

    varlen = api == "flash_attn_varlen_func"
    inputs = _inputs(2, [7, 3, 6] if varlen else None)
    function = getattr(flash_attn, api)

    def attend(q, k, v):
        if varlen:
            cu = _cu([7, 3, 6])
            return function(q, k, v, cu, cu, 7, 7, causal=True, softcap=3.0)
        return function(q, k, v, causal=True, softcap=3.0)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(attend, fullgraph=True)(*inputs)
    (record,) = stats.site_records()
    assert (record.pattern, record.decision, record.features["softcap"]) == (f"flash_attn.{api}", "fa4", 3.0)
    _assert_same(got, attend(*inputs), inputs)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fa2_autograd_function_applied_directly_trains_on_the_fa4_op(varlen):
    """FA2's autograd.Function in a training graph: Dynamo traces it whole (a higher-order op with FA2's forward and
    backward as subgraphs); the function only calls the op on its inputs and returns its output, so the fa4 op
    (differentiable itself) takes its place."""
    inputs = _inputs(2, [6, 9] if varlen else None)

    def attend(q, k, v):
        lengths = (_cu([6, 9]), _cu([6, 9]), 9, 9) if varlen else None
        return stand_ins.FlashAttnFunc.apply(q, k, v, lengths, 0.0, None, True, (4, -1), 0.0, None, False)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(attend, fullgraph=True)(*inputs)
    records = stats.site_records()  # one site: Inductor's pass also visits FA2's forward body, which is not one
    assert [(r.target, r.decision, r.features.get("window"), r.features.get("packed")) for r in records] == [
        ("autograd_function_apply", "fa4", (4, -1), varlen)], records
    _assert_same(got, attend(*inputs), inputs)


def test_fa2_autograd_function_padding_its_head_dim_stays_with_the_reason():
    """A head dim FA2 pads to a multiple of 8 inside its function: the op reads padded copies, not the inputs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 9, 4, 12, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def attend(q, k, v):
        return stand_ins.FlashAttnFunc.apply(q, k, v, None, 0.0, None, True, (-1, -1), 0.0, None, False)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(attend)(q, k, v)
    records = stats.site_records()
    assert [r.decision for r in records] == ["fallback"] and "computed inside the function" in records[0].reason
    _assert_same(got, attend(q, k, v), (q, k, v))


@pytest.mark.parametrize("options, reason", [
    (dict(attention_chunk=4), "attention_chunk=4: chunked attention is not served"),
    (dict(q_descale=torch.ones(2, 4)), "q_descale is set"),
    (dict(read=2), "outputs [2] are read"),
], ids=["chunk", "descale", "accumulator_read"])
def test_fa3_calls_fa4_does_not_compute_stay_with_the_reason(options, reason):
    options = dict(options)
    read = options.pop("read", 0)
    q, k, v = (t.detach() for t in _inputs())

    def attend(q, k, v):
        return torch.ops.flash_attn_3._flash_attn_forward(q, k, v, causal=True, **options)[read]

    report = fa4_inductor.explain(attend, q, k, v, arch="sm90")
    (record,) = report.records
    assert record.pattern == FA3_OP and record.decision == "fallback" and reason in record.reason, record


def test_the_stand_ins_are_marked_as_such():
    assert "STAND-INS" in stand_ins.__doc__ and set(STAND_INS) == {"fa2", "fa3"}


@pytest.mark.parametrize("causal", [True, False])
def test_fa2_kv_cache_decode_runs_the_fa4_op_with_the_cache_lengths(causal):
    """A decoding step over a contiguous cache (no keys appended): each row's ``cache_seqlens`` become seqused_k."""
    import flash_attn

    torch.manual_seed(0)
    q = torch.randn(3, 1, 8, 16, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(3, 20, 2, 16, dtype=torch.bfloat16) for _ in "kv")
    lengths = torch.tensor([20, 7, 1], dtype=torch.int32)

    def decode(q, k_cache, v_cache, lengths):
        return flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=causal)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(decode, fullgraph=True)(q, k_cache, v_cache, lengths)
    (record,) = stats.site_records()
    assert (record.pattern, record.decision) == ("flash_attn.flash_attn_with_kvcache", "fa4"), record
    torch.testing.assert_close(got, decode(q, k_cache, v_cache, lengths), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("options, reason", [
    (dict(k=True), "k is set"),
    (dict(queries=3, causal=True), "a causal mask over several queries"),
    (dict(window_size=(4, 0)), "a causal mask over several queries or a window"),
], ids=["append", "causal_prefill", "window"])
def test_fa2_kv_cache_calls_it_does_not_serve_keep_fa2s_call_with_the_reason(options, reason):
    import flash_attn

    options = dict(options)
    q = torch.randn(2, options.pop("queries", 1), 4, 16, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(2, 12, 4, 16, dtype=torch.bfloat16) for _ in "kv")
    if options.pop("k", False):
        options.update(k=q.clone(), v=q.clone())

    def decode(q, k_cache, v_cache):
        return flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, **options) * 2

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        try:
            torch.compile(decode)(q, k_cache, v_cache)
        except NotImplementedError:  # the stand-in computes no appending
            pass
    (record,) = stats.site_records()
    assert record.pattern == "flash_attn.flash_attn_with_kvcache" and record.decision == "fallback"
    assert reason in record.reason, record.reason


def _alibi_slopes(heads=4):
    return torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


@pytest.mark.parametrize("path", ["api", "autograd_function", "inference_op"])
def test_fa2_causal_alibi_runs_the_fa4_alibi_op(path):
    """FA2's ALiBi (``-slope·|i - j|``) under causal masking is the ALiBi op's linear bias: FA4 with a score_mod."""
    import flash_attn

    inputs = _inputs(2)
    slopes = _alibi_slopes()

    def attend(q, k, v):
        if path == "api":
            return flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(5, 0), alibi_slopes=slopes)
        return stand_ins.FlashAttnFunc.apply(q, k, v, None, 0.0, None, True, (5, 0), 0.0, slopes, False)

    with torch.set_grad_enabled(path != "inference_op"), fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(attend, fullgraph=True)(*inputs)
    (record,) = stats.site_records()
    assert (record.decision, record.features["op"], record.features["alibi"]) == ("fa4", "flash_attn_alibi_fwd", True)
    _assert_same(got, attend(*inputs), inputs, grads=path != "inference_op")


@pytest.mark.parametrize("options, reason", [
    (dict(causal=False), "alibi_slopes without causal"),
    (dict(causal=True, slopes=torch.ones(2, 4)), "alibi_slopes of shape (2, 4)"),
    (dict(causal=True, slopes=torch.ones(3)), "alibi_slopes of shape (3,) (torch.float32) for 4 heads"),
    (dict(causal=True, softcap=5.0), "alibi_slopes with softcap"),
], ids=["not_causal", "per_row_slopes", "heads_mismatch", "softcap"])
def test_fa2_alibi_fa4_does_not_compute_keeps_fa2s_call_with_the_reason(options, reason):
    import flash_attn

    options = dict(options)
    slopes = options.pop("slopes", _alibi_slopes())
    q, k, v = (t.detach() for t in _inputs())

    def attend(q, k, v):
        return flash_attn.flash_attn_func(q, k, v, alibi_slopes=slopes, **options) * 2

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        try:
            torch.compile(attend)(q, k, v)
        except (RuntimeError, IndexError):  # the stand-in takes one slope per head only
            pass
    # The API call's record, and the record of FA2's op where Dynamo then traces FA2's own code (its frame runs
    # with the plugin's pass too): both keep FA2's call, for the same reason.
    records = stats.site_records()
    assert records and all(r.decision == "fallback" and reason in r.reason for r in records), records
