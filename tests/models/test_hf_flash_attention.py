"""Hugging Face models with ``attn_implementation="flash_attention_4"`` compiled with the plugin: HF calls FA4's
``flash_attn_func`` (a full batch), ``flash_attn_varlen_func`` (a padded batch, which HF unpads; a packed batch from
``DataCollatorWithFlattening``), and each call runs our fa4 ops in the graph. FA4 itself can't run on this CPU, so a
site left to FA4's own call would raise: every test passing is every call traced into our ops. Logits and parameter
gradients equal the same weights under ``"eager"`` attention at bf16 tolerance; a packed batch equals each document
run alone.

HF loads the flash functions on the first forward (``lazy_import_flash_attention``, whose ``inspect.signature``
Dynamo can't trace); as HF's docs ask for ``fullgraph``, the tests load them before compiling.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("flash_attn.cute")

import fa4_inductor  # noqa: E402
from fa4_inductor import stats  # noqa: E402
from tests.compare import assert_parameter_grads_close, relative_error  # noqa: E402
from tests.models.test_hf_models import _build, _padding_mask  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_compile_cache")

DENSE = "flash_attn.cute.flash_attn_func"
VARLEN = "flash_attn.cute.flash_attn_varlen_func"


def _flash_attention_twin(name: str, implementation: str = "flash_attention_4"):
    """(model with ``implementation``, the same weights with ``eager``), bf16. HF refuses flash attention on a CPU
    at construction, so the implementation is set on the built model's config."""
    from transformers import modeling_flash_attention_utils

    reference = _build(name, "eager").to(torch.bfloat16).eval()
    model = copy.deepcopy(reference)
    model.config._attn_implementation_internal = implementation
    modeling_flash_attention_utils.lazy_import_flash_attention(implementation)
    return model, reference


def _logits_and_grads(model, call, kwargs: dict, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = call(**kwargs).logits
    (logits.float() * weights).sum().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


EXPECTED = {  # the features of each layer's site
    "llama": [dict(causal=True, window=(-1, -1), softcap=None)] * 2,
    "qwen2": [dict(causal=True, window=(-1, -1), softcap=None)] * 2,
    "mistral": [dict(causal=True, window=(7, -1), softcap=None)] * 2,
    "gemma2": [dict(causal=True, window=(7, -1), softcap=50.0), dict(causal=True, window=(-1, -1), softcap=50.0)],
}


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left_padded"])
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "qwen2"])
def test_flash_attention_4_models_run_our_ops_and_match_eager(name, padded):
    """A full batch calls flash_attn_func, a padded one flash_attn_varlen_func on the unpadded tokens (HF's
    unpadding reads data: Dynamo's capture flags, as HF asks for under compile, keep it in the graph)."""
    torch.manual_seed(0)
    model, reference = _flash_attention_twin(name)
    ids = torch.randint(0, 128, (2, 16))
    kwargs = {"input_ids": ids, **({"attention_mask": _padding_mask("left")} if padded else {})}
    weights = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(1))
    valid = kwargs["attention_mask"].bool() if padded else torch.ones(2, 16, dtype=torch.bool)
    weights = weights * valid[..., None]
    want, want_grads = _logits_and_grads(reference, reference, kwargs, weights)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)), torch._dynamo.config.patch(
            capture_scalar_outputs=padded, capture_dynamic_output_shape_ops=padded):
        got, got_grads = _logits_and_grads(model, torch.compile(model), kwargs, weights)
    if not padded:  # one graph (HF's padding checks branch on data: those break the padded model's graph)
        assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks
    records = stats.site_records()
    assert [(r.pattern, r.decision) for r in records] == [(VARLEN if padded else DENSE, "fa4")] * 2, records
    for record, features in zip(records, EXPECTED[name]):
        assert {key: record.features[key] for key in features} == features, record.features
    assert relative_error(got[valid], want[valid]) < 2e-2
    assert_parameter_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_a_packed_batch_runs_the_varlen_op_exact_per_document(name):
    """``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``: documents packed into one row with
    ``cu_seq_lens_q/k`` and ``max_length_q/k``; HF hands them to flash_attn_varlen_func, which runs our varlen op.
    Each document's logits and the parameter gradients equal the documents run one at a time in eager."""
    torch.manual_seed(0)
    model, reference = _flash_attention_twin(name)
    documents = [torch.randint(0, 128, (n,)).tolist() for n in (5, 11, 7)]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": d} for d in documents])
    batch.pop("labels")
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 16, 23]
    weights = torch.randn(1, 23, 128, generator=torch.Generator().manual_seed(2))
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got, got_grads = _logits_and_grads(model, torch.compile(model), dict(batch), weights)
    records = stats.site_records()
    assert [(r.pattern, r.decision, r.features["packed"]) for r in records] == [(VARLEN, "fa4", True)] * 2
    reference.zero_grad(set_to_none=True)
    starts = batch["cu_seq_lens_q"].tolist()
    want = []
    for document, start, end in zip(documents, starts, starts[1:]):
        logits = reference(input_ids=torch.tensor([document])).logits
        (logits.float() * weights[:, start:end]).sum().backward()
        want.append(logits.detach().float())
    want_grads = {n: p.grad.float() for n, p in reference.named_parameters() if p.grad is not None}
    assert relative_error(got, torch.cat(want, dim=1)) < 2e-2
    assert_parameter_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left_padded"])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_flash_attention_2_models_run_our_ops_through_the_fa2_stand_in(name, padded, monkeypatch):
    """``attn_implementation="flash_attention_2"`` on FA2's STAND-IN (:mod:`tests.stand_ins`; FA2 builds only with
    a CUDA toolchain). HF checks FA2's installed distribution and a CUDA device before it imports FA2, and neither
    is here: that one check is patched; HF's attention code runs as written and calls the stand-in's
    ``flash_attn_func`` / ``flash_attn_varlen_func``, which the plugin traces as our ops."""
    from tests import stand_ins
    from transformers import modeling_flash_attention_utils

    stand_ins.install()
    monkeypatch.setattr(modeling_flash_attention_utils, "is_flash_attn_2_available", lambda *args, **kwargs: True)
    torch.manual_seed(0)
    model, reference = _flash_attention_twin(name, "flash_attention_2")
    ids = torch.randint(0, 128, (2, 16))
    kwargs = {"input_ids": ids, **({"attention_mask": _padding_mask("left")} if padded else {})}
    valid = kwargs["attention_mask"].bool() if padded else torch.ones(2, 16, dtype=torch.bool)
    weights = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(1)) * valid[..., None]
    want, want_grads = _logits_and_grads(reference, reference, kwargs, weights)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)), torch._dynamo.config.patch(
            capture_scalar_outputs=padded, capture_dynamic_output_shape_ops=padded):
        got, got_grads = _logits_and_grads(model, torch.compile(model), kwargs, weights)
    records = stats.site_records()
    api = "flash_attn.flash_attn_varlen_func" if padded else "flash_attn.flash_attn_func"
    assert [(r.pattern, r.decision) for r in records] == [(api, "fa4")] * 2, records
    for record, features in zip(records, EXPECTED[name]):
        assert {key: record.features[key] for key in features} == features, record.features
    assert relative_error(got[valid], want[valid]) < 2e-2
    assert_parameter_grads_close(got_grads, want_grads)


def test_padded_batches_of_new_lengths_compile_nothing_new_once_dynamic():
    """HF's padded FA4 path under the capture flags: a new padding recompiles nothing, a new sequence length once
    (Dynamo's automatic dynamic shapes), then neither; every call runs our varlen op."""
    torch.manual_seed(0)
    model, _ = _flash_attention_twin("llama")
    compiled = torch.compile(model)
    graphs = []
    with fa4_inductor.enabled(eager=False, devices=("cpu",)), torch.no_grad(), torch._dynamo.config.patch(
            capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        for pad, length in ((3, 16), (5, 16), (2, 20), (7, 24), (9, 32)):
            mask = torch.ones(2, length, dtype=torch.long)
            mask[1, :pad] = 0
            compiled(torch.randint(0, 128, (2, length)), attention_mask=mask)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0] and graphs[4] == graphs[3] == graphs[2], graphs
    assert {(r.pattern, r.decision) for r in stats.site_records()} == {(VARLEN, "fa4")}


def test_explain_reports_hf_flash_attention_4_sites_by_api():
    model, _ = _flash_attention_twin("mistral")
    report = fa4_inductor.explain(model, torch.randint(0, 128, (2, 16)), arch="sm90")
    assert [(r.pattern, r.decision, r.features["window"]) for r in report.records] == [(DENSE, "fa4", (7, -1))] * 2
    assert str(report).startswith("fa4_inductor: 2 of 2 attention sites run FA4 on sm90")
