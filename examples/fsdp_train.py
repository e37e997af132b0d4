"""FSDP2 training of a Llama-style model, stock torch.compile vs fa4_inductor, on every rank.

Each decoder layer is compiled (with the plugin enabled for the plugin run) and wrapped with
``fully_shard``; the model is trained for ``--steps`` steps on the same data with and without
the plugin. Rank 0 prints one JSON line: per-variant losses and median step time, and per rank
the plugin's attention-site decisions (and, on CUDA, the FA4 kernels the profiler saw). Site
decisions are recorded when a graph is compiled, so a run served from Inductor's cache lists none.

CPU (gloo, the CPU reference kernels):
    python -m torch.distributed.run --nproc-per-node 2 examples/fsdp_train.py --device cpu
GPUs (NCCL, FA4), NVLink multicast off:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
    torchrun --nproc-per-node 2 examples/fsdp_train.py --device cuda --layers 4 --hidden 2048 --seq 8192
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
import transformers
from torch.distributed.fsdp import fully_shard

import fa4_inductor
from fa4_inductor import stats


def build(args) -> torch.nn.Module:
    """A Llama with GQA from a config (random weights), in bf16 on this rank's device."""
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads // 4,
        max_position_embeddings=max(args.seq, 64), attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=args.device, dtype=torch.bfloat16)


def _fa4_kernels(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and "flash_attncute" in e.name)


def train(args, plugin: bool) -> dict:
    """Shard, compile and train; return losses, step times and (plugin) site decisions."""
    torch._dynamo.reset()
    stats.reset()
    devices = ("cpu",) if args.device == "cpu" else ("cuda",)
    routed = fa4_inductor.enabled(eager=False, devices=devices) if plugin else contextlib.nullcontext()
    model = build(args)
    with routed:
        for layer in model.model.layers:
            layer.compile()
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.Generator().manual_seed(dist.get_rank())
        batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=data).to(args.device)
                   for _ in range(args.steps)]

        def step(ids):
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        losses, times = [], []
        for ids in batches:
            start = time.perf_counter()
            losses.append(step(ids))
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result = {"losses": [round(float(x), 5) for x in losses],
                  "median_step_ms": round(statistics.median(times[2:] or times) * 1e3, 2)}
        if plugin:
            result["sites"] = sorted({f"{r.decision}: {r.reason or r.pattern}" for r in stats.site_records()})
            if args.device == "cuda":
                result["fa4_kernels_per_step"] = _fa4_kernels(lambda: step(batches[0]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    results = {variant: train(args, plugin) for variant, plugin in (("stock", False), ("plugin", True))}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        print(json.dumps({"world_size": dist.get_world_size(), "device": args.device, "ranks": gathered}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
