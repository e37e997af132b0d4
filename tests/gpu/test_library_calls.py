"""FA4's own API in compiled programs, on a GPU: ``flash_attn_func`` and ``flash_attn_varlen_func`` compiled with the
plugin run the plugin's fa4 ops (FA4 kernels, no graph break), forward and backward equal to FA4 called directly;
Hugging Face Llama with ``attn_implementation="flash_attention_4"`` compiled with the plugin equals HF's FA4 run
eagerly."""

from __future__ import annotations

import copy

import pytest
import torch

import fa4_inductor
from fa4_inductor import stats
from tests.gpu.common import _grads, _report, require_fa4_gpu

pytestmark = pytest.mark.gpu
require_fa4_gpu()


def _packed(lengths, heads=16, heads_kv=4, dim=128):
    total = sum(lengths)
    q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(total, heads_kv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, cu


@pytest.mark.parametrize("api", ["flash_attn_func", "flash_attn_varlen_func"])
def test_fa4_api_calls_compile_into_the_plugin_ops_and_equal_fa4(api):
    from flash_attn import cute

    torch.manual_seed(0)
    lengths = [1000, 37, 2048, 511]
    if api == "flash_attn_varlen_func":
        q, k, v, cu = _packed(lengths)

        def attend(q, k, v):
            return cute.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=2048,
                                               max_seqlen_k=2048, causal=True, window_size=(255, None))[0]
    else:
        q, k, v, _ = _packed([2048] * 2)
        q, k, v = (t.detach().view(2, 2048, *t.shape[1:]).requires_grad_() for t in (q, k, v))

        def attend(q, k, v):
            return cute.flash_attn_func(q, k, v, causal=True, softcap=30.0)[0]

    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        got = torch.compile(attend, fullgraph=True)(q, k, v)
    want = attend(q, k, v)  # FA4 itself, eagerly
    dout = torch.randn_like(want)
    errors = [((g.float() - w.float()).norm() / w.float().norm()).item()
              for g, w in zip([got, *_grads(got, [q, k, v], dout)], [want, *_grads(want, [q, k, v], dout)])]
    _report(f"library_call_{api}", rel_errors=errors)
    assert [(r.pattern, r.decision) for r in stats.site_records()] == [(f"flash_attn.cute.{api}", "fa4")]
    assert max(errors) < 1e-2, errors


def test_hf_llama_flash_attention_4_compiled_with_the_plugin_equals_hf_fa4_eager():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2,
                                      attn_implementation="flash_attention_4")
    model = transformers.LlamaForCausalLM(config).cuda().to(torch.bfloat16)
    lazy_import_flash_attention("flash_attention_4")
    ids = torch.randint(0, 1000, (2, 1024), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :300] = 0
    want = model(ids, attention_mask=mask).logits.float()
    stats.reset()
    torch._dynamo.reset()
    with fa4_inductor.enabled(compile=True, eager=False), torch._dynamo.config.patch(
            capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        got = torch.compile(copy.deepcopy(model))(ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    error = ((got[valid] - want[valid]).norm() / want[valid].norm()).item()
    _report("hf_llama_flash_attention_4_plugin", rel_error=error)
    assert {(r.pattern, r.decision) for r in stats.site_records()} == {("flash_attn.cute.flash_attn_varlen_func",
                                                                         "fa4")}
    assert error < 2e-2
