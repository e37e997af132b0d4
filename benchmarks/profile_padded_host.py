"""Where the host time of a padded (block-sparse) training step goes: cProfile of compiled forward + backward
steps of ``bench_padded``'s problem (left padding by default), next to the step's GPU kernel time.

Usage: python benchmarks/profile_padded_host.py --problem left --out OUT_DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import time

import torch

import bench_padded
import fa4_inductor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problem", default="left", choices=("left", "right", "documents"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    q, k, v = bench_padded._leaves(bench_padded.B, bench_padded.H, bench_padded.S, bench_padded.D)
    extra = bench_padded._segments() if args.problem == "documents" else bench_padded._padding(args.problem)
    function = bench_padded._sdpa_documents if args.problem == "documents" else bench_padded._sdpa_padded
    with fa4_inductor.enabled(compile=True, eager=False):
        plugin = torch.compile(lambda *a: function(*a), fullgraph=True)
        step = bench_padded._fwd_bwd(plugin, (q, k, v), extra)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        host = (time.perf_counter() - start) / args.steps
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = {}
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                kernels[event.name[:80]] = kernels.get(event.name[:80], 0.0) + event.device_time / 1000
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            step()
        profiler.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    text.write(f"{args.problem}: host {host * 1e3:.3f} ms/step (enqueue), wall {wall * 1e3:.3f} ms/step, "
               f"GPU kernels {sum(kernels.values()):.3f} ms/step\n")
    for name, ms in sorted(kernels.items(), key=lambda item: -item[1]):
        text.write(f"  {ms:8.3f} ms  {name}\n")
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(args.out) / f"host_profile_{args.problem}.txt").write_text(text.getvalue())
    print(text.getvalue()[:6000])


if __name__ == "__main__":
    main()
