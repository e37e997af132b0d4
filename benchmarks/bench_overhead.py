"""Host overhead per attention call on a tiny problem (1x1x128x64, bf16, forward, no grad).

Side by side in one process: stock SDPA flash, FA4's own API (``flash_attn_func``
and its ``_flash_attn_fwd``), and the plugin's call path: the op compiled graphs
call (``fa4.flash_attn_fwd_kernel``: dispatcher -> C++ launcher -> FA4 kernel),
the same op's Python kernel (dispatcher -> adapter -> launch plan -> FA4
kernel), the public differentiable op, and the adapter alone. Also the
whole compiled function, stock vs plugin, and the parts of the plugin's call; and a call masked by data
(1x1x256x64, causal and key padding, the block-sparse route) with its parts.
Per-call time is the wall time of back-to-back calls (the GPU work is ~5 us,
so the host bounds it). The variants are timed in interleaved rounds and each
reports its median round, so drift of the host's speed during the run hits
every variant alike. Writes JSON and markdown.
"""

import argparse
import json
import pathlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fa4_inductor
from fa4_inductor.runtime import fa4_call, fa4_binding, launch_plan, native
from fa4_inductor.runtime import fa4_version
from fa4_inductor._torch_private import empty_strided

CALLS, ROUNDS = 500, 15

# A no-op op with the plugin's schema, to time the dispatcher alone (module level: a Library unregisters
# its ops when collected).
_PROBE_LIBRARY = torch.library.Library("fa4_overhead_probe", "DEF")
_PROBE_LIBRARY.define("noop(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal=False, int window_left=-1, "
                      "int window_right=-1, float softcap=0.0, Tensor? seqused_k=None, Tensor? key_padding=None) "
                      "-> (Tensor, Tensor)")


def interleaved_per_call_us(rows: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Per-call µs of each row: ROUNDS rounds, each timing CALLS back-to-back calls of every row in turn;
    the median round per row."""
    for fn in rows.values():
        for _ in range(50):
            fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(ROUNDS):
        for name, fn in rows.items():
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) / CALLS * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


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


def kernel_names(fn, *args) -> list[str]:
    """The GPU kernels one call runs (to show which attention each compiled variant ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sorted({e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def floor_rows(q, k, v, out, lse, scale) -> dict[str, Callable[[], object]]:
    """Where the plugin's per-call time goes: its parts, to be timed alone."""
    signature = launch_plan.call_signature(q, k, v, scale, False, -1, -1, 0.0, None)
    bound = fa4_call.forward_plans().by_signature(signature)
    plan = bound.plan
    _PROBE_LIBRARY.impl("noop", lambda *args: (out, lse), "CUDA")
    noop = torch.ops.fa4_overhead_probe.noop.default
    args = list(plan.args)
    for position, slot in plan.slots:
        args[position] = (q, k, v, out, lse, None)[slot]
    return {
        "part: dispatcher to a no-op Python kernel (same schema)": lambda: noop(q, k, v, scale),
        "part: call signature and plan lookup": lambda: fa4_call.forward_plans().by_signature(
            launch_plan.call_signature(q, k, v, scale, False, -1, -1, 0.0, None)),
        "part: allocating out and lse (Tensor.new_empty)": lambda: (
            q.new_empty(q.shape), q.new_empty((1, 1, q.shape[1]), dtype=torch.float32)),
        "part: allocating out and lse (plugin's allocator)": lambda: (
            empty_strided(bound.out_size, bound.out_stride, bound.dtype, bound.device),
            empty_strided(bound.lse_size, bound.lse_stride, torch.float32, bound.device)),
        "part: FA4's compiled kernel through its Python __call__ (outputs given)": lambda: plan.kernel(*args),
        "part: launch plan replay alone (direct TVM-FFI entry, outputs given)": lambda: plan.launch(
            (q, k, v, out, lse, None)),
    }


def backward_rows(q, k, v, qh, kh, vh, scale) -> dict[str, Callable[[], object]]:
    """Backward per call: stock flash backward, the plugin's backward op (launch sequence) and FA4's entry point."""
    dout_h = torch.randn_like(qh)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out_h, lse_h, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, scale=scale))
    out, lse = torch.ops.fa4.flash_attn_fwd_kernel.default(q, k, v, scale)
    dout = dout_h.transpose(1, 2)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    return {
        "backward: stock aten._scaled_dot_product_flash_attention_backward": (
            lambda: torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout_h, qh, kh, vh, out_h, lse_h, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset,
                scale=scale)),
        "backward: plugin fa4.flash_attn_bwd (launch sequence)": lambda: torch.ops.fa4.flash_attn_bwd.default(
            dout, q, k, v, out, lse, scale),
        "backward: FA4's own _flash_attn_bwd (gradients given)": lambda: fa4_call._fa4_backward(
            dout, q, k, v, out, lse, *grads, softmax_scale=scale, causal=False, window_left=-1, window_right=-1,
            softcap=0.0, seqused_k=None, key_padding=None, deterministic=False),
    }


def masked_rows(q, k, v, scale) -> dict[str, Callable[[], object]]:
    """A call masked by data (causal and key padding, the block-sparse route) and its parts: the forward that
    also makes the masking buffer, the buffer alone, its Triton launch alone, FA4's masking keywords from a
    made buffer, the launch replay alone, the backward reusing the buffer, and FA4's own entry point."""
    from fa4_inductor.runtime import block_mask, mask_routes, masking_buffer
    from fa4_inductor.runtime.block_lists_kernel import fill_masking_buffer

    padding = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q.device)
    padding[:, : k.shape[1] // 4] = False
    masks = dict(causal=True, window_left=-1, window_right=-1, key_padding=padding, segment_ids=None)
    buffer = torch.ops.fa4.masking_buffer.default(padding, None, q.shape[1], q.shape[-1], v.shape[-1], True)
    out, lse = torch.ops.fa4.flash_attn_fwd_masked_kernel.default(q, k, v, scale, True, key_padding=padding,
                                                                   masking_buffer=buffer)
    dout = torch.randn_like(out)
    torch.ops.fa4.flash_attn_bwd.default(dout, q, k, v, out, lse, scale, True, key_padding=padding,
                                         masking_buffer=buffer)  # learns the backward's launches
    where, block = mask_routes._buffer_layout(q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1], padding, None,
                                          mask_routes._arch_major(q.device))
    parts = block_mask.MaskParts(True, -1, -1, padding, None)
    with_buffer = {**masks, "masking_buffer": buffer}
    keywords = mask_routes.fa4_masking(q, k, v, with_buffer)
    tensors = (q, k, v, out, lse, None, *mask_routes.tensors_of(keywords))
    # The adapter's parameters, in its order (the exact signature keeps it).
    params = dict(softmax_scale=scale, causal=True, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None,
                  key_padding=padding, segment_ids=None, masking_buffer=buffer)
    plan = fa4_call.masked_forward_plans().get(launch_plan.exact_signature(tensors, params))
    return {
        "masked: fa4.masking_buffer": lambda: torch.ops.fa4.masking_buffer.default(
            padding, None, q.shape[1], q.shape[-1], v.shape[-1], True),
        "masked: fa4.flash_attn_fwd_masked_kernel given the buffer": (
            lambda: torch.ops.fa4.flash_attn_fwd_masked_kernel.default(q, k, v, scale, True, key_padding=padding,
                                                                       masking_buffer=buffer)),
        "masked part: the buffer's Triton launch alone": lambda: fill_masking_buffer(
            buffer, where.offsets, k.shape[1] + masking_buffer.KEY_TILE_SLACK, parts, q.shape[1], block),
        "masked part: FA4 masking keywords from the buffer (mask_routes.fa4_masking)": (
            lambda: mask_routes.fa4_masking(q, k, v, with_buffer)),
        "masked part: exact call signature": lambda: launch_plan.exact_signature(tensors, params),
        "masked part: launch replay alone": lambda: plan.launch(tensors, q.device),
        "masked: adapter.forward given the buffer": lambda: fa4_call.forward(
            q, k, v, scale, True, key_padding=padding, masking_buffer=buffer),
        "masked backward: fa4.flash_attn_bwd given the buffer": lambda: torch.ops.fa4.flash_attn_bwd.default(
            dout, q, k, v, out, lse, scale, True, key_padding=padding, masking_buffer=buffer),
        "masked: FA4 _flash_attn_fwd (same masking keywords, out given)": lambda: fa4_binding.flash_forward(
            q, k, v, out, lse, softmax_scale=scale, softcap=0.0, seqused_k=None, masking=keywords),
    }


def _learned_plans() -> list[launch_plan.LaunchPlan]:
    plans = fa4_call.forward_plans()
    return [plan for plan in map(plans.get, plans.keys()) if plan]


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

    # Two frames, so the stock and the plugin compile don't share one Dynamo cache entry.
    def stock_frame(q, k, v):
        return sdpa(q, k, v)

    def plugin_frame(q, k, v):
        return sdpa(q, k, v)

    def flash_sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh)

    tiny = torch.zeros(1, device="cuda")
    with torch.no_grad():
        stock_compiled = torch.compile(stock_frame, fullgraph=True)
        stock_compiled(q, k, v)
        with fa4_inductor.enabled(compile=True, eager=False):
            plugin_compiled = torch.compile(plugin_frame, fullgraph=True)
            plugin_compiled(q, k, v)
        rows = {
            "stock SDPA (F.scaled_dot_product_attention, default backend)": lambda: F.scaled_dot_product_attention(
                qh, kh, vh),
            "stock aten._scaled_dot_product_flash_attention": (
                lambda: torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh)),
            "host reference: tiny in-place add (one aten op, one kernel)": lambda: tiny.add_(1),
            "stock torch.compile(sdpa)": lambda: stock_compiled(q, k, v),
            "FA4 flash_attn_func": lambda: flash_attn_func(q, k, v),
            "FA4 _flash_attn_fwd": lambda: fa4_binding.module()._flash_attn_fwd(q, k, v, return_lse=True),
            "plugin fa4.flash_attn_fwd_kernel (compiled graphs' call)": (
                lambda: torch.ops.fa4.flash_attn_fwd_kernel.default(q, k, v, scale)),
            "plugin Python kernel (fa4._flash_attn_fwd_python)": (
                lambda: torch.ops.fa4._flash_attn_fwd_python.default(q, k, v, scale)),
            "plugin fa4.flash_attn_fwd (public op)": lambda: torch.ops.fa4.flash_attn_fwd(q, k, v, scale),
            "plugin adapter.forward (launch plan)": lambda: fa4_call.forward(q, k, v, **params),
            "plugin adapter without plan (FA4 entry point, out given)": (
                lambda: fa4_call._fa4_forward(q, k, v, out, lse, **params)),
            "plugin torch.compile(sdpa)": lambda: plugin_compiled(q, k, v),
        }
        rows["plugin adapter.forward (launch plan)"]()  # learns the plan the part rows take apart
        rows.update(floor_rows(q, k, v, out, lse, scale))
        rows.update(backward_rows(q, k, v, qh, kh, vh, scale))
        masked_q, masked_k, masked_v = (torch.randn(1, 256, 1, d, device="cuda", dtype=torch.bfloat16)
                                        for _ in range(3))
        rows.update(masked_rows(masked_q, masked_k, masked_v, scale))
        results = interleaved_per_call_us(rows)
        kernel_us = {"stock SDPA flash": gpu_kernel_us(flash_sdpa),
                     "FA4": gpu_kernel_us(rows["plugin adapter.forward (launch plan)"])}
        compiled_kernels = {"stock": kernel_names(stock_compiled, q, k, v),
                            "plugin": kernel_names(plugin_compiled, q, k, v)}
    record = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "fa4": fa4_version.version(),
        "problem": dict(batch=b, heads=h, seqlen=s, head_dim=d, dtype="bfloat16"),
        "per_call_us": {k: round(v, 2) for k, v in results.items()},
        "gpu_kernel_us": {k: round(v, 2) for k, v in kernel_us.items()},
        "compiled_kernels": compiled_kernels,
        "plans": len(fa4_call.forward_plans().keys()),
        "plans_on_direct_tvm_ffi_entry": sum(plan.entry is not plan.kernel for plan in _learned_plans()),
        "native_launcher": {"installed": native.PLANS.enabled, "plans": native.PLANS.count(),
                            "unavailable_reason": native.load()},
    }
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "overhead.json").write_text(json.dumps(record, indent=1))
    lines = [f"# Host overhead per call ({record['device']})", "",
             f"torch {record['torch']}, flash-attn-4 {record['fa4']}; B=1 H=1 S=128 D=64 bf16 forward, no grad; "
             f"wall time per call of {CALLS} back-to-back calls; variants timed in {ROUNDS} interleaved rounds, "
             "median round.", "",
             "| call path | µs per call |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in record["per_call_us"].items()]
    lines += ["", f"Launch plans calling FA4's kernel as a plain TVM-FFI function: "
              f"{record['plans_on_direct_tvm_ffi_entry']} of {len(_learned_plans())} (JIT-compiled kernels; "
              "kernels loaded from FA4's disk cache are plain functions already)."]
    lines += ["", f"Native (C++) launcher installed: {record['native_launcher']['installed']}, holding "
              f"{record['native_launcher']['plans']} plans (the op's CUDA kernel when installed; the Python kernel "
              "serves the calls it has no plan for)."]
    lines += ["", "Kernels of the compiled variants: " + "; ".join(
        f"{name}: {', '.join(names)}" for name, names in compiled_kernels.items())]
    lines += ["", "GPU kernel time per call (profiler): "
              + ", ".join(f"{k} {v:.1f} µs" for k, v in record["gpu_kernel_us"].items())]
    (out_dir / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
