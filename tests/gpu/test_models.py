"""Models trained compiled with the plugin on a GPU: every site on FA4 kernels, against float64."""

from __future__ import annotations
import copy
import inspect
import pytest
import torch
import fa4_inductor
from fa4_inductor import stats
from tests.gpu.common import FA2_OR_CUDNN, _attention_kernels, _kernel_names, _report, require_fa4_gpu

pytestmark = pytest.mark.gpu
require_fa4_gpu()


@pytest.mark.parametrize("name", ["bart", "whisper"])
def test_seq2seq_training_runs_every_site_on_fa4_kernels(name):
    """BART and Whisper (LayerDrop at 0: ``torch.rand([]) < self.layerdrop`` per layer) train with every encoder,
    causal and cross site on FA4 kernels only, the padding mask as FA4 key padding, and no graph break at the
    draw; logits and gradients against a float64 copy. (torch 2.11's Dynamo still breaks at transformers'
    ``copy.deepcopy`` of the config, outside the layers.)"""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    sizes = dict(vocab_size=256, d_model=512, encoder_layers=2, decoder_layers=2, encoder_attention_heads=8,
                 decoder_attention_heads=8, encoder_ffn_dim=1024, decoder_ffn_dim=1024, dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0, attn_implementation="sdpa")
    ids = torch.randint(3, 256, (2, 384), device="cuda")
    mask = torch.ones(2, 384, dtype=torch.long, device="cuda")
    mask[1, 300:] = 0
    if name == "bart":
        model = transformers.BartForConditionalGeneration(transformers.BartConfig(**sizes, max_position_embeddings=512))
        inputs = dict(input_ids=ids, decoder_input_ids=ids, attention_mask=mask)
    else:
        model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            **sizes, num_mel_bins=16, max_source_positions=256, max_target_positions=512, pad_token_id=1,
            bos_token_id=2, eos_token_id=2, decoder_start_token_id=2))
        inputs = dict(input_features=torch.randn(2, 16, 512, device="cuda"), decoder_input_ids=ids,
                      decoder_attention_mask=mask)
    model64 = copy.deepcopy(model).cuda().double().train()
    model = model.cuda().bfloat16().train()
    weights = torch.randn(2, 384, 256, device="cuda")

    def logits_and_grads(m, call, dtype):
        m.zero_grad(set_to_none=True)
        logits = call(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}).logits
        (logits.double() * weights).mean().backward()
        return {"logits": logits.double(), **{n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}}

    stats.reset()
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    graphs.clear()
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(model)
        got = logits_and_grads(model, compiled, torch.bfloat16)
        names = _kernel_names(lambda: logits_and_grads(model, compiled, torch.bfloat16))
    want = logits_and_grads(model64, model64, torch.float64)
    records = stats.site_records()

    def errors(result):
        return {key: ((result[key] - w).norm() / w.norm()).item() for key, w in want.items() if w.norm() > 1e-5}

    # Each within bf16 eager's rounding error or, where Inductor's own rounding moves it, stock compile's.
    got_errors, eager_errors = errors(got), errors(logits_and_grads(model, model, torch.bfloat16))
    worse = {key: e for key, e in got_errors.items() if e > 1.25 * eager_errors[key] + 1e-2}
    if worse:
        torch._dynamo.reset()
        stock_errors = errors(logits_and_grads(model, torch.compile(model), torch.bfloat16))
        worse = {key: (got_errors[key], eager_errors[key], stock_errors[key]) for key in worse
                 if got_errors[key] > 1.25 * max(eager_errors[key], stock_errors[key]) + 1e-2}
    _report("seq2seq_training", model=name, graphs=graphs["unique_graphs"], max_rel_error=max(got_errors.values()),
            drawn_branches_decided=stats.counters["compile.drawn_branches_decided"], worse=worse,
            max_eager_rel_error=max(eager_errors.values()),
            sites=[(r.decision, r.features.get("causal"), r.features.get("padding")) for r in records],
            kernels=sorted(set(_attention_kernels(names))))
    assert stats.counters["compile.drawn_branches_decided"] > 0 or "self.layerdrop > 0" in inspect.getsource(
        transformers.models.bart.modeling_bart.BartEncoder.forward)
    assert len(records) == 6 and all(r.decision == "fa4" for r in records), [(r.decision, r.reason) for r in records]
    convolution = ("conv", "nhwc", "nchw", "fprop", "dgrad", "wgrad")  # Whisper's encoder convolutions run cuDNN
    stock_attention = [n for n in names if any(t in n.lower() for t in FA2_OR_CUDNN) and "cute" not in n.lower()
                       and not any(c in n.lower() for c in convolution)]
    assert not stock_attention, stock_attention
    assert not worse, worse
