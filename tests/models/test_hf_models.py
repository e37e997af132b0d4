"""Real clients: tiny Hugging Face models (random weights, no hub) compiled with the plugin on CPU.

Every attention site must be rewritten (or fall back for the stated, correct
reason), and logits and gradients must match the uncompiled model.
"""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fa4_inductor  # noqa: E402
from tests.compare import assert_parameter_grads_close, relative_error  # noqa: E402
from fa4_inductor import stats  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_compile_cache")

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)


def _build(name: str, impl: str):
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_key_value_heads=2, attn_implementation=impl))
    if name == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(
            **COMMON, num_key_value_heads=2, sliding_window=8, attn_implementation=impl))
    if name == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **COMMON, num_key_value_heads=2, head_dim=16, sliding_window=8, attn_implementation=impl))
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, num_key_value_heads=2, attn_implementation=impl))
    if name in ("olmo", "olmo2", "cohere"):  # rotary in float32, q and k rounded back to bf16 before the scores
        config, model = {"olmo": (transformers.OlmoConfig, transformers.OlmoForCausalLM),
                         "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
                         "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM)}[name]
        return model(config(**COMMON, num_key_value_heads=2, attn_implementation=impl))
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_implementation=impl))
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, attn_implementation=impl))
    if name == "roberta":
        return transformers.RobertaModel(transformers.RobertaConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, pad_token_id=1, attn_implementation=impl))
    if name == "mpt":  # ALiBi added to the scores in float32 (its only attention code)
        return transformers.MptForCausalLM(transformers.MptConfig(
            vocab_size=128, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64))
    if name == "falcon_alibi":
        return transformers.FalconForCausalLM(transformers.FalconConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
            new_decoder_architecture=False, multi_query=False, attn_implementation=impl))
    if name == "bloom":
        return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2,
                                                                      n_head=4))
    raise ValueError(name)


# (model, expected per-site features): every site of these runs FA4.
EXPECTED = {
    "llama": [dict(causal=True, window=None, gqa_ratio=2)] * 2,
    "qwen2": [dict(causal=True, window=None, gqa_ratio=2)] * 2,
    "mistral": [dict(causal=False, window=(7, 0), gqa_ratio=2)] * 2,
    "gpt2": [dict(causal=True, window=None, gqa_ratio=1)] * 2,
    **{name: [dict(causal=True, window=None, gqa_ratio=2, dtype="bfloat16")] * 2 for name in ("olmo", "olmo2", "cohere")},
    "mpt": [dict(causal=True, window=None, alibi=True)] * 2,
}
SOFTCAP = {"sdpa": None, "eager": 50.0}  # HF's SDPA path drops Gemma2's softcap; eager applies it


def _output(model, ids, kwargs):
    out = model(ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _logits_and_grads(model, ids, kwargs, call=None):
    """Logits of ``call`` (default: ``model``) and the gradients of ``model``'s parameters."""
    model.zero_grad(set_to_none=True)
    logits = _output(model if call is None else call, ids, kwargs)
    # A fixed random projection: a plain square().mean() of BERT's LayerNorm-ed output has ~zero gradient.
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    if "attention_mask" in kwargs:  # padded positions are don't-care outputs: keep them out of the loss
        weights = weights * kwargs["attention_mask"][..., None]
    (logits.float() * weights).mean().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, impl", [
    *((name, impl) for name in ("llama", "mistral", "gemma2", "qwen2", "gpt2") for impl in ("sdpa", "eager")),
    *((name, "eager") for name in ("olmo", "olmo2", "cohere", "mpt"))])  # their sdpa paths read q and k as llama's do
def test_decoder_sites_run_fa4_and_match_eager(name, impl):
    torch.manual_seed(0)
    try:
        model = _build(name, impl).to(torch.bfloat16).eval()  # eval: dropout off, grads still flow
    except ValueError as exc:  # transformers >= 5.23 has no SDPA path for Gemma 2 (its softcap)
        if not (name == "gemma2" and impl == "sdpa" and "does not support an attention implementation" in str(exc)):
            raise
        pytest.skip(f"transformers {transformers.__version__} builds no SDPA Gemma 2")
    ids = torch.randint(0, 128, (2, 24))
    want, want_grads = _logits_and_grads(model, ids, {})
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got, got_grads = _logits_and_grads(model, ids, {}, call=torch.compile(model))
    records = stats.site_records()
    assert [r.decision for r in records] == ["fa4", "fa4"], [(r.node, r.reason) for r in records]
    expected = EXPECTED.get(name) or [dict(causal=False, window=(7, 0), softcap=SOFTCAP[impl]),
                                      dict(causal=True, window=None, softcap=SOFTCAP[impl])]
    for record, features in zip(records, expected):
        assert {k: record.features[k] for k in features} == features
        assert record.pattern == ("sdpa" if impl == "sdpa" else "eager_attention")
    assert relative_error(got, want) < 2e-2
    assert_parameter_grads_close(got_grads, want_grads)


FLEX_EXPECTED = {  # per-site features with attn_implementation="flex_attention"
    "llama": [dict(causal=True, window=None, softcap=None)] * 2,
    "mistral": [dict(causal=False, window=(7, 0), softcap=None)] * 2,
    "gemma2": [dict(causal=False, window=(7, 0), softcap=50.0), dict(causal=True, window=None, softcap=50.0)],
}


@pytest.mark.parametrize("name, padded, dynamic", [("llama", True, False), ("mistral", False, False),
                                                   ("gemma2", True, False), ("llama", True, True),
                                                   ("mistral", False, True)],
                         ids=["llama-left_padded", "mistral", "gemma2-left_padded", "llama-left_padded-dynamic",
                              "mistral-dynamic"])
def test_flex_attention_models_run_fa4_and_match_eager(name, padded, dynamic, monkeypatch):
    """``attn_implementation="flex_attention"``: every flex_attention call runs FA4; logits and gradients equal the
    same weights under ``"eager"`` attention (FlexAttention has no CPU backward to compare with: its device check
    is lifted so Dynamo traces it, and the rewritten graph runs FA4's CPU reference). Under ``dynamic=True`` the
    mask functions' cache offsets are graph sizes, 0 here: the rewrite holds under a guard on that; Mistral's
    sliding window, a captured int, is a symbol too, taken at its value under a guard; a longer batch then
    compiles nothing new."""
    from torch.nn.attention import flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    torch.manual_seed(0)
    model = _build(name, "flex_attention").to(torch.bfloat16).eval()
    reference = _build(name, "eager").to(torch.bfloat16).eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 16))
    kwargs = {"attention_mask": _padding_mask("left")} if padded else {}
    want, want_grads = _logits_and_grads(reference, ids, kwargs)
    compiled = torch.compile(model, dynamic=dynamic)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got, got_grads = _logits_and_grads(model, ids, kwargs, call=compiled)
        if dynamic:  # a longer batch reuses every graph (HF's mask code breaks the graph: a few graphs, all kept)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            longer = {"attention_mask": torch.cat([kwargs["attention_mask"]] * 2, 1)} if padded else {}
            _logits_and_grads(model, torch.randint(0, 128, (2, 32)), longer, call=compiled)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    records = stats.site_records()
    if dynamic:  # Dynamo restarts once to specialize float attributes (see the Gemma2 dynamic test): last graph
        assert {r.decision for r in records} == {"fa4"}, [(r.node, r.reason) for r in records]
        records = records[-2:]
    assert [r.decision for r in records] == ["fa4", "fa4"], [(r.node, r.reason) for r in records]
    for record, features in zip(records, FLEX_EXPECTED[name]):
        assert record.pattern == "flex_attention"
        assert {k: record.features[k] for k in features} == features and record.features["padding"] == padded
    valid = kwargs["attention_mask"].bool() if padded else torch.ones(ids.shape, dtype=torch.bool)
    assert torch.isfinite(got).all()
    assert relative_error(got[valid], want[valid]) < 2e-2
    assert_parameter_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("name, impl, padded", [
    ("falcon_alibi", "sdpa", False), ("falcon_alibi", "sdpa", True), ("falcon_alibi", "eager", False),
    ("falcon_alibi", "eager", True), ("bloom", "eager", False), ("bloom", "eager", True)])
def test_alibi_counted_from_the_attention_mask(name, impl, padded):
    """Falcon and Bloom count their ALiBi positions from the attention mask (``cumsum``) and round ``slope *
    position`` to bfloat16: a bias per batch row, head and key, the same for every query, which FA4's key-bias op adds
    as those very values, beside causal and key padding. Bloom writes it over (B * H, S, S) scores (``baddbmm`` of
    operands with the heads folded into the batch, viewed as (B, H, S, S) for the mask and the softmax, folded again
    for ``bmm``); Falcon's eager code before transformers 5.23 adds it twice, ``(q·kᵀ + alibi) * s`` and ``alibi * s``
    laid in the mask (two biases per key, summed, the first scaled): the same FA4 call. Logits and gradients match
    eager."""
    torch.manual_seed(0)
    model = _build(name, impl).to(torch.bfloat16).eval()
    kwargs = {"attention_mask": _padding_mask("left")} if padded else {}
    ids = torch.randint(0, 128, (2, 16 if padded else 24))
    want, want_grads = _logits_and_grads(model, ids, kwargs)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got, got_grads = _logits_and_grads(model, ids, kwargs, call=torch.compile(model))
    records = stats.site_records()
    assert len(records) == 2, records
    assert all(r.decision == "fa4" and r.features["key_bias"] and r.features["causal"]
               and r.features["padding"] == padded for r in records), [r.reason for r in records]
    valid = kwargs["attention_mask"].bool() if padded else torch.ones(ids.shape, dtype=torch.bool)
    assert relative_error(got[valid], want[valid]) < 2e-2
    assert_parameter_grads_close(got_grads, want_grads)


def test_bloom_under_dynamic_shapes_keeps_one_graph_on_fa4():
    """dynamic=True makes Bloom's float ``beta`` and ``alpha`` graph scalars: ``beta`` is decided (guarded) and
    ``alpha`` is the scale; new batch sizes and lengths reuse the one graph, every site on FA4."""
    torch.manual_seed(0)
    model = _build("bloom", "eager").to(torch.bfloat16).eval()
    compiled = torch.compile(model, dynamic=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)), torch.no_grad():
        for batch, length in ((2, 24), (3, 40)):
            ids = torch.randint(0, 128, (batch, length))
            assert relative_error(compiled(ids).logits.float(), model(ids).logits.float()) < 2e-2
    assert counters["stats"]["unique_graphs"] == 1
    records = stats.site_records()  # (Dynamo restarts its analysis once: the pass may run on both attempts)
    assert records and all(r.decision == "fa4" and r.features["key_bias"] for r in records), records


def test_mpt_left_padded_batch_runs_fa4_alibi_with_key_padding():
    """MPT's ALiBi beside a left-padded batch's causal mask: FA4's ALiBi op with key padding (its mask_mod and block
    sparsity beside the ALiBi score_mod), logits and gradients equal eager's on the real tokens."""
    torch.manual_seed(0)
    model = _build("mpt", "eager").to(torch.bfloat16).eval()
    kwargs = {"attention_mask": _padding_mask("left")}
    ids = torch.randint(0, 128, (2, 16))
    want, want_grads = _logits_and_grads(model, ids, kwargs)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got, got_grads = _logits_and_grads(model, ids, kwargs, call=torch.compile(model))
    records = stats.site_records()
    assert [r.decision for r in records] == ["fa4", "fa4"], [r.reason for r in records]
    assert all(r.features["alibi"] and r.features["padding"] and r.features["causal"] for r in records)
    valid = kwargs["attention_mask"].bool()
    assert relative_error(got[valid], want[valid]) < 2e-2
    assert_parameter_grads_close(got_grads, want_grads)


def test_no_mask_tensor_left_in_compiled_graph():
    torch.manual_seed(0)
    model = _build("mistral", "sdpa").to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 24))
    from torch._inductor.utils import run_and_get_code
    with fa4_inductor.enabled(eager=False, devices=("cpu",)), torch.no_grad():
        _, codes = run_and_get_code(torch.compile(model), ids)
    code = "\n".join(codes)
    assert code.count("fa4.flash_attn_fwd_kernel.default(") == 2
    # No (B, 1, S, S) boolean mask and no repeated K/V (B, H, S, D) buffer is built.
    assert "torch.bool" not in code and "(2, 1, 24, 24)" not in code


def test_gpt2_training_dropout_falls_back_with_reason():
    torch.manual_seed(0)
    model = _build("gpt2", "sdpa").to(torch.bfloat16).train()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(model)(torch.randint(0, 128, (2, 16)))
    records = stats.site_records()
    assert len(records) == 2 and all(r.decision == "fallback" and "dropout_p=0.1" in r.reason for r in records)


def _padding_mask(side: str) -> torch.Tensor:
    """Row 0 full, row 1 with 6 padded positions on the given side."""
    mask = torch.ones(2, 16, dtype=torch.long)
    if side == "right":
        mask[1, 10:] = 0
    else:
        mask[1, :6] = 0
    return mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["bert", "roberta", "llama"])
def test_padding_mask_runs_fa4_and_stays_exact(name, impl, side):
    """A padded batch: the (B, S) attention mask becomes FA4's key_padding, forward and backward."""
    torch.manual_seed(0)
    model = _build(name, impl).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 16))
    kwargs = {"attention_mask": _padding_mask(side)}
    want, want_grads = _logits_and_grads(model, ids, kwargs)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got, got_grads = _logits_and_grads(model, ids, kwargs, call=torch.compile(model))
    records = stats.site_records()
    assert [r.decision for r in records] == ["fa4", "fa4"], [(r.node, r.reason) for r in records]
    assert all(r.features["padding"] and r.features["causal"] == (name == "llama") for r in records)
    valid = kwargs["attention_mask"].bool()  # padded positions' outputs are don't-care in HF, but must be finite
    assert torch.isfinite(got).all()
    assert relative_error(got[valid], want[valid]) < 2e-2
    assert_parameter_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_layers_of_a_padded_batch_share_one_masking_buffer(name, training):
    """The model builds its padding mask once; the compiled step makes one masking buffer for both layers, in
    training (AOTAutograd's CSE) and in inference (the plugin's post-grad pass)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = _build(name, "sdpa").to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 16))
    with fa4_inductor.enabled(eager=False, devices=("cpu",)), torch.set_grad_enabled(training):
        _, (forward, *_) = run_and_get_code(torch.compile(model), ids, attention_mask=_padding_mask("left"))
    assert forward.count("fa4.masking_buffer.default(") == 1
    assert forward.count("fa4.flash_attn_fwd_masked_kernel.default(") == 2


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_packed_sequences_from_position_ids_run_fa4_documents(name):
    """Packed training batches (restarting ``position_ids``, no attention mask, no cache): Hugging Face derives
    segment ids in the graph and ands ``seg[b, q] == seg[b, kv]`` into the mask; every site runs FA4 with them."""
    torch.manual_seed(0)
    model = _build(name, "sdpa").to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 24))
    kwargs = {"position_ids": torch.cat([torch.arange(7), torch.arange(12), torch.arange(5)])[None].expand(2, 24),
              "use_cache": False}
    want, want_grads = _logits_and_grads(model, ids, kwargs)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got, got_grads = _logits_and_grads(model, ids, kwargs, call=torch.compile(model))
    records = stats.site_records()
    assert [r.decision for r in records] == ["fa4", "fa4"], [(r.node, r.reason) for r in records]
    assert all(r.features["documents"] for r in records)
    assert relative_error(got, want) < 2e-2
    assert_parameter_grads_close(got_grads, want_grads)


def test_gemma2_eager_dynamic_shapes_graph_scalars():
    """dynamic=True turns Gemma2's float attributes (scale, softcap, dropout p) into graph scalars.

    The rewrite accepts them; since a custom op's float argument can't be
    tensorified, Dynamo then restarts once and specializes them with value
    guards, so the final graph (the last two records) has constants.
    """
    torch.manual_seed(0)
    model = _build("gemma2", "eager").to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 24))
    want = _output(model, ids, {})
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = _output(torch.compile(model, dynamic=True), ids, {})
    records = stats.site_records()
    assert [r.decision for r in records] in (["fa4"] * 2, ["fa4"] * 4), [r.reason for r in records]
    assert [r.features["softcap"] for r in records[-2:]] == [50.0, 50.0]
    assert relative_error(got.float(), want.float()) < 2e-2


def test_static_cache_generate_decodes_on_fa4():
    """``generate`` with a static KV cache, its decoding step compiled (HF's own auto-compile).

    Each step gets a (B, 1, 1, max_cache_len) mask: keys past the current
    position and the left padding are hidden. The compiled step's sites
    run FA4 with that mask as key padding; tokens and per-step logits
    match stock compiled generation (fp16, where near-ties of bf16 logits
    don't flip a greedy token), and it compiles no more graphs than stock's,
    over two generations.
    """
    from transformers.generation.configuration_utils import CompileConfig

    torch.manual_seed(0)
    model = _build("llama", "sdpa").to(torch.float16).eval()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 128, (2, 10))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # HF auto-compiles the decoding step on GPUs only

    def generate():
        return model.generate(ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                              cache_implementation="static", compile_config=compile_config,
                              return_dict_in_generate=True, output_logits=True)
    graphs = torch._dynamo.utils.counters["stats"]
    graphs.clear()
    want = generate()
    stock_graphs = graphs["unique_graphs"]
    torch._dynamo.reset()
    graphs.clear()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = generate()
        generate()  # a second generation reuses the compiled step
    records = stats.site_records()
    assert [r.decision for r in records] == ["fa4", "fa4"], [r.reason for r in records]
    assert graphs["unique_graphs"] == stock_graphs, "the plugin's decoding step recompiled where stock's did not"
    assert all(r.features["padding"] and r.features["q_shape"].endswith(", 1, 16)") for r in records)
    assert torch.equal(got.sequences, want.sequences)
    for got_step, want_step in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(got_step, want_step, atol=2e-3, rtol=2e-3)


def test_disabling_leaves_pytorch_as_it_was():
    """After compiling and training GPT-2 with the plugin (compile and eager routing on), PyTorch is as before: the
    Inductor settings and SDPA kernels are the stock ones, and a stock torch.compile of the same model (the graphs
    Dynamo compiled under the plugin reused, and after a reset compiled anew) gives eager's gradients."""
    from torch._inductor import config as inductor_config

    torch.manual_seed(0)
    model = _build("gpt2", "sdpa").to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 24))
    settings = {name: getattr(inductor_config, name) for name in (
        "pre_grad_custom_pass", "post_grad_custom_post_pass", "pre_grad_pass_timing") if hasattr(inductor_config, name)}
    kernel = repr(torch.library.get_kernel("aten::scaled_dot_product_attention", "AutogradCPU"))
    want, want_grads = _logits_and_grads(model, ids, {})
    with fa4_inductor.enabled(devices=("cpu",)):
        _logits_and_grads(model, ids, {}, call=torch.compile(model))
    assert stats.counters["compile.fa4"] == 2
    assert {name: getattr(inductor_config, name) for name in settings} == settings
    assert repr(torch.library.get_kernel("aten::scaled_dot_product_attention", "AutogradCPU")) == kernel
    for reset in (False, True):
        if reset:
            torch._dynamo.reset()
        got, got_grads = _logits_and_grads(model, ids, {}, call=torch.compile(model))
        assert relative_error(got, want) < 2e-2
        assert_parameter_grads_close(got_grads, want_grads)
