"""Masks given as data (#41 item 1): a mask the compiled code did not build runs FA4 when its values are a mask FA4
expresses, decided at run time on the tensor itself, and dense attention on the mask otherwise; compiled with the
plugin (CPU reference) against eager, forward and backward, with the route each call took counted."""

import pytest
import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor import stats
from fa4_inductor.runtime import mask_verdict
from tests.compare import assert_matches_eager

pytestmark = pytest.mark.usefixtures("no_compile_cache")

B, H, S, D, E = 2, 4, 16, 16, 64


@pytest.fixture(autouse=True)
def fresh_verdicts():
    mask_verdict.CACHE.clear()
    yield
    mask_verdict.CACHE.clear()


def _qkv():
    torch.manual_seed(0)
    return [torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]


def _compile_and_compare(fn, inputs, extra=(), dynamic=False):
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        assert_matches_eager(fn, compiled, inputs, extra)
    records = stats.site_records()
    assert records and all(r.decision == "fa4" and r.features.get("mask") == "data, checked at run time"
                           for r in records), records
    return compiled


class MinGPT(torch.nn.Module):
    """minGPT/nanoGPT's causal buffer, sliced to the sequence and compared with 0."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32))

    def forward(self, q, k, v):
        t = q.shape[2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / D ** 0.5)
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return torch.softmax(att, dim=-1) @ v


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_min_gpt_causal_buffer_runs_fa4(dynamic):
    _compile_and_compare(MinGPT(), _qkv(), dynamic=dynamic)
    assert stats.counters["data_mask.fa4"] >= 2 and stats.counters["data_mask.pytorch"] == 0


def test_gpt_fast_gathered_causal_mask_runs_fa4():
    """gpt-fast: ``causal_mask[None, None, input_pos]`` of a tril buffer, given to SDPA (prefill)."""
    causal_mask = torch.tril(torch.ones(32, 32, dtype=torch.bool))

    def prefill(q, k, v, input_pos):
        mask = causal_mask[None, None, input_pos][..., :S]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    _compile_and_compare(prefill, _qkv(), (torch.arange(S),))
    assert stats.counters["data_mask.fa4"] >= 2


def _compile_and_compare_loosely(fn, inputs, extra):
    """As :func:`_compile_and_compare`, for two bf16 layers: eager's own gradient error against float64 is ~4 %
    of the largest gradient there (the plugin's, in float32 attention, ~3 %)."""
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        assert_matches_eager(fn, torch.compile(fn, fullgraph=True), inputs, extra, grad_atol=5e-2)
    records = stats.site_records()
    assert len(records) == 2 and all(r.decision == "fa4" and r.features.get("mask") == "data, checked at run time"
                                     for r in records), records


def test_transformer_encoder_with_an_external_causal_mask_runs_fa4():
    """PyTorch's tutorials: ``nn.TransformerEncoder`` given ``generate_square_subsequent_mask(S)`` made outside."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=128, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(torch.bfloat16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(S, dtype=torch.bfloat16)
    x = torch.randn(B, S, E, dtype=torch.bfloat16, requires_grad=True)
    # is_causal=False as given: left None, the encoder compares the mask with a causal one (no graph for that).
    _compile_and_compare_loosely(lambda x, mask: encoder(x, mask=mask, is_causal=False), [x], (causal,))
    assert stats.counters["data_mask.pytorch"] == 0 and stats.counters["data_mask.fa4"] >= 4


def test_multihead_attention_with_external_causal_and_padding_masks_runs_fa4():
    """``nn.MultiheadAttention`` given a bool causal mask and a key padding mask, both made outside (a padded
    encoder stack with both masks does not trace even in stock torch.compile)."""
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(E, H, batch_first=True).to(torch.bfloat16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(S).isinf()
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, -5:] = True

    def fn(x, mask, key_padding):
        return attention(x, x, x, attn_mask=mask, key_padding_mask=key_padding, need_weights=False)[0]

    x = torch.randn(B, S, E, dtype=torch.bfloat16, requires_grad=True)
    _compile_and_compare(fn, [x], (causal, padding))
    assert stats.counters["data_mask.pytorch"] == 0 and stats.counters["data_mask.fa4"] >= 2


def test_a_mask_input_shared_by_layers_is_read_once_per_tensor():
    """A dense (B, 1, S, S) mask made outside the graph (as BART's layers received it) and read by two attention
    calls: one read of its values serves both, and the next call with the same tensor reads nothing."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = torch.zeros(B, 1, S, S, dtype=torch.bfloat16).masked_fill(j > i, float("-inf"))

    def two_layers(q, k, v, mask):
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(h, k, v, attn_mask=mask)

    q, k, v = _qkv()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(two_layers, fullgraph=True)
        with torch.no_grad():
            compiled(q, k, v, mask)
            assert (stats.counters["data_mask.read"], stats.counters["data_mask.remembered"]) == (1, 1)
            compiled(q, k, v, mask)
    assert (stats.counters["data_mask.read"], stats.counters["data_mask.remembered"]) == (1, 3)
    assert stats.counters["data_mask.fa4"] == 4


def test_a_buffer_written_in_place_is_read_again():
    """A verdict holds for the tensor's version: written after it (a causal mask made a random one), the mask is
    read again and the call takes the dense route, matching eager."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = (j <= i).clone()

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = _qkv()
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled = torch.compile(fn, fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(q, k, v, mask), fn(q, k, v, mask), atol=2e-2, rtol=0)
            assert stats.counters["data_mask.fa4"] == 1
            mask[:, 3] = True  # key 3 now seen by every query: no band any more
            torch.testing.assert_close(compiled(q, k, v, mask), fn(q, k, v, mask), atol=2e-2, rtol=0)
    assert stats.counters["data_mask.read"] == 2 and stats.counters["data_mask.pytorch"] == 1


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("form", ["random_bool", "finite_fill", "bias"])
def test_masks_fa4_does_not_express_take_the_dense_route_exactly(form):
    torch.manual_seed(1)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = {"random_bool": (torch.rand(B, 1, S, S) > 0.3) | (i == j),
            "finite_fill": torch.zeros(S, S, dtype=torch.bfloat16).masked_fill(torch.rand(S, S) > 0.5, -1e4),
            "bias": ((j * i) * 0.01).to(torch.bfloat16)}[form]
    _compile_and_compare(_sdpa, _qkv(), (mask,))
    assert stats.counters["data_mask.pytorch"] >= 2 and stats.counters["data_mask.fa4"] == 0


@pytest.mark.parametrize("form", ["finite_fill", "bias"])
def test_a_finite_fill_or_bias_of_the_offset_runs_fa4s_relative_bias_op(form):
    """-1e4 above the diagonal, or a bias of j - i: values FA4's relative-bias op adds as they are (the finite fill's
    keys keep the weight the program gives them), at run time."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    mask = {"finite_fill": torch.zeros(S, S, dtype=torch.bfloat16).masked_fill(j > i, -1e4),
            "bias": ((j - i) * 0.1).to(torch.bfloat16)}[form]
    _compile_and_compare(_sdpa, _qkv(), (mask,))
    assert stats.counters["data_mask.fa4"] >= 2 and stats.counters["data_mask.pytorch"] == 0


class OpenClipTextTower(torch.nn.Module):
    """open_clip's text transformer: a causal ``attn_mask`` buffer (float, -inf above the diagonal) built once and
    handed to every ``nn.MultiheadAttention`` block."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.MultiheadAttention(E, H, batch_first=True) for _ in range(layers))
        mask = torch.empty(S, S).fill_(float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x, x, x, attn_mask=self.attn_mask.to(x.dtype), need_weights=False)[0]
        return x


def test_open_clip_text_tower_causal_buffer_runs_fa4():
    torch.manual_seed(0)
    tower = OpenClipTextTower().to(torch.bfloat16)
    x = torch.randn(B, S, E, dtype=torch.bfloat16, requires_grad=True)
    _compile_and_compare_loosely(tower, [x], ())
    assert stats.counters["data_mask.pytorch"] == 0
