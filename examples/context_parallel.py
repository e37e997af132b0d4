"""Context parallelism (ring attention) with the plugin's eager override: per-shard calls run FA4.

``torch.distributed.tensor.experimental.context_parallel`` shards Q, K, V along the sequence and
runs SDPA as ring attention: each rank calls the aten flash-attention op on its query shard
against every key shard in turn and merges the partial results by their logsumexp. With the
plugin's eager override active those per-shard forward and backward calls run FA4 (on CPU, the
reference implementation). Under ``torch.compile`` the plugin's rewrite leaves SDPA on DTensors
to CP (a recorded fallback), and the per-shard flash ops of the compiled graph run FA4 the same
way. Checks output and gradients against one process computing the whole sequence, for plain and
causal (load-balanced) attention, eager and compiled, and on CUDA times a forward+backward step
of stock CP (cuDNN or flash shards) vs CP on FA4. Rank 0 prints one JSON line.

CPU (gloo):
    python -m torch.distributed.run --nproc-per-node 2 examples/context_parallel.py --device cpu
GPUs (NCCL), NVLink multicast off:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
    torchrun --nproc-per-node 2 examples/context_parallel.py --device cuda --seq 32768
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import context_parallel
from torch.distributed.tensor.experimental._attention import context_parallel_unshard

import fa4_inductor
from fa4_inductor import stats


def _load_balance(enabled: bool) -> None:
    # CP's head-tail load balancing is only valid for causal attention; its switch has no public setter.
    from torch.distributed.tensor.experimental._attention import _cp_options

    _cp_options.enable_load_balance = enabled


def whole_sequence(q, k, v, dout, causal: bool) -> list[torch.Tensor]:
    """Output and q/k/v gradients of the unsharded problem, in float32."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
    out.backward(dout.float())
    return [out.detach(), *(t.grad for t in leaves)]


def attend(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def ring_step(mesh, q, k, v, dout, causal: bool, plugin: bool, compiled: bool, repeats: int = 1):
    """Forward+backward of SDPA under ``context_parallel`` (compiled: in one ``torch.compile`` graph);
    unsharded results and seconds per step."""
    buffers = [t.clone() for t in (q, k, v, dout)]
    _load_balance(causal)
    devices = (q.device.type,)
    routed = (fa4_inductor.enabled(compile=compiled, eager=True, devices=devices) if plugin
              else contextlib.nullcontext())
    torch._dynamo.reset()  # stock and plugin compile the same function: neither may reuse the other's graph
    step = torch.compile(attend, fullgraph=True) if compiled else attend
    times = []
    with routed, context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2]):
        for _ in range(repeats):
            leaves = [t.detach().requires_grad_() for t in buffers[:3]]
            start = time.perf_counter()
            with torch.enable_grad():
                out = step(*leaves, causal)
                out.backward(buffers[3])
            if q.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        shards = [out.detach(), *(t.grad for t in leaves)]
        results = context_parallel_unshard(mesh, shards, [2, 2, 2, 2])
    return results, statistics.median(times[1:] or times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                        help="default: nccl on CUDA, gloo on CPU")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group(args.backend or ("gloo" if args.device == "cpu" else "nccl"))
    mesh = init_device_mesh(args.device, (dist.get_world_size(),))
    torch.manual_seed(0)  # every rank draws the same whole-sequence problem
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v, dout = (torch.randn(shape, dtype=torch.bfloat16, device=args.device) for _ in range(4))
    report = {"world_size": dist.get_world_size(), "device": args.device, "shape_bhsd": list(shape), "cases": []}
    for causal, compiled in ((False, False), (True, False), (False, True), (True, True)):
        want = whole_sequence(q, k, v, dout, causal)
        stats.reset()
        got, plugin_s = ring_step(mesh, q, k, v, dout, causal, plugin=True, compiled=compiled, repeats=args.repeats)
        case = {"causal": causal, "compiled": compiled, "counters": dict(stats.counters),
                "plugin_step_ms": round(plugin_s * 1e3, 3),
                "max_abs_err": {name: (g.float() - w).abs().max().item()
                                for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)},
                "reference_max_abs": {name: w.abs().max().item() for name, w in zip(("out", "dq", "dk", "dv"), want)}}
        if args.device == "cuda":
            try:
                case["stock_step_ms"] = round(ring_step(mesh, q, k, v, dout, causal, plugin=False, compiled=compiled,
                                                        repeats=args.repeats)[1] * 1e3, 3)
            except Exception as exc:  # stock CP under torch.compile fails in some torch versions: report it
                case["stock_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        report["cases"].append(case)
    if dist.get_rank() == 0:
        print(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
