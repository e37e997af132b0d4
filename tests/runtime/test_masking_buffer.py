"""The masking buffer of calls masked by data: one per training step, laid out alike in fake and real calls."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch._inductor.utils import run_and_get_code

import fa4_inductor
from fa4_inductor.runtime import masking_buffer

pytestmark = pytest.mark.usefixtures("no_compile_cache")


def hint_int(value) -> int:
    return value.node.hint if isinstance(value, torch.SymInt) else value


@pytest.mark.parametrize("padding, documents, block", [(True, False, (128, 128)), (True, True, (256, 128)),
                                                       (False, True, None)])
def test_symbolic_layout_size_is_the_concrete_one(padding, documents, block):
    """The fake impls promise :func:`masking_buffer.layout` of symbolic sizes; the kernels fill that of ints."""
    env = ShapeEnv()
    sizes = dict(batch=3, seqlen_q=1000, seqlen_k=1000 if documents else 777)
    symbols = {name: env.create_symintnode(env.create_symbol(value, ConstantSource(name)), hint=value)
               for name, value in sizes.items()}
    symbolic = masking_buffer.layout(*symbols.values(), padding, documents, block)
    concrete = masking_buffer.layout(*sizes.values(), padding, documents, block)
    assert hint_int(symbolic.size) == concrete.size
    assert [hint_int(offset) for offset, _ in symbolic.parts.values()] == [o for o, _ in concrete.parts.values()]
    assert all(offset % 32 == 0 for offset, _ in concrete.parts.values())  # 128-byte aligned views


@pytest.mark.parametrize("wrong", ["size", "stride"])
def test_views_refuse_a_buffer_made_for_another_call_or_not_contiguous(wrong):
    where = masking_buffer.layout(2, 300, 300, True, False, (128, 128))
    buffer = torch.zeros(where.size + 32, dtype=torch.int32) if wrong == "size" else \
        torch.zeros(2 * where.size, dtype=torch.int32)[::2]
    with pytest.raises(ValueError, match="masking buffer"):
        masking_buffer.views(buffer, where, backward=True)


def test_a_padded_training_step_hands_its_masking_buffer_from_forward_to_backward():
    """The forward graph makes the buffer and runs the masked kernel on it; the backward graph passes that saved
    buffer to FA4's backward (its last argument), which so builds nothing again."""
    def fn(q, k, v, pad):
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & pad[:, None, None, :])

    q, k, v = (torch.randn(2, 2, 64, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    pad = torch.arange(64)[None, :] < torch.tensor([[64], [20]])
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        _, (forward, backward) = run_and_get_code(lambda: torch.compile(fn, fullgraph=True)(q, k, v, pad).sum()
                                                  .backward())
    assert "fa4.flash_attn_fwd_masked_kernel.default(" in forward and "flash_attn_fwd_kernel" not in forward
    assert forward.count("fa4.masking_buffer.default(") == 1
    call = next(line for line in backward.splitlines() if "fa4.flash_attn_bwd.default(" in line)
    assert call.rstrip().rstrip(")").split(", ")[-1] not in ("None", "masking_buffer=None"), call


def _two_layers(x, pad, window):
    mask = pad[:, None, None, :]
    hidden = F.scaled_dot_product_attention(x, x, x, attn_mask=mask)
    if window:  # a sliding-window layer (Gemma 2's, Mistral's): other tile lists, its own buffer
        i = torch.arange(x.shape[2])
        mask = mask & (i[:, None] - i[None, :] < window)
    return F.scaled_dot_product_attention(hidden, hidden * 2, hidden, attn_mask=mask)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("window", [None, 8])
def test_layers_with_the_same_mask_share_one_masking_buffer(training, window):
    """Two attention calls on one padding mask (two layers of a model) make one buffer per step, in training
    (AOTAutograd's CSE) and inference (the plugin's post-grad pass); a layer with other masking makes its own."""
    x = torch.randn(2, 2, 48, 16, dtype=torch.bfloat16, requires_grad=training)
    pad = torch.arange(48)[None, :] < torch.tensor([[48], [30]])
    with fa4_inductor.enabled(eager=False, devices=("cpu",)), torch.set_grad_enabled(training):
        out, (forward, *_) = run_and_get_code(lambda: torch.compile(_two_layers, fullgraph=True)(x, pad, window))
        want = _two_layers(x, pad, window)
    assert forward.count("fa4.masking_buffer.default(") == (2 if window else 1)
    assert forward.count("fa4.flash_attn_fwd_masked_kernel.default(") == 2
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


def test_fake_impl_promises_a_symbolic_buffer_for_dynamic_cuda_calls(monkeypatch):
    """Under a dynamic graph (fake CUDA tensors with symbolic batch and length) the buffer op's fake impl
    returns a buffer whose size is the layout's, as an expression of the symbols."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fa4_inductor.runtime import fa4_binding, ops

    monkeypatch.setattr(fa4_binding, "arch_and_sms", lambda index: (90, 132))
    monkeypatch.setenv("FA4_INDUCTOR_PRECOMPILE", "0")
    env = ShapeEnv()
    batch, length = (env.create_symintnode(env.create_symbol(value, ConstantSource(name)), hint=value)
                     for name, value in (("batch", 3), ("length", 1000)))
    with FakeTensorMode(shape_env=env):
        q, k, v = (torch.empty(batch, length, 4, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
        pad = torch.empty(batch, length, dtype=torch.bool, device="cuda")
        seg = torch.empty(batch, length, dtype=torch.int64, device="cuda")
        buffer = ops._masking_buffer_fake(pad, seg, length, 64, 64, True)
        out, lse = ops._masked_forward_kernel_fake(q, k, v, 0.125, True, key_padding=pad, segment_ids=seg,
                                                   masking_buffer=buffer)
    want = masking_buffer.layout(3, 1000, 1000, True, True, (128, 128)).size
    assert isinstance(buffer.shape[0], torch.SymInt) and hint_int(buffer.shape[0]) == want
    assert buffer.dtype == torch.int32 and out.shape == q.shape and lse.shape == (batch, 4, length)
