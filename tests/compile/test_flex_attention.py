"""FlexAttention calls become FA4 calls when their mods are bands, padding, documents or softcap.

Compiled with the plugin, a ``flex_attention`` call must equal what
FlexAttention computes, at every position, forward and backward. FlexAttention
has no CPU backward, so the reference is the dense computation of its
definition (score_mod on the scaled scores, mask_mod on every position, rows
with no key give zeros); one test checks that reference against eager
FlexAttention's forward. Tracing ``flex_attention`` with CPU tensors that
need gradients stops at its device check, which the ``cpu_backward`` fixture
lifts: the rewritten graph runs FA4's CPU reference, which has a backward.
"""

import pytest
import torch
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, create_mask, flex_attention

import fa4_inductor
from fa4_inductor import stats
from tests.compare import assert_matches_eager
from tests.compile.flex_reference import flex_reference as reference

pytestmark = pytest.mark.usefixtures("no_compile_cache")

B, H, S, D = 2, 4, 200, 16
LENGTHS = torch.tensor([S, 123])
PADDING = torch.arange(S)[None, :] < LENGTHS[:, None]
DOCUMENTS = torch.stack([torch.arange(S) // 60, torch.arange(S) // 90])
SHARED_DOCUMENTS = torch.arange(S) // 70  # one packing for every row (gpt-fast's document_id)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 48)


def _symmetric_window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 30


def _padded_causal(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & PADDING[b, kv_idx]


def _documents(b, h, q_idx, kv_idx):
    return DOCUMENTS[b, q_idx] == DOCUMENTS[b, kv_idx]


def _lengths_causal(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (kv_idx < LENGTHS[b])


def _shared_documents(b, h, q_idx, kv_idx):
    return SHARED_DOCUMENTS[q_idx] == SHARED_DOCUMENTS[kv_idx]


def _documents_padding_window(b, h, q_idx, kv_idx):
    return _documents(b, h, q_idx, kv_idx) & PADDING[b, kv_idx] & (q_idx - kv_idx < 40) & (q_idx >= kv_idx)


def _fixed_blocks(b, h, q_idx, kv_idx):  # torchtitan's fixed-block mask_mod
    return q_idx // 64 == kv_idx // 64


def _causal_fixed_blocks(b, h, q_idx, kv_idx):  # and_masks(causal, fixed blocks)
    return (q_idx >= kv_idx) & (q_idx // 48 == kv_idx // 48)


MASK_MODS = {  # name: (mask_mod, expected FA4 features)
    "full": (None, dict(causal=False, window=None, padding=False, documents=False)),
    "causal": (_causal, dict(causal=True, window=None, padding=False, documents=False)),
    "window": (_window, dict(causal=False, window=(47, 0), padding=False, documents=False)),
    "symmetric_window": (_symmetric_window, dict(causal=False, window=(30, 30), padding=False, documents=False)),
    "padded_causal": (_padded_causal, dict(causal=True, window=None, padding=True, documents=False)),
    "documents": (_documents, dict(causal=False, window=None, padding=False, documents=True)),
    "lengths_causal": (_lengths_causal, dict(causal=True, window=None, padding=True, documents=False)),
    "shared_documents": (_shared_documents, dict(causal=False, window=None, padding=False, documents=True)),
    "documents_padding_window": (_documents_padding_window,
                                 dict(causal=False, window=(39, 0), padding=True, documents=True)),
    "fixed_blocks": (_fixed_blocks, dict(causal=False, window=None, padding=False, documents=True)),
    "causal_fixed_blocks": (_causal_fixed_blocks, dict(causal=True, window=None, padding=False, documents=True)),
}


def _softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def _softcap_method(score, b, h, q_idx, kv_idx):
    return (score * 0.05).tanh() * 20.0


def _doubled(score, b, h, q_idx, kv_idx):
    return score * 2


SCORE_MODS = {"identity": (None, None), "scale": (_doubled, None), "softcap": (_softcap, 20.0),
              "softcap_method": (_softcap_method, 20.0)}


@pytest.fixture
def cpu_backward(monkeypatch):
    """Let Dynamo trace flex_attention on CPU tensors that need gradients (see the module docstring)."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


def _qkv(heads_kv=H, dtype=torch.bfloat16, length=S):
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, h, length, D, generator=generator, dtype=dtype).requires_grad_()
                 for h in (H, heads_kv, heads_kv))


def _flex(mask_mod, score_mod=None, **flex_kwargs):
    """A program that builds its block mask in the graph and calls flex_attention."""
    def program(q, k, v):
        block_mask = None if mask_mod is None else create_block_mask(
            mask_mod, B=q.shape[0], H=None, Q_LEN=q.shape[2], KV_LEN=k.shape[2], device=q.device)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                              enable_gqa=q.shape[1] != k.shape[1], **flex_kwargs)
    return program


def _only_site(expected: dict | None = None, decision="fa4"):
    (record,) = stats.site_records()
    assert record.pattern == "flex_attention"
    assert record.decision == decision, record.reason
    for name, value in (expected or {}).items():
        assert record.features[name] == value, (name, record.features)
    return record


def test_reference_is_what_flex_attention_computes():
    q, k, v = (t.detach() for t in _qkv(heads_kv=2, dtype=torch.float32))
    for mask_mod, score_mod in ((_documents_padding_window, _softcap), (_symmetric_window, _doubled)):
        block_mask = create_block_mask(mask_mod, B, None, S, S, device="cpu")
        got, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                                  return_aux=AuxRequest(lse=True))
        want, want_lse = reference(q, k, v, score_mod, mask_mod)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse.lse, want_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask", list(MASK_MODS))
@pytest.mark.parametrize("heads_kv", [H, 2], ids=["mha", "gqa"])
def test_mask_mods_run_fa4_and_match(mask, heads_kv, cpu_backward):
    mask_mod, expected = MASK_MODS[mask]
    program = _flex(mask_mod)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = assert_matches_eager(lambda q, k, v: reference(q, k, v, mask_mod=mask_mod)[0],
                                   torch.compile(program, fullgraph=True), _qkv(heads_kv), label=mask)
    assert not got.isnan().any()
    _only_site({**expected, "gqa_ratio": H // heads_kv, "block_mask": "built in graph"})


def _padded_causal_row_lookup(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & PADDING[b][kv_idx]


def test_a_padding_row_looked_up_then_indexed_runs_fa4(cpu_backward):
    """``pad[b][kv_idx]`` (a row, then its entry) is ``pad[b, kv_idx]``: FA4's key padding. Stock FlexAttention fails
    on this spelling (eager ``create_block_mask`` and Inductor's lowering, torch 2.13 and 2.15), so the reference is
    the ``pad[b, kv_idx]`` program."""
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(lambda q, k, v: reference(q, k, v, mask_mod=_padded_causal)[0],
                             torch.compile(_flex(_padded_causal_row_lookup), fullgraph=True), _qkv())
    _only_site(dict(causal=True, padding=True))


@pytest.mark.parametrize("score", list(SCORE_MODS))
def test_score_mods_run_fa4_and_match(score, cpu_backward):
    score_mod, softcap = SCORE_MODS[score]
    program = _flex(_causal, score_mod, scale=0.3)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(lambda q, k, v: reference(q, k, v, score_mod, _causal, scale=0.3)[0],
                             torch.compile(program, fullgraph=True), _qkv(), label=score)
    _only_site({"softcap": softcap, "causal": True})


@pytest.mark.parametrize("backend", ["AUTO", "FLASH"])
def test_logsumexp_is_returned_in_natural_log(backend, cpu_backward):
    """FlexAttention's op returns log2 statistics except on the FLASH backend and rescales them; both agree."""
    def program(q, k, v):
        block_mask = create_block_mask(_padded_causal, B, None, S, S, device=q.device)
        out, aux = flex_attention(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True),
                                  kernel_options={"BACKEND": backend})
        return out, aux.lse

    q, k, v = _qkv()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        out, lse = torch.compile(program, fullgraph=True)(q, k, v)
    want, want_lse = reference(q, k, v, mask_mod=_padded_causal)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)
    (lse.exp().nan_to_num().sum() + out.sum()).backward()  # the logsumexp's gradient flows too
    _only_site({"flex_backend": backend})


def test_block_mask_built_in_the_graph_is_removed(cpu_backward):
    """No mask construction is left in the compiled step: no (B, H, S, S) mask, no block sums, no argsort."""
    from torch._inductor.utils import run_and_get_code

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        _, (code, *_) = run_and_get_code(torch.compile(_flex(_padded_causal), fullgraph=True), *_qkv())
    assert "flash_attn_fwd" in code
    assert "argsort" not in code and "aten.sum" not in code and "aten.ge" not in code, code
    _only_site({"block_mask": "built in graph"})


def test_block_mask_given_as_input(cpu_backward):
    """A block mask built outside the compiled region (torchtitan, gpt-fast): its lists are unused inputs."""
    block_mask = create_block_mask(_documents_padding_window, B, None, S, S, device="cpu")

    def program(q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(lambda q, k, v, _: reference(q, k, v, mask_mod=_documents_padding_window)[0],
                             torch.compile(program, fullgraph=True), _qkv(2), (block_mask,))
    _only_site({"block_mask": "graph input", "padding": True, "documents": True})


def test_dynamic_lengths_keep_one_graph(cpu_backward):
    """New lengths reuse the graph (with as many 128-blocks: create_block_mask's own tracing guards on that)."""
    torch._dynamo.utils.counters.clear()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(_flex(_window, _softcap), dynamic=True, fullgraph=True)
        for length in (130, 201, 256):
            q, k, v = _qkv(2, length=length)
            assert_matches_eager(lambda q, k, v: reference(q, k, v, _softcap, _window)[0], compiled, (q, k, v))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert {r.decision for r in stats.site_records()} == {"fa4"}


SLOPES = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)])  # ALiBi's geometric slopes (float32)


def _alibi_slopes(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def _alibi_symmetric(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (kv_idx - q_idx).abs()


def _alibi_quadratic(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx) * (kv_idx - q_idx)


RELATIVE_TABLE = torch.randn(H, 2 * S)


def _relative_table(score, b, h, q_idx, kv_idx):
    return score + RELATIVE_TABLE[h, kv_idx - q_idx + S]


def _relative_table_short(score, b, h, q_idx, kv_idx):  # offsets below -S + 3 read before the table's start
    return score + RELATIVE_TABLE[h, kv_idx - q_idx + S - 4]


def _alibi_from_head_index(score, b, h, q_idx, kv_idx):
    return score - (h + 1) * (q_idx - kv_idx)


def _alibi_attention_gym(score, b, h, q_idx, kv_idx):
    """attention-gym's ALiBi: the slope computed from the head index."""
    return score + (kv_idx - q_idx) * torch.exp2(-((h + 1) * 8.0 / H))


def _prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 32) | (q_idx >= kv_idx)


def _batch_dependent(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) | (b == 0)


@pytest.mark.parametrize("score_mod, mask_mod, reason", [
    (None, _prefix_lm, "mask_mod not expressible in FA4"),
    (None, _batch_dependent, "depends on the batch or head index"),
    (_alibi_symmetric, None, "score_mod uses abs"),
    (_alibi_quadratic, _causal, "not a slope per head times kv_idx"),
    (_relative_table_short, _causal, "outside its 400 entries"),
], ids=["prefix_lm", "batch_dependent", "alibi_symmetric", "alibi_quadratic", "relative_table_too_short"])
def test_mods_fa4_cannot_express_stay_with_flex_attention(score_mod, mask_mod, reason):
    q, k, v = (t.detach() for t in _qkv())
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(_flex(mask_mod, score_mod), fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, reference(q, k, v, score_mod, mask_mod)[0], atol=2e-2, rtol=2e-2)
    assert reason in _only_site(decision="fallback").reason


def test_block_lists_without_a_mask_mod_stay_with_flex_attention():
    """``BlockMask.from_kv_blocks`` with no mask_mod: the lists alone are the mask, so the site stays."""
    q, k, v = (t.detach() for t in _qkv(length=256))
    kv_num_blocks = torch.ones(1, 1, 2, dtype=torch.int32)
    kv_indices = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32)  # each query block sees one key block
    block_mask = BlockMask.from_kv_blocks(kv_num_blocks, kv_indices)

    def program(q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        got = torch.compile(program, fullgraph=True)(q, k, v, block_mask)
    diagonal = create_mask(lambda b, h, i, j: i // 128 == j // 128, 1, 1, 256, 256, "cpu")
    torch.testing.assert_close(got, reference(q, k, v, mask_mod=lambda b, h, i, j: diagonal[0, 0, i, j])[0],
                               atol=2e-2, rtol=2e-2)
    assert "from_kv_blocks" in _only_site(decision="fallback").reason


def test_padding_with_a_block_mask_for_one_row_stays_with_flex_attention():
    """``create_block_mask(B=None)`` with a per-row mask: FlexAttention skips the mask_mod in row 0's full blocks for
    every row, which is not what the mask_mod says; the plugin keeps that program as it is."""
    q, k, v = (t.detach() for t in _qkv())

    def program(q, k, v):
        block_mask = create_block_mask(_padded_causal, None, None, S, S, device=q.device)
        return flex_attention(q, k, v, block_mask=block_mask)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        torch.compile(program, fullgraph=True)(q, k, v)
    assert "one batch row" in _only_site(decision="fallback").reason


def test_running_maxima_stay_with_flex_attention(monkeypatch):
    """A caller reading ``AuxRequest(max_scores=True)`` keeps FlexAttention (FA4 returns no maxima). FlexAttention
    refuses maxima on CPU while tracing, so its kernel options are patched to ask for them anyway; ``explain`` only
    reports (it runs the graph as traced)."""
    original = flex_module._apply_kernel_options

    def asking_for_maxima(query, key, value, return_lse, kernel_options, return_aux=None):
        options = original(query, key, value, return_lse, kernel_options, AuxRequest(lse=True))
        return {**options, "OUTPUT_MAX": bool(return_aux and return_aux.max_scores)}

    monkeypatch.setattr(flex_module, "_apply_kernel_options", asking_for_maxima)

    def program(q, k, v):
        out, aux = _flex(_causal, return_aux=AuxRequest(max_scores=True))(q, k, v)
        return out, aux.max_scores

    (record,) = fa4_inductor.explain(program, *(t.detach() for t in _qkv())).records
    assert record.decision == "fallback" and "running maxima" in record.reason


def test_shared_documents_with_a_block_mask_for_one_row_run_fa4(cpu_backward):
    """Document ids shared by every row look the same from every row, so a ``B=None`` block mask is exact."""
    def program(q, k, v):
        block_mask = create_block_mask(_shared_documents, None, None, S, S, device=q.device)
        return flex_attention(q, k, v, block_mask=block_mask)

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(lambda q, k, v: reference(q, k, v, mask_mod=_shared_documents)[0],
                             torch.compile(program, fullgraph=True), _qkv())
    _only_site({"documents": True, "padding": False})


def _alibi_scaled_key_positions(score, b, h, q_idx, kv_idx):
    return 2 * score - 0.5 * SLOPES[h] * kv_idx  # a constant per row away from -0.5·slope·(kv_idx - q_idx)


@pytest.mark.parametrize("score_mod, mask_mod, heads_kv", [
    (_alibi_slopes, _causal, H), (_alibi_slopes, _window, 2), (_alibi_slopes, None, H),
    (_alibi_scaled_key_positions, _causal, 2), (_alibi_attention_gym, _causal, 2), (_alibi_from_head_index, None, H),
    (_alibi_slopes, _padded_causal, 2),
], ids=["causal", "window_gqa", "no_mask", "scaled_key_positions_gqa", "attention_gym_gqa", "from_head_index",
        "padded_causal_gqa"])
def test_alibi_score_mods_run_fa4_alibi_and_match(score_mod, mask_mod, heads_kv, cpu_backward):
    """ALiBi read from a captured slopes tensor becomes FA4's ALiBi score_mod (fa4.flash_attn_alibi_fwd), forward
    and backward, at every position."""
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(lambda q, k, v: reference(q, k, v, score_mod, mask_mod, scale=0.3)[0],
                             torch.compile(_flex(mask_mod, score_mod, scale=0.3), fullgraph=True), _qkv(heads_kv))
    _only_site({"alibi": True, "causal": mask_mod in (_causal, _padded_causal),
                "padding": mask_mod is _padded_causal})


@pytest.mark.parametrize("mask_mod, heads_kv", [(_causal, 2), (None, H), (_documents, H)],
                         ids=["causal_gqa", "no_mask", "documents"])
def test_relative_table_score_mods_run_fa4_relative_bias_and_match(mask_mod, heads_kv, cpu_backward):
    """A relative-position table read at [h, kv_idx - q_idx + c] becomes FA4's relative-bias op, the table sliced to
    the offsets, forward and backward."""
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(lambda q, k, v: reference(q, k, v, _relative_table, mask_mod, scale=0.3)[0],
                             torch.compile(_flex(mask_mod, _relative_table, scale=0.3), fullgraph=True),
                             _qkv(heads_kv))
    _only_site({"relative_bias": True, "causal": mask_mod is _causal, "documents": mask_mod is _documents})
