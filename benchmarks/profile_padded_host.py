"""Where the host time of a training step goes: compiled forward + backward steps of ``bench_padded``'s problem
(left padding by default) or of a ``bench_vs_fa4`` problem, next to the step's GPU kernel time.

Three views of the same steps: enqueue and wall time per step; a torch.profiler timeline (GPU busy time per
step, the largest GPU idle gaps, CPU time by op: the ``fa4`` ops, aten calls, autograd nodes); a cProfile of the
Python. ``--variant flex_flash`` profiles FlexAttention FLASH's step on the same problem (block mask premade,
as in ``bench_padded``) for comparison; on a ``bench_vs_fa4`` problem, ``stock`` and ``fa4_direct`` are its
other variants, and the enqueue time of its forward and of its backward alone is reported too.

Usage: python benchmarks/profile_padded_host.py --problem left --variant plugin --out OUT_DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import statistics
import time

import torch
from triton.testing import do_bench

import bench_padded
import bench_vs_fa4
import fa4_inductor
import problem_runner


def _step(problem: str, variant: str):
    if problem in bench_vs_fa4.PROBLEMS:
        return bench_vs_fa4.variant_steps(problem, variants=(variant,))[0][variant]
    q, k, v = bench_padded._leaves(bench_padded.B, bench_padded.H, bench_padded.S, bench_padded.D)
    extra = {"documents": bench_padded._segments, "causal": lambda: None}.get(
        problem, lambda: bench_padded._padding(problem))()
    if variant == "flex_flash":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(bench_padded._mask_mod(problem, extra), bench_padded.B, None,
                                       bench_padded.S, bench_padded.S, device="cuda")
        flex = torch.compile(flex_attention)
        return problem_runner.fwd_bwd(
            lambda q, k, v: flex(q, k, v, block_mask=block_mask, kernel_options={"BACKEND": "FLASH"}), (q, k, v))
    function = {"documents": bench_padded._sdpa_documents, "causal": bench_padded._sdpa_causal}.get(
        problem, bench_padded._sdpa_padded)
    plugin = torch.compile(lambda *a: function(*a), fullgraph=True)
    return problem_runner.fwd_bwd(plugin, (q, k, v), extra)


def _timeline(step, steps: int, text: io.StringIO) -> None:
    """GPU busy time and idle gaps per step, and CPU time by op, from a torch.profiler trace."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, gaps, end = 0.0, [], kernels[0][0]
    for start, stop, name in kernels:
        if start > end:
            gaps.append((start - end, name))
        busy += max(0, stop - max(start, end))
        end = max(end, stop)
    span = kernels[-1][1] - kernels[0][0]
    text.write(f"\ntimeline of {steps} steps: GPU span {span / steps / 1e3:.3f} ms/step, busy "
               f"{busy / steps / 1e3:.3f} ms/step, idle {(span - busy) / steps / 1e3:.3f} ms/step\n")
    text.write("largest GPU idle gaps (µs, the kernel launched after each):\n")
    for gap, name in sorted(gaps, reverse=True)[:12]:
        text.write(f"  {gap:8.1f}  {name[:90]}\n")
    text.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))


_BUSY_CYCLES = 4_000_000  # ~2 ms of a spinning kernel at H200 clocks


def _host_us(fn, calls: int = 30, busy: bool = False) -> float:
    """Median host time of one call of ``fn`` started on an idle GPU (synchronized before each call), or with
    ``busy`` behind a ~2 ms spinning kernel: a call that waits for the GPU takes that long on the host."""
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        if busy:
            torch.cuda._sleep(_BUSY_CYCLES)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def _idle_and_busy(name: str, fn, text: io.StringIO) -> None:
    text.write(f"  {_host_us(fn):9.1f} µs  {_host_us(fn, busy=True):9.1f} µs  {name}\n")


def _halves(step, text: io.StringIO) -> None:
    """Host µs of a step's forward alone and of its backward alone, started on an idle GPU and behind a busy one."""
    def backward_of_a_new_forward(busy: bool) -> float:
        samples = []
        for _ in range(30):
            out = step.forward()
            samples.append(_host_us(lambda: step.backward(out), calls=1, busy=busy))
        return statistics.median(samples)

    text.write("  idle GPU    busy GPU\n")
    _idle_and_busy("forward", step.forward, text)
    text.write(f"  {backward_of_a_new_forward(False):9.1f} µs  {backward_of_a_new_forward(True):9.1f} µs  backward\n")
    _idle_and_busy("forward + backward", step, text)


def _call_costs(problem: str, text: io.StringIO) -> None:
    """Host µs of each plugin call of the step (and of its parts, and of each kernel launch the calls replay),
    on the benchmark's sizes, started on an idle GPU and behind a busy one."""
    from fa4_inductor.runtime import block_mask, mask_routes, masking_buffer
    from fa4_inductor.runtime.block_lists_kernel import fill_masking_buffer

    batch, heads, seqlen, head_dim = bench_padded.B, bench_padded.H, bench_padded.S, bench_padded.D
    q, k, v = (t.detach().transpose(1, 2) for t in bench_padded._leaves(batch, heads, seqlen, head_dim))
    extra = bench_padded._segments() if problem == "documents" else bench_padded._padding(problem)
    masks = {"key_padding": None, "segment_ids": None}
    masks["segment_ids" if problem == "documents" else "key_padding"] = extra
    scale = head_dim ** -0.5
    make_buffer = torch.ops.fa4.masking_buffer.default
    forward = torch.ops.fa4.flash_attn_fwd_masked_kernel.default
    backward = torch.ops.fa4.flash_attn_bwd.default
    buffer = make_buffer(*masks.values(), seqlen, head_dim, head_dim, True)
    out, lse = forward(q, k, v, scale, True, **masks, masking_buffer=buffer)
    dout = torch.randn_like(out)
    plain_out, plain_lse = torch.ops.fa4.flash_attn_fwd_kernel.default(q, k, v, scale, True)
    where, block = mask_routes._buffer_layout(batch, seqlen, seqlen, head_dim, head_dim, *masks.values(),
                                          mask_routes._arch_major(q.device))
    parts = block_mask.MaskParts(True, -1, -1, *masks.values())
    scratch = torch.zeros(1, device=q.device)
    costs = {
        "fa4.masking_buffer": lambda: make_buffer(*masks.values(), seqlen, head_dim, head_dim, True),
        "  its Triton launch alone": lambda: fill_masking_buffer(
            buffer, where.offsets, seqlen + masking_buffer.KEY_TILE_SLACK, parts, seqlen, block),
        "fa4.flash_attn_fwd_masked_kernel given the buffer": lambda: forward(q, k, v, scale, True, **masks,
                                                                             masking_buffer=buffer),
        "fa4.flash_attn_bwd given the buffer": lambda: backward(dout, q, k, v, out, lse, scale, True, **masks,
                                                               masking_buffer=buffer),
        "unmasked causal fa4.flash_attn_fwd_kernel": lambda: torch.ops.fa4.flash_attn_fwd_kernel.default(
            q, k, v, scale, True),
        "unmasked causal fa4.flash_attn_bwd": lambda: backward(dout, q, k, v, plain_out, plain_lse, scale, True),
        "reference: one aten op (in-place add)": lambda: scratch.add_(1),
    }
    for fn in costs.values():
        fn()  # the first backward calls learn their launch sequences
    text.write("  idle GPU    busy GPU\n")
    for name, fn in costs.items():
        _idle_and_busy(name, fn, text)
    _launch_costs((dout, q, k, v, out, lse), scale, masks, buffer, text)


def _launch_costs(tensors, scale: float, masks: dict, buffer: torch.Tensor, text: io.StringIO) -> None:
    """Host µs of the launches a masked forward and backward replay, without the calls around them."""
    from fa4_inductor.runtime import fa4_call, launch_plan, mask_routes

    dout, q, k, v, out, lse = tensors
    # The adapter's parameters, in its order (the exact signatures keep it).
    params = dict(softmax_scale=scale, causal=True, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None,
                  **masks, masking_buffer=buffer)
    forward_tensors = (q, k, v, out, lse, None, *mask_routes.tensors_of(mask_routes.fa4_masking(q, k, v, params)))
    plan = fa4_call.masked_forward_plans().get(launch_plan.exact_signature(forward_tensors, params))
    if plan:
        _idle_and_busy("forward launch replay", lambda: plan.launch(forward_tensors, q.device), text)
    params["deterministic"] = False
    grads = [fa4_call.gradient_like(t) for t in (q, k, v)]
    keywords = mask_routes.fa4_masking(q, k, v, params, backward=True)
    backward_tensors = (dout, q, k, v, out, lse, *grads, *mask_routes.tensors_of(keywords))
    sequence = fa4_call.backward_plans().get(launch_plan.exact_signature(backward_tensors, params))
    if not sequence:
        text.write("  (no backward launch sequence for these tensors)\n")
        return
    buffers = [*backward_tensors, *(torch.empty_strided(s.size, s.stride, dtype=s.dtype, device=q.device).zero_()
                                    for s in sequence.scratch)]
    for index, launch in enumerate(sequence.launches):
        _idle_and_busy(f"backward launch {index} of the sequence", lambda: launch.launch(buffers), text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problem", default="left",
                        choices=("left", "right", "documents", "causal", *bench_vs_fa4.PROBLEMS))
    parser.add_argument("--variant", default="plugin", choices=("plugin", "flex_flash", "stock", "fa4_direct"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    # bench_vs_fa4's problems enable the plugin for their plugin variant themselves.
    plugin = args.variant == "plugin" and args.problem not in bench_vs_fa4.PROBLEMS
    with fa4_inductor.enabled(compile=plugin, eager=False):
        step = _step(args.problem, args.variant)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        host = (time.perf_counter() - start) / args.steps
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.steps
        kernels = problem_runner.kernel_ms(step)
        text = io.StringIO()
        text.write(f"{args.problem} ({args.variant}): host {host * 1e3:.3f} ms/step (enqueue), wall "
                   f"{wall * 1e3:.3f} ms/step, GPU kernels {sum(kernels.values()):.3f} ms/step, "
                   f"triton.testing.do_bench {do_bench(step, warmup=25, rep=100):.3f} ms\n")
        for name, ms in kernels.items():
            text.write(f"  {ms:8.3f} ms  {name}\n")
        if args.problem in bench_vs_fa4.PROBLEMS:
            text.write("host time of the step and its halves:\n")
            _halves(step, text)
        _timeline(step, 20, text)
        if args.variant == "plugin" and args.problem in ("left", "right", "documents"):
            text.write("\nhost time per call, started on an idle GPU and behind a ~2 ms kernel:\n")
            _call_costs(args.problem, text)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        profiler.disable()
        torch.cuda.synchronize()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(args.out) / f"host_profile_{args.problem}_{args.variant}.txt").write_text(text.getvalue())
    print(text.getvalue()[:8000])


if __name__ == "__main__":
    main()
