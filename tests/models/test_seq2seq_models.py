"""Models with LayerDrop (OPT, BART, mBART, Marian, Whisper) and T5, training, compiled with the plugin on CPU.

Their ``if torch.rand([]) < self.layerdrop`` broke each forward into a graph per layer, so the masks reached the
attention as opaque inputs; with the plugin the whole forward is one graph and every site runs FA4 with the mask's
structure (T5's self-attention sites carry a learned position bias: a reason of their own).
"""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fa4_inductor  # noqa: E402
from fa4_inductor import stats  # noqa: E402
from tests.compare import assert_as_exact_as_stock, relative_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_compile_cache")

SEQ2SEQ = dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)  # layerdrop: the configs' default 0


def _build(name: str, impl: str):
    if name == "opt":
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, attn_implementation=impl))
    if name == "bart":
        return transformers.BartForConditionalGeneration(transformers.BartConfig(**SEQ2SEQ, attn_implementation=impl))
    if name == "mbart":
        return transformers.MBartForConditionalGeneration(transformers.MBartConfig(**SEQ2SEQ, attn_implementation=impl))
    if name == "marian":
        return transformers.MarianMTModel(transformers.MarianConfig(
            **SEQ2SEQ, pad_token_id=1, decoder_start_token_id=2, attn_implementation=impl))
    if name == "whisper":
        return transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            **SEQ2SEQ, num_mel_bins=8, max_source_positions=32, max_target_positions=64, pad_token_id=1,
            bos_token_id=2, eos_token_id=2, decoder_start_token_id=2, attn_implementation=impl))
    if name == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
            decoder_start_token_id=0, attn_implementation=impl))
    raise ValueError(name)


FA4, BIAS = "fa4", "position bias"


def _draws_at_layerdrop_zero() -> bool:
    """Whether this transformers draws LayerDrop's ``torch.rand([])`` even at ``layerdrop=0`` (newer releases guard
    the draw with ``self.layerdrop > 0.0``, and their forward is one graph without the plugin too)."""
    source = inspect.getsource(transformers.models.opt.modeling_opt.OPTDecoder.forward)
    return "torch.rand([])" in source and "self.layerdrop > 0" not in source


def _branch_breaks(graph_breaks) -> list[str]:
    """Dynamo's graph breaks at a branch on a tensor (LayerDrop's ``if torch.rand([]) < self.layerdrop``)."""
    return [reason for reason in graph_breaks if "jump" in reason.lower() or "branching" in reason.lower()]


ENCODER_DECODER = ["encoder", "encoder", "self", "cross", "self", "cross"]


def _expected(name: str, padded: bool, training: bool = True) -> list[tuple[str, bool, bool]]:
    """(decision, causal, padding) per site, in graph order."""
    if name == "opt":
        return [(FA4, True, padded)] * 2
    if name == "whisper":  # no encoder mask; the padding mask is the decoder's
        return [{"encoder": (FA4, False, False), "self": (FA4, True, padded), "cross": (FA4, False, False)}[kind]
                for kind in ENCODER_DECODER]
    if name == "t5":  # relative-position bias in self-attention (learned: PyTorch's in training, FA4's relative-bias
        # op otherwise, beside the encoder's padding too); cross-attention's bias is zeros
        encoder = (BIAS, False, False) if training else (FA4, False, padded)
        decoder = (BIAS, False, False) if training else (FA4, True, False)
        return [{"encoder": encoder, "self": decoder, "cross": (FA4, False, padded)}[kind] for kind in ENCODER_DECODER]
    return [{"encoder": (FA4, False, padded), "self": (FA4, True, False), "cross": (FA4, False, padded)}[kind]
            for kind in ENCODER_DECODER]


def _decision(record) -> str:
    return FA4 if record.decision == "fa4" else BIAS if (record.reason or "").startswith(
        "attn_mask not expressible") else record.reason


def _inputs(name: str, padded: bool) -> dict:
    ids = torch.randint(3, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    if name == "opt":
        return dict(input_ids=ids, **({"attention_mask": mask} if padded else {}))
    if name == "whisper":
        return dict(input_features=torch.randn(2, 8, 64, dtype=torch.bfloat16), decoder_input_ids=ids,
                    **({"decoder_attention_mask": mask} if padded else {}))
    return dict(input_ids=ids, decoder_input_ids=ids, **({"attention_mask": mask} if padded else {}))


def _logits_and_grads(model, call, inputs):
    model.zero_grad(set_to_none=True)
    logits = call(**inputs).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits.float() * weights).mean().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, impl, padded", [
    *((name, "sdpa", True) for name in ("opt", "bart", "mbart", "marian", "whisper", "t5")),
    ("opt", "eager", True), ("bart", "eager", True), ("opt", "sdpa", False), ("whisper", "sdpa", False)])
def test_training_forward_is_one_graph_with_every_site_on_fa4(name, impl, padded):
    torch.manual_seed(0)
    model_fp32 = _build(name, impl).train()
    model = copy.deepcopy(model_fp32).to(torch.bfloat16)
    inputs = _inputs(name, padded)
    exact = _logits_and_grads(model_fp32, model_fp32, {
        key: value.float() if value.is_floating_point() else value for key, value in inputs.items()})
    eager = _logits_and_grads(model, model, inputs)
    counters = torch._dynamo.utils.counters
    counters["stats"].clear()
    counters["graph_break"].clear()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = _logits_and_grads(model, torch.compile(model), inputs)
    assert not _branch_breaks(counters["graph_break"])
    # torch 2.11's Dynamo also breaks at transformers' copy.deepcopy of the config, outside the layers.
    assert counters["stats"]["unique_graphs"] == 1 or counters["graph_break"]
    records = stats.site_records()
    decisions = [(_decision(r), r.features.get("causal", False), r.features.get("padding", False)) for r in records]
    assert decisions == _expected(name, padded), [(r.node, r.reason) for r in records]
    if name != "t5" and _draws_at_layerdrop_zero():
        assert stats.counters["compile.drawn_branches_decided"] >= 2
    assert got[1].keys() == eager[1].keys()

    def stock():
        torch._dynamo.reset()
        return _logits_and_grads(model, torch.compile(model), inputs)
    assert_as_exact_as_stock(got, eager, stock, exact)


@pytest.mark.parametrize("name", ["opt", "bart", "mbart", "marian", "whisper", "t5"])
def test_inference_runs_the_same_sites_on_fa4(name):
    """``eval()`` under ``no_grad``, padded: the decisions of training but T5's self-attention, whose
    relative-position bias needs no gradient there (FA4's relative-bias op, beside the encoder's key padding too),
    logits as close to the float32 model's as bf16 eager's."""
    torch.manual_seed(0)
    model_fp32 = _build(name, "sdpa").eval()
    model = copy.deepcopy(model_fp32).to(torch.bfloat16)
    inputs = _inputs(name, True)
    with torch.no_grad():
        exact = model_fp32(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}).logits
        eager = model(**inputs).logits.float()
        with fa4_inductor.enabled(eager=False, devices=("cpu",)):
            got = torch.compile(model)(**inputs).logits.float()
    assert [_decision(r) for r in stats.site_records()] == [
        decision for decision, _, _ in _expected(name, True, training=False)]
    assert relative_error(got, exact) <= 1.25 * relative_error(eager, exact) + 1e-2


def test_stock_compile_still_breaks_at_layerdrop_once_disabled():
    """The graph break is stock Dynamo's: with the plugin off, OPT's training forward is split again."""
    if not _draws_at_layerdrop_zero():
        pytest.skip(f"transformers {transformers.__version__} draws no LayerDrop at layerdrop=0")
    torch.manual_seed(0)
    model = _build("opt", "sdpa").train()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        pass
    torch._dynamo.utils.counters["graph_break"].clear()
    torch.compile(model)(**_inputs("opt", True))
    assert _branch_breaks(torch._dynamo.utils.counters["graph_break"])


def test_t5_without_padding_runs_every_site_on_fa4_in_inference():
    """T5 under ``no_grad`` with no padding: its relative-position biases (encoder and decoder self-attention) are FA4's
    relative-bias op, each table computed once per offset from the bias's own code."""
    torch.manual_seed(0)
    model_fp32 = _build("t5", "sdpa").eval()
    model = copy.deepcopy(model_fp32).to(torch.bfloat16)
    inputs = _inputs("t5", False)
    with torch.no_grad():
        exact = model_fp32(**inputs).logits
        eager = model(**inputs).logits.float()
        with fa4_inductor.enabled(eager=False, devices=("cpu",)):
            got = torch.compile(model)(**inputs).logits.float()
    records = stats.site_records()
    assert [_decision(r) for r in records] == [decision for decision, _, _ in _expected("t5", False, training=False)]
    assert [r.features.get("relative_bias", False) for r in records] == [True, True, True, False, True, False]
    assert relative_error(got, exact) <= 1.25 * relative_error(eager, exact) + 1e-2
