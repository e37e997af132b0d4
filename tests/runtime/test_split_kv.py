"""Split-KV decoding (CPU): chunk counts, chunk views, and the logsumexp merge vs unsplit attention."""

import os
import subprocess
import sys

import pytest
import torch

from fa4_inductor.runtime import reference, split_kv

MERGE_CASES = [(padded, seqlen_q, splits) for padded in (False, True) for seqlen_q, splits in ((1, 4), (3, 8))]


@pytest.mark.parametrize("batch, seqlen_q, heads, heads_kv, seqlen_k, want", [
    (1, 1, 32, 8, 16384, 32),  # 8 CTAs: 32 chunks of 512 keys reach 132 SMs
    (1, 1, 32, 8, 4096, 16),  # capped by 256 keys per chunk
    (2, 1, 16, 4, 4095, 15),  # 8 CTAs; 4095 = 3^2 * 5 * 7 * 13: the largest divisor keeping 256 keys a chunk
    (8, 1, 16, 4, 4095, 1),  # 32 CTAs: splitting them measured slower
    (32, 1, 32, 8, 4096, 1),  # 256 CTAs fill the GPU
    (1, 1024, 32, 8, 4096, 1),  # prefill: many query tiles
    (1, 1, 32, 8, 4099, 1),  # a prime key length has no equal chunks
    (1, 1, 32, 8, 300, 1),  # too short to split
])
def test_num_splits(batch, seqlen_q, heads, heads_kv, seqlen_k, want):
    assert split_kv.num_splits(batch, seqlen_q, heads, heads_kv, seqlen_k, num_sms=132) == want


def _split_attention(q, k, v, padding, scale):
    """What FA4 computes on a split call: query head x attends to KV head x // group, keys kept where
    ``padding[b, (x // group) % splits, j]`` (the split mask_mod)."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if padding is not None:
        chunk = (torch.arange(q.shape[2]) // group) % padding.shape[1]
        scores = scores.masked_fill(~padding[:, chunk, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]))
    return (probs @ vh).transpose(1, 2), lse


def check_split_and_merge(padded: bool, seqlen_q: int, splits: int) -> None:
    """Split inputs, attention per chunk, merge: equal to unsplit attention (output and lse)."""
    torch.manual_seed(0)
    batch, heads, heads_kv, seqlen_k, dim = 3, 8, 2, 64, 16
    q = torch.randn(batch, seqlen_q, heads, dim)
    # A Hugging Face KV cache: (B, H, S, D) memory seen as B,S,H,D.
    k, v = (torch.randn(batch, heads_kv, seqlen_k, dim).transpose(1, 2) for _ in range(2))
    padding = None
    if padded:
        padding = torch.ones(batch, seqlen_k, dtype=torch.bool)
        padding[0, 40:] = False  # the unfilled tail of a static cache: whole chunks see no key
        padding[1, :5] = False  # left padding
        padding[2] = False  # a row with no key at all
    q_parts, k_parts, v_parts, padding_parts = split_kv.split_inputs(q, k, v, padding, splits)
    assert k_parts.data_ptr() == k.data_ptr() and k_parts.shape == (batch, seqlen_k // splits, heads_kv * splits, dim)
    out_parts, lse_parts = _split_attention(q_parts, k_parts, v_parts, padding_parts, scale=0.25)
    out = torch.empty(batch, heads, seqlen_q, dim).transpose(1, 2)  # a strided output, as SDPA's callers pass
    lse = torch.empty(batch, heads, seqlen_q)
    split_kv.combine(out_parts.contiguous(), lse_parts.contiguous(), heads_kv, splits, out, lse)
    want_out, want_lse = reference.attention_forward(
        q, k, v, softmax_scale=0.25, causal=False, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None,
        key_padding=padding)
    torch.testing.assert_close(out, want_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    if padded:
        assert torch.isneginf(lse[2]).all() and not out[2].any()


def test_split_and_merge_equal_unsplit_attention():
    """The merge is a Triton kernel: run in Triton's interpreter on CPU, which must be chosen before
    Triton is imported, so in a fresh process."""
    pytest.importorskip("triton")
    code = ("import tests.runtime.test_split_kv as t\n"
            f"for case in {MERGE_CASES!r}:\n    t.check_split_and_merge(*case)\nprint('merged', len({MERGE_CASES!r}))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "merged 4" in done.stdout, done.stderr[-3000:]


def test_keys_that_cannot_be_viewed_in_chunks_are_not_split():
    k = torch.randn(2, 64, 4, 16)  # (B, S, H, D)-contiguous: chunks of S are not head-strided
    assert split_kv.split_inputs(torch.randn(2, 1, 8, 16), k, k, None, 4) is None


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the ops called under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("seqlen_q, buffer_made", [(1, False), (512, True)])
def test_inference_makes_a_masking_buffer_only_for_calls_that_read_one(monkeypatch, seqlen_q, buffer_made):
    """An inference decoding step that FA4 runs split-KV on sm90 reads no masking buffer, so none is made; an
    unsplit prefill reads one. (Training always makes one: the backward reads it.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fa4_inductor.runtime import fa4_binding

    monkeypatch.setattr(fa4_binding, "arch_and_sms", lambda index: (90, 132))
    monkeypatch.setenv("FA4_INDUCTOR_PRECOMPILE", "0")
    with FakeTensorMode():
        q = torch.empty(1, seqlen_q, 32, 128, dtype=torch.bfloat16, device="cuda")
        k, v = (torch.empty(1, 8, 4096, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in range(2))
        pad = torch.empty(1, 4096, dtype=torch.bool, device="cuda")
        with _OpLog() as log:
            torch.ops.fa4.flash_attn_fwd(q, k, v, 0.1, key_padding=pad)
    assert ("fa4.masking_buffer" in log.names) == buffer_made, log.names
