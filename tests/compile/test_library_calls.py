"""FA4's own API called in a compiled program (``flash_attn.cute.flash_attn_func`` / ``flash_attn_varlen_func``):
with the plugin it compiles with no graph break into the fa4 ops, forward and backward, exact against float64
attention; an argument the ops don't take keeps FA4's call with a reason; with the plugin off nothing changes."""

import pytest
import torch

import fa4_inductor
from fa4_inductor import stats
from tests.compare import packed_attention_reference

cute = pytest.importorskip("flash_attn.cute")

DENSE = "flash_attn.cute.flash_attn_func"
VARLEN = "flash_attn.cute.flash_attn_varlen_func"


def _dense_reference(q, k, v, **options):
    """float64 attention of B,S,H,D tensors, each batch row one sequence."""
    b, s = q.shape[:2]
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    k_cu = torch.arange(0, (b + 1) * k.shape[1], k.shape[1], dtype=torch.int32)
    out = packed_attention_reference(*(t.double().flatten(0, 1) for t in (q, k, v)), cu.tolist(), k_cu.tolist(),
                                     **options)
    return out.view(b, s, *out.shape[1:])


def _grads(out, inputs, seed=3):
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((out.double() * cotangent).sum(), inputs)


DENSE_CASES = [  # (FA4 API keywords, the reference's options)
    (dict(causal=True), dict(causal=True)),
    (dict(), dict()),
    (dict(window_size=(3, None)), dict(window=(3, -1))),
    (dict(causal=True, window_size=(4, 0)), dict(causal=True, window=(4, -1))),
    (dict(window_size=(-1, -1), softcap=5.0), dict(softcap=5.0)),
    (dict(window_size=(2, 1), softmax_scale=0.1), dict(window=(2, 1), scale=0.1)),
]


@pytest.mark.parametrize("heads_kv", [4, 2])
@pytest.mark.parametrize("kwargs, options", DENSE_CASES, ids=str)
def test_flash_attn_func_compiles_into_the_fa4_op_and_stays_exact(kwargs, options, heads_kv):
    torch.manual_seed(0)
    q = torch.randn(2, 9, 4, 16, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 9, heads_kv, 16, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")

    def attend(q, k, v):
        out, _ = cute.flash_attn_func(q, k, v, **kwargs)
        return out

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(attend, fullgraph=True)(q, k, v)
    (record,) = stats.site_records()
    assert (record.pattern, record.decision, record.features["op"]) == (DENSE, "fa4", "flash_attn_fwd")
    options = dict(options)
    want = _dense_reference(q, k, v, scale=options.pop("scale", 16 ** -0.5), **options)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    for g, w in zip(_grads(got, (q, k, v)), _grads(want, (q, k, v))):
        torch.testing.assert_close(g, w, atol=3e-2, rtol=3e-2)


def _packed(lengths, heads=4, heads_kv=2, dim=16):
    q = torch.randn(sum(lengths), heads, dim, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(sum(lengths), heads_kv, dim, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def test_flash_attn_varlen_func_runs_the_varlen_op_with_dynamic_token_counts():
    """Packed documents of two packings: one graph serves both (token counts and max lengths symbolic), each
    document exact against float64 attention, forward and backward."""
    torch.manual_seed(1)

    def attend(q, k, v, cu, max_len):
        out, _ = cute.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                             max_seqlen_k=max_len, causal=True, window_size=(5, None))
        return out

    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        for lengths in ([7, 3, 12], [5, 9]):
            q, k, v, cu = _packed(lengths, heads=8)  # no size equal to another's (Dynamo's duck sizing)
            got = compiled(q, k, v, cu, max(lengths))
            want = packed_attention_reference(*(t.double() for t in (q, k, v)), cu.tolist(), cu.tolist(),
                                              scale=0.25, causal=True, window=(5, -1))
            torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
            for g, w in zip(_grads(got, (q, k, v)), _grads(want, (q, k, v))):
                torch.testing.assert_close(g, w, atol=3e-2, rtol=3e-2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    records = stats.site_records()
    assert {(r.pattern, r.decision, r.features["op"], r.features["packed"]) for r in records} == {
        (VARLEN, "fa4", "flash_attn_varlen_fwd", True)}


@pytest.mark.parametrize("kwargs, reason", [
    (dict(score_mod=lambda score, b, h, q_idx, kv_idx, seqlen_info, aux: score), "score_mod is set"),
    (dict(learnable_sink=torch.zeros(4, dtype=torch.bfloat16)), "learnable_sink is set"),
    (dict(window_size=(-1, 3)), "window_size left side -1 with the other side bounded"),
    (dict(deterministic=True), "deterministic=True while torch.use_deterministic_algorithms is off"),
    (dict(dtype=torch.float32), "dtype torch.float32: the fa4 ops take float16/bfloat16"),
], ids=["score_mod", "learnable_sink", "half_open_window", "deterministic", "float32"])
def test_an_argument_the_ops_dont_take_keeps_fa4s_call_with_the_reason(kwargs, reason):
    """The call stays FA4's own (a graph break, as without the plugin; FA4 itself can't run on this CPU, so the
    call raises FA4's error), and the site's record gives the reason."""
    kwargs = dict(kwargs)
    q, k, v = (torch.randn(1, 8, 4, 16, dtype=kwargs.pop("dtype", torch.bfloat16)) for _ in range(3))

    def attend(q, k, v):
        return cute.flash_attn_func(q, k, v, **kwargs)[0] * 2

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        with pytest.raises(AssertionError, match="CUDA|float16|dtype"):  # FA4's own input checks, on the CPU
            torch.compile(attend)(q, k, v)
    (record,) = [r for r in stats.site_records() if r.pattern == DENSE]
    assert record.decision == "fallback" and reason in record.reason, record


def test_with_the_plugin_off_flash_attn_func_breaks_the_graph_as_before():
    q, k, v = (torch.randn(1, 8, 4, 16, dtype=torch.bfloat16) for _ in range(3))

    def attend(q, k, v):
        return cute.flash_attn_func(q, k, v, causal=True)[0]

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(attend, fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(attend, fullgraph=True)(q, k, v)


def test_explain_shows_library_calls_under_their_api_names():
    q, k, v = (torch.randn(2, 8, 4, 16, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)

    def model(q, k, v):
        dense = cute.flash_attn_func(q, k, v, causal=True)[0]
        packed = cute.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens_q=cu,
                                             cu_seqlens_k=cu, max_seqlen_q=11, max_seqlen_k=11)[0]
        return dense + packed.view_as(dense)

    report = fa4_inductor.explain(model, q, k, v, arch="sm90")
    assert [(r.pattern, r.decision) for r in report.records] == [(DENSE, "fa4"), (VARLEN, "fa4")]
    assert "pattern: flash_attn.cute.flash_attn_varlen_func" in str(report)


def test_a_function_dynamo_already_has_a_rule_for_keeps_it(monkeypatch, caplog):
    """Another library's substitute for FA4's functions wins: enabling logs it and works."""
    from fa4_inductor.compile import library_calls

    def already_registered(original, **kwargs):
        raise ValueError(f"Duplicate polyfill handlers for {original}")

    monkeypatch.setattr(library_calls, "_installed", set())
    monkeypatch.setattr(torch.compiler, "substitute_in_graph", already_registered)
    with caplog.at_level("WARNING", logger="fa4_inductor"), fa4_inductor.enabled(eager=False, devices=("cpu",)):
        pass
    assert "flash_attn.cute.flash_attn_func keeps Dynamo's existing rule" in caplog.text
