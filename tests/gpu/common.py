"""What the GPU tests share: the skip when no GPU with FA4 is here, float64 references, kernel names, results.

Numerics follow PyTorch's flash-attention tests: FA4's error against a
float64 reference must stay within a small multiple of the error of the
same math done in bf16. Results are also written to $FA4_GPU_RESULTS (JSON
lines) when set, for the closing notes.
"""

from __future__ import annotations
import json
import os
import pytest
import torch
from fa4_inductor.runtime import fa4_binding
from fa4_inductor.runtime.reference import visible_keys


def require_fa4_gpu() -> None:
    """Skip the calling test module unless a CUDA GPU FA4 serves (sm90/sm100) and flash-attn-4 are here."""
    if not torch.cuda.is_available() or fa4_binding.unavailable_reason():
        pytest.skip("needs a CUDA GPU and flash-attn-4", allow_module_level=True)
    if torch.cuda.get_device_capability()[0] not in fa4_binding.SUPPORTED_ARCH_MAJORS:
        pytest.skip("FA4 needs sm90/sm100", allow_module_level=True)


FA2_OR_CUDNN = ("pytorch_flash", "flash_fwd_kernel", "flash_bwd", "cudnn", "fmha_cutlass", "efficient")


def _report(name: str, **values) -> None:
    path = os.environ.get("FA4_GPU_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **values}) + "\n")


def _math_attention(q, k, v, dtype, *, scale, causal=False, window=(-1, -1), softcap=0.0, key_padding=None,
                    segment_ids=None):
    """B,S,H,D attention in ``dtype`` with autograd (the bf16 / fp64 yardsticks); empty rows give zeros."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = visible_keys(q.shape[0], q.shape[1], k.shape[1], causal=causal, window_left=window[0],
                           window_right=window[1], seqused_k=None, device=q.device, key_padding=key_padding,
                           segment_ids=segment_ids)
    empty = ~visible.any(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return (p @ vh).transpose(1, 2)


def _math_logsumexp(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0, key_padding=None,
                    segment_ids=None):
    """B,H,S logsumexp of the scaled (soft-capped) visible scores of B,S,H,D inputs, in fp64."""
    q, k = (t.double().transpose(1, 2) for t in (q, k))
    s = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = visible_keys(q.shape[0], q.shape[2], k.shape[2], causal=causal, window_left=window[0],
                           window_right=window[1], seqused_k=None, device=q.device, key_padding=key_padding,
                           segment_ids=segment_ids)
    return s.masked_fill(~visible, float("-inf")).logsumexp(-1).float()


def _leaves(*shapes, dtype=torch.bfloat16):
    return [torch.randn(s, device="cuda", dtype=dtype).requires_grad_(True) for s in shapes]


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _key_padding(b, s, side):
    """Batch row 1 padded on ``side`` (a quarter of its keys), row 0 full; "random": row 0 random, row 1 empty;
    None without padding."""
    if side is None:
        return None
    if side == "random":
        pad = torch.rand(b, s, device="cuda") < 0.5
        pad[1] = False
        return pad
    pad = torch.ones(b, s, dtype=torch.bool, device="cuda")
    pad[1, : s // 4] = side != "left"
    pad[1, -(s // 4):] = side == "left"
    return pad


def _segment_ids(b, s, documents):
    """Sorted ids of ``documents`` packed sequences per row, at random cut points; None without documents."""
    if not documents:
        return None
    cuts = torch.sort(torch.randint(1, s, (b, documents - 1), device="cuda"), dim=1).values
    return (torch.arange(s, device="cuda")[None, None, :] >= cuts[:, :, None]).sum(dim=1)


# Calls until a call signature replays its trusted plan: one that compiles FA4's kernels (not learned from), one that
# learns, one whose replay is checked against FA4's own call.
WARM_CALLS = 3


def _steady(step):
    """``step`` after :data:`WARM_CALLS` calls: what it launches from now on is what every later call launches."""
    for _ in range(WARM_CALLS):
        result = step()
    return result


def _kernel_names(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _attention_kernels(names):
    return [n for n in names if any(t in n.lower() for t in ("flash", "fmha", "attention", "cudnn"))]


def _behind_slow_work_on_a_side_stream(call):
    """``call()`` on a side stream behind slow work, its input made there first (``call`` makes it): a launcher
    that used another stream would race that input. Returns what ``call`` returns, synchronized back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):
            busy = busy @ busy
        result = call()
    torch.cuda.current_stream().wait_stream(side)
    return result
