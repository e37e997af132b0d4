"""torch.compile with the plugin: SDPA sites become fa4 ops, forward and backward (CPU reference)."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import fa4_inductor
from fa4_inductor.compile import inductor_pass
from fa4_inductor import stats
from fa4_inductor.compile.sites import RewriteContext, registered_expansions, registered_patterns
from fa4_inductor.compile.rewrite import rewrite_graph
from tests.compare import assert_matches_eager

pytestmark = pytest.mark.usefixtures("no_compile_cache")


class Attention(torch.nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=4, **sdpa_kwargs):
        super().__init__()
        self.heads, self.kv_heads, self.kwargs = heads, kv_heads, sdpa_kwargs
        self.head_dim = dim // heads
        self.q = torch.nn.Linear(dim, dim, bias=False)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, dim = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), **self.kwargs)
        return self.o(o.transpose(1, 2).reshape(b, s, dim))


def _run(model, x):
    out = model(x)
    grads = torch.autograd.grad(out.float().square().sum(), [x, *model.parameters()])
    return out, grads


def _compare(model, x, **compile_kwargs):
    """Compiled-with-plugin vs eager stock: outputs and gradients."""
    want, want_grads = _run(model, x)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got, got_grads = _run(torch.compile(model, **compile_kwargs), x)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=6e-2, rtol=6e-2)


def _model(dtype=torch.bfloat16, **kwargs):
    torch.manual_seed(0)
    return Attention(**kwargs).to(dtype), torch.randn(2, 12, 32, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("kwargs", [dict(), dict(is_causal=True), dict(scale=0.2), dict(kv_heads=2, enable_gqa=True),
                                    dict(kv_heads=1, enable_gqa=True, is_causal=True)], ids=str)
def test_sdpa_rewritten_forward_and_backward(kwargs):
    model, x = _model(**kwargs)
    _compare(model, x, fullgraph=True)
    assert stats.counters["pattern.sdpa.fa4"] == 1 and stats.counters["compile.fallback"] == 0


def test_backward_graph_runs_fa4_backward():
    model, x = _model(is_causal=True)
    seen = []
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(model, fullgraph=True)
        from torch._inductor.utils import run_and_get_code
        _, codes = run_and_get_code(lambda: compiled(x).sum().backward())
        seen = "\n".join(codes)
    assert "torch.ops.fa4.flash_attn_fwd_kernel.default" in seen and "torch.ops.fa4.flash_attn_bwd.default" in seen
    assert "scaled_dot_product" not in seen


def test_layout_folds_no_copies_around_fa4():
    model, x = _model()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)), torch.no_grad():
        from torch._inductor.utils import run_and_get_code
        _, (code,) = run_and_get_code(torch.compile(model), x)
    call = next(line for line in code.splitlines() if "fa4.flash_attn_fwd_kernel.default(" in line)
    # q/k/v reach FA4 as views of the projection outputs (reinterpret_tensor of an mm buffer) ...
    assert call.count("reinterpret_tensor(buf") == 3
    # ... and no pointwise copy kernel is generated at all: only the matmuls and FA4 remain.
    assert "cpp_fused" not in code, code


@pytest.mark.parametrize("model_kwargs, dtype, reason", [
    (dict(dropout_p=0.2), torch.bfloat16, "dropout_p=0.2"),
    (dict(), torch.float32, "dtype torch.float32"),
])
def test_fallback_leaves_stock_sdpa_and_records_reason(model_kwargs, dtype, reason):
    model, x = _model(dtype, **model_kwargs)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(model, fullgraph=True)(x)
    records = stats.site_records()
    assert len(records) == 1 and records[0].decision == "fallback" and reason in records[0].reason
    assert records[0].location and "test_compile.py" in records[0].location
    assert stats.counters["compile.fa4"] == 0


def test_a_mask_input_is_checked_at_run_time():
    """A mask passed in is data: compile time can't prove it, the call reads it (here all True: FA4, no mask)."""
    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(fn)(q, q, q, torch.ones(8, 8, dtype=torch.bool))
    assert stats.site_records()[0].features["mask"] == "data, checked at run time"
    assert stats.counters["data_mask.fa4"] == 1


def test_cpu_not_routed_means_no_rewrite():
    model, x = _model()
    with inductor_config.patch(pre_grad_custom_pass=None, post_grad_custom_post_pass=None):
        installed = inductor_pass.install(("cuda",))
        try:
            torch.compile(model)(x)
        finally:
            inductor_pass.uninstall(installed)
    assert "not routed" in stats.site_records()[0].reason


def test_aten_flash_variant_and_backward_rewritten():
    def fn(q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            torch.ones_like(out), q, k, v, out, lse, 0.0, True)
        return out, lse, dq + dk + dv
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=torch.bfloat16) for _ in range(3))
    want = fn(q, k, v)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(fn, fullgraph=True)(q, k, v)
    assert stats.counters["pattern.aten_sdpa_forward.fa4"] == 1
    assert stats.counters["pattern.aten_sdpa_flash_backward.fa4"] == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=3e-2, rtol=3e-2)


def test_dynamic_shapes_no_recompiles():
    model, _ = _model(is_causal=True)
    torch._dynamo.utils.counters.clear()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(model, dynamic=True, fullgraph=True)
        for s in (8, 12, 31):
            out = compiled(torch.randn(2, s, 32, dtype=torch.bfloat16))
            assert out.shape == (2, s, 32)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert "s" in stats.site_records()[0].features["q_shape"]  # symbolic length seen by the rewrite


def test_automatic_dynamic_recompiles_once_like_stock():
    model, _ = _model()
    torch._dynamo.utils.counters.clear()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(model)
        for s in (8, 12, 31, 40):
            compiled(torch.randn(2, s, 32, dtype=torch.bfloat16))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert stats.counters["pattern.sdpa.fa4"] == 2


class _UserPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "user-pass-v1"


def test_chains_after_user_pass_and_restores_it():
    user, user_post = _UserPass(), _UserPass()
    model, x = _model()
    with inductor_config.patch(pre_grad_custom_pass=user, post_grad_custom_post_pass=user_post):
        with fa4_inductor.enabled(eager=False, devices=("cpu",)):
            ours, ours_post = inductor_config.pre_grad_custom_pass, inductor_config.post_grad_custom_post_pass
            assert ours.previous is user and ours.uuid() != user.uuid()
            assert ours_post.previous is user_post and ours_post.uuid() not in (None, user_post.uuid())
            torch.compile(model)(x)
        assert inductor_config.pre_grad_custom_pass is user
        assert inductor_config.post_grad_custom_post_pass is user_post
    assert user.calls == 1 and user_post.calls == 1 and stats.counters["compile.fa4"] == 1


def test_uuid_tracks_settings_and_unknown_user_pass():
    cpu = inductor_pass.FA4AttentionPass(None, ("cpu",))
    assert cpu.uuid() == inductor_pass.FA4AttentionPass(None, ("cpu",)).uuid()
    assert cpu.uuid() != inductor_pass.FA4AttentionPass(None, ("cuda",)).uuid()
    assert inductor_pass.FA4AttentionPass(lambda g: None, ("cpu",)).uuid() is None


def test_cache_on_never_returns_stale_graph():
    """With Inductor's caches on, enabling and disabling still compile what was asked."""
    model, x = _model()
    with inductor_config.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=True):
        from torch._inductor.utils import run_and_get_code
        for enabled in (True, False, True, False):
            torch._dynamo.reset()
            with fa4_inductor.enabled(eager=False, devices=("cpu",)) if enabled else contextlib.nullcontext():
                _, codes = run_and_get_code(torch.compile(model), x)
            assert ("fa4.flash_attn_fwd" in "\n".join(codes)) == enabled


def test_patterns_declare_what_they_match_and_emit():
    patterns = registered_patterns()
    assert [p.name for p in patterns][:3] == ["sdpa", "aten_sdpa_forward", "aten_sdpa_flash_backward"]
    assert all(p.matches and p.emits for p in patterns)
    expansions = registered_expansions()
    assert [e.name for e in expansions] == ["multihead_attention", "transformer_encoder_layer"]
    assert all(e.matches and e.emits and e.targets for e in expansions)


def test_rewrite_graph_directly_records_sites():
    model, x = _model(is_causal=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch.compile(model, backend=backend)(x)
    records = rewrite_graph(graphs[0].graph, RewriteContext(devices=("cpu",)))
    assert [r.decision for r in records] == ["fa4"]
    assert records[0].features["causal"] is True and records[0].features["gqa_ratio"] == 1


def test_dynamic_float_dropout_attribute_of_zero_is_guarded_not_a_fallback():
    """A dropout_p that is a graph scalar (HF's ``attention_dropout`` in train mode under dynamic=True on
    torch 2.11; computed from one here) is decided on its value with a guard, not sent to the fallback."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout = 0.0

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout * q.shape[0] / 2, is_causal=True)

    q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.bfloat16) for _ in range(3))
    with torch._dynamo.config.patch(specialize_float=False), fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(Attention(), dynamic=True, fullgraph=True)(q, k, v)
    assert [r.decision for r in stats.site_records()][-1] == "fa4", stats.site_records()[-1].reason
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)


def test_a_warm_inductor_cache_still_records_every_site(tmp_path):
    """A second process loading the same graph from Inductor's caches gets the site records and counters too."""
    script = (
        "import json, torch, torch.nn.functional as F, fa4_inductor\n"
        "fa4_inductor.enable(devices=('cpu',), eager=False)\n"
        "q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)\n"
        "torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True))(q).sum().backward()\n"
        "from torch._dynamo.utils import counters\n"
        "print(json.dumps([[r.decision for r in fa4_inductor.stats.site_records()], "
        "counters['aot_autograd']['autograd_cache_hit']]))\n")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs == [[["fa4"], 0], [["fa4"], 1]]


def test_dynamic_lengths_starting_at_the_head_dim_stay_on_fa4_in_training():
    """dynamic=True with the first length equal to the head dim (duck sizing gives both one symbol): the graph
    compiled for the next lengths keeps S_q == S_kv (a guard) and its causal site on FA4, forward and backward."""
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with fa4_inductor.enabled(devices=("cpu",)):
        compiled = torch.compile(fn, dynamic=True)
        for length in (32, 48, 64, 100):
            torch.manual_seed(length)
            inputs = [torch.randn(2, 4, length, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
            assert_matches_eager(fn, compiled, inputs)
    assert [r.decision for r in stats.site_records()] == ["fa4"] * len(stats.site_records())
    assert not stats.counters["eager.fallback"]
