"""Side-by-side attention timings on one GPU, in one process.

Kernels (bf16, H*D = 2048, B*S = 16384): stock SDPA flash (FA2), SDPA cuDNN,
FA4 called directly (``flash_attn.cute.flash_attn_func``), and the plugin's
compiled attention (``torch.compile`` of an SDPA-only function with
fa4_inductor enabled), forward and forward+backward. Blocks: a compiled
attention block (qkv projection -> SDPA -> out projection), stock
``torch.compile`` vs with the plugin vs FA4 called by hand on the projection's
views (eager), forward+backward.

Each variant is timed in ROUNDS interleaved rounds (one ``triton.testing.do_bench``
median per round) and the median round is reported, so clock drift hits all variants alike. Writes JSON and markdown to --out.
Usage: python benchmarks/bench_attention.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import platform
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import fa4_inductor
from examples.attention_block import AttentionBlock
from fa4_inductor.runtime import fa4_version

ROUNDS = 5  # interleaved timing rounds per variant; each round is one do_bench median


def _tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def _fwd_bwd(fn, inputs):
    def run():
        out = fn()
        out.backward(torch.ones_like(out))
        for t in inputs:
            t.grad = None
    return run


def _time(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _attention_kernels(fn) -> list[str]:
    """Names of the attention kernels one call of ``fn`` launches (proof of what ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return sorted(n[:80] for n in names if any(t in n.lower() for t in ("flash", "fmha", "attention", "cudnn")))


def kernel_row(d: int, s: int, causal: bool) -> dict:
    """One (D, S, causal) row: FA2, cuDNN, FA4 direct, plugin-compiled SDPA."""
    from flash_attn.cute import flash_attn_func

    h, b = 2048 // d, 16384 // s
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    qs, ks, vs = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
    # SDPA operands as a model makes them: B,S,H,D memory seen as B,H,S,D.
    qm, km, vm = (t.detach().clone().requires_grad_(True) for t in (qs, ks, vs))
    flops = 4 * b * h * s * s * d / (2 if causal else 1)

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn

    def fa4_direct():
        return flash_attn_func(qs, ks, vs, causal=causal)[0]

    def attention(qm, km, vm):
        return F.scaled_dot_product_attention(qm.transpose(1, 2), km.transpose(1, 2), vm.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)

    torch._dynamo.reset()
    plugin = torch.compile(attention, fullgraph=True)

    variants = {
        "fa2": (sdpa(SDPBackend.FLASH_ATTENTION), (q, k, v)),
        "cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION), (q, k, v)),
        "fa4_direct": (fa4_direct, (qs, ks, vs)),
        "plugin_compiled": (lambda: plugin(qm, km, vm), (qm, km, vm)),
    }
    row = {"D": d, "S": s, "B": b, "H": h, "causal": causal}
    # The plugin must stay enabled while timing: a compiled function that
    # recompiles (here: for no_grad) after disable() gets no rewrite.
    with fa4_inductor.enabled(compile=True, eager=False):
        samples = {(name, mode): [] for name in variants for mode in ("fwd", "fwdbwd")}
        for _ in range(ROUNDS):  # interleaved rounds: clock drift hits every variant alike
            for name, (fn, inputs) in variants.items():
                with torch.no_grad():
                    samples[(name, "fwd")].append(_time(fn))
                samples[(name, "fwdbwd")].append(_time(_fwd_bwd(fn, inputs)))
        for (name, mode), times in samples.items():
            ms = statistics.median(times)
            row[f"{name}_{mode}_ms"] = ms
            row[f"{name}_{mode}_tflops"] = _tflops(flops * (3.5 if mode == "fwdbwd" else 1), ms)
        row["plugin_kernels"] = _attention_kernels(variants["plugin_compiled"][0])
    row["plugin_vs_fa4_fwd"] = row["plugin_compiled_fwd_ms"] / row["fa4_direct_fwd_ms"]
    row["plugin_vs_fa4_fwdbwd"] = row["plugin_compiled_fwdbwd_ms"] / row["fa4_direct_fwdbwd_ms"]
    return row


def block_row(d: int, s: int, causal: bool) -> dict:
    """Compiled attention block, fwd+bwd: stock torch.compile vs with the plugin."""
    dim, b = 2048, 16384 // s
    block = AttentionBlock(dim, dim // d, causal).cuda().bfloat16()
    x = torch.randn(b, s, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    times, kernels = {}, {}
    for name, on in (("stock", False), ("plugin", True)):
        # A fresh Dynamo cache per variant: two compiles of one forward would share cache entries.
        torch._dynamo.reset()
        with fa4_inductor.enabled(compile=True, eager=False) if on else contextlib.nullcontext():
            compiled = torch.compile(block, fullgraph=True)
            step = _fwd_bwd(lambda: compiled(x), [x, *block.parameters()])
            times[name] = statistics.median(_time(step) for _ in range(ROUNDS))
            kernels[name] = _attention_kernels(step)
    step = _fwd_bwd(lambda: _direct_fa4_block(block, x), [x, *block.parameters()])
    times["fa4_direct"] = statistics.median(_time(step) for _ in range(ROUNDS))
    return {"D": d, "S": s, "B": b, "causal": causal, "kernels": kernels, "stock_fwdbwd_ms": times["stock"],
            "plugin_fwdbwd_ms": times["plugin"], "fa4_direct_fwdbwd_ms": times["fa4_direct"],
            "speedup": times["stock"] / times["plugin"], "plugin_vs_fa4_direct": times["fa4_direct"] / times["plugin"]}


def _direct_fa4_block(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's computation with FA4's ``flash_attn_func`` called by hand on the projection's B,S,H,D views
    (what a user writing FA4 into the model would do), eager."""
    from flash_attn.cute import flash_attn_func

    b, s, dim = x.shape
    q, k, v = block.qkv(x).view(b, s, 3, block.heads, dim // block.heads).unbind(2)
    return block.proj(flash_attn_func(q, k, v, causal=block.causal)[0].reshape(b, s, dim))


def _markdown(result: dict) -> str:
    lines = [f"# Attention benchmark ({result['device']})", "",
             f"torch {result['torch']}, flash-attn-4 {result['fa4']}; medians of triton do_bench; "
             "TFLOP/s with fwd FLOPs 4·B·H·S²·D (halved if causal), fwd+bwd 3.5× fwd.", "",
             "## Kernels (TFLOP/s)", "",
             "| D | S | causal | FA2 fwd | cuDNN fwd | FA4 fwd | plugin fwd | FA2 f+b | cuDNN f+b | FA4 f+b | plugin f+b | plugin/FA4 time fwd | plugin/FA4 time f+b | plugin ran |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        lines.append(
            f"| {r['D']} | {r['S']} | {r['causal']} | {r['fa2_fwd_tflops']:.0f} | {r['cudnn_fwd_tflops']:.0f} | "
            f"{r['fa4_direct_fwd_tflops']:.0f} | {r['plugin_compiled_fwd_tflops']:.0f} | {r['fa2_fwdbwd_tflops']:.0f} | "
            f"{r['cudnn_fwdbwd_tflops']:.0f} | {r['fa4_direct_fwdbwd_tflops']:.0f} | "
            f"{r['plugin_compiled_fwdbwd_tflops']:.0f} | {r['plugin_vs_fa4_fwd']:.3f} | {r['plugin_vs_fa4_fwdbwd']:.3f} | "
            f"{'FA4' if all('flash_attncute' in k for k in r['plugin_kernels']) else r['plugin_kernels']} |")
    lines += ["", "## Compiled attention block (dim 2048, fwd+bwd, ms)", "",
              "| D | S | causal | stock torch.compile | with fa4_inductor | FA4 called by hand (eager) | speedup vs stock | "
              "plugin speed / FA4 by hand |", "|---|---|---|---|---|---|---|---|"]
    for r in result["blocks"]:
        lines.append(f"| {r['D']} | {r['S']} | {r['causal']} | {r['stock_fwdbwd_ms']:.3f} | "
                     f"{r['plugin_fwdbwd_ms']:.3f} | {r['fa4_direct_fwdbwd_ms']:.3f} | {r['speedup']:.3f}x | "
                     f"{r['plugin_vs_fa4_direct']:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--s", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--block-s", type=int, nargs="+", default=[4096, 16384])
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "fa4": fa4_version.version(), "python": platform.python_version(), "kernels": [], "blocks": []}
    for d in args.d:
        for s in args.s:
            for causal in (False, True):
                result["kernels"].append(kernel_row(d, s, causal))
                print(json.dumps(result["kernels"][-1]), flush=True)
    for s in args.block_s:
        for causal in (False, True):
            result["blocks"].append(block_row(128, s, causal))
            print(json.dumps(result["blocks"][-1]), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(result, indent=1))
    (out / "attention.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
