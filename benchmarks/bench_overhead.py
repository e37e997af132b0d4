"""Host overhead per attention call on a tiny problem (1x1x128x64, bf16, forward, no grad).

Side by side in one process: stock SDPA flash, FA4's own API (``flash_attn_func``
and its ``_flash_attn_fwd``), and the plugin's call path: the op compiled graphs
call (``fa4.flash_attn_fwd_kernel``: dispatcher -> adapter -> launch plan ->
FA4 kernel), the public differentiable op, and the adapter alone. Also the
whole compiled function, stock vs plugin. Per-call time is the wall time of
1000 back-to-back calls (the GPU work is ~5 us, so the host bounds it); the
median of 7 repeats. Writes JSON and markdown.
"""

import argparse
import json
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fa4_inductor
from fa4_inductor import fa4_adapter, launch_plan

CALLS, REPEATS = 1000, 7


def per_call_us(fn) -> float:
    """Median over repeats of wall time per call for CALLS back-to-back calls."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / CALLS * 1e6)
    return statistics.median(samples)


def gpu_kernel_us(fn) -> float:
    """GPU time of one call's kernels (profiler), to show the host is the bound."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in events) / 20


def floor_rows(q, k, v, out, lse, scale) -> dict[str, float]:
    """Where the plugin's per-call time goes: its parts timed alone."""
    signature = launch_plan.call_signature(q, k, v, scale, False, -1, -1, 0.0, None)
    plan = fa4_adapter.forward_plans().by_signature(signature)
    library = torch.library.Library("fa4_overhead_probe", "DEF")
    library.define("noop(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal=False, int window_left=-1, "
                   "int window_right=-1, float softcap=0.0, Tensor? seqused_k=None, Tensor? key_padding=None) "
                   "-> (Tensor, Tensor)")
    library.impl("noop", lambda *args: (out, lse), "CUDA")
    noop = torch.ops.fa4_overhead_probe.noop.default
    return {
        "part: dispatcher to a no-op Python kernel (same schema)": per_call_us(lambda: noop(q, k, v, scale)),
        "part: allocating out and lse": per_call_us(
            lambda: (q.new_empty(q.shape), q.new_empty((1, 1, q.shape[1]), dtype=torch.float32))),
        "part: launch plan replay alone (FA4's compiled kernel, outputs given)": per_call_us(
            lambda: plan.launch((q, k, v, out, lse, None))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from flash_attn.cute import flash_attn_func

    b, h, s, d = 1, 1, 128, 64
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scale = d ** -0.5
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
    params = dict(softmax_scale=scale, causal=False, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    stock_compiled = torch.compile(sdpa, fullgraph=True)
    rows = {}
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            rows["stock SDPA flash (F.scaled_dot_product_attention)"] = lambda: F.scaled_dot_product_attention(qh, kh, vh)
            rows["stock aten._scaled_dot_product_flash_attention"] = (
                lambda: torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh))
            results = {name: per_call_us(fn) for name, fn in rows.items()}
        stock_compiled(q, k, v)
        results["stock torch.compile(sdpa) (cuDNN)"] = per_call_us(lambda: stock_compiled(q, k, v))
        fa4 = {
            "FA4 flash_attn_func": lambda: flash_attn_func(q, k, v),
            "FA4 _flash_attn_fwd": lambda: fa4_adapter._module()._flash_attn_fwd(q, k, v, return_lse=True),
            "plugin fa4.flash_attn_fwd_kernel (compiled graphs' call)": (
                lambda: torch.ops.fa4.flash_attn_fwd_kernel.default(q, k, v, scale)),
            "plugin fa4.flash_attn_fwd (public op)": lambda: torch.ops.fa4.flash_attn_fwd(q, k, v, scale),
            "plugin adapter.forward (launch plan)": lambda: fa4_adapter.forward(q, k, v, **params),
            "plugin adapter without plan (FA4 entry point, out given)": (
                lambda: fa4_adapter._fa4_forward(q, k, v, out, lse, **params)),
        }
        for name, fn in fa4.items():
            results[name] = per_call_us(fn)
        results.update(floor_rows(q, k, v, out, lse, scale))
        with fa4_inductor.enabled(compile=True, eager=False):
            torch._dynamo.reset()
            plugin_compiled = torch.compile(sdpa, fullgraph=True)
            plugin_compiled(q, k, v)
            results["plugin torch.compile(sdpa)"] = per_call_us(lambda: plugin_compiled(q, k, v))
        kernel_us = {"stock SDPA flash": gpu_kernel_us(rows["stock SDPA flash (F.scaled_dot_product_attention)"]),
                     "FA4": gpu_kernel_us(fa4["plugin adapter.forward (launch plan)"])}
    record = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "fa4": fa4_adapter.version(),
        "problem": dict(batch=b, heads=h, seqlen=s, head_dim=d, dtype="bfloat16"),
        "per_call_us": {k: round(v, 2) for k, v in results.items()},
        "gpu_kernel_us": {k: round(v, 2) for k, v in kernel_us.items()},
        "plans": len(fa4_adapter.forward_plans().keys()),
    }
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "overhead.json").write_text(json.dumps(record, indent=1))
    lines = [f"# Host overhead per call ({record['device']})", "",
             f"torch {record['torch']}, flash-attn-4 {record['fa4']}; B=1 H=1 S=128 D=64 bf16 forward, no grad; "
             f"wall time per call over {CALLS} back-to-back calls, median of {REPEATS}.", "",
             "| call path | µs per call |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in record["per_call_us"].items()]
    lines += ["", "GPU kernel time per call (profiler): "
              + ", ".join(f"{k} {v:.1f} µs" for k, v in record["gpu_kernel_us"].items())]
    (out_dir / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
