"""First training step, stock vs plugin, in a cold process and in a second process.

Each measurement is a fresh Python process compiling an attention block
(dim 2048, 16 heads, D=128, bf16, B=2, S=4096, causal) and running one
training step; the first pair runs with empty Inductor and FA4 caches, the
second pair reuses them (a restarted job). Every FA4 kernel compile
(``cute.compile``) is counted, split into compiles while ``torch.compile``
compiled the graph and compiles during the step itself. Writes JSON and
markdown.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time


def child(plugin: bool) -> dict:
    """One process: compile + first step, then a second step; FA4 compiles counted."""
    import torch
    from torch._guards import TracingContext

    import fa4_inductor
    from examples.attention_block import AttentionBlock

    compiles = {"at_graph_compile": [], "at_run": []}
    if plugin:
        import cutlass.cute as cute

        real_compile = cute.compile

        def counted_compile(*args, **kwargs):
            start = time.perf_counter()
            result = real_compile(*args, **kwargs)
            where = "at_graph_compile" if TracingContext.try_get() is not None else "at_run"
            compiles[where].append(round(time.perf_counter() - start, 2))
            return result

        cute.compile = counted_compile
        fa4_inductor.enable(compile=True, eager=False)
    torch.manual_seed(0)
    block = AttentionBlock(2048, 16).cuda().bfloat16()
    x = torch.randn(2, 4096, 2048, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True)

    def step():
        block.zero_grad(set_to_none=True)
        compiled(x).float().square().mean().backward()
        torch.cuda.synchronize()

    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    step()
    second = time.perf_counter() - start
    return {"first_step_s": round(first, 2), "second_step_ms": round(second * 1e3, 2),
            "fa4_compiles": {k: len(v) for k, v in compiles.items()},
            "fa4_compile_s": {k: round(sum(v), 2) for k, v in compiles.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", choices=["stock", "plugin"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "plugin")))
        return
    caches = tempfile.mkdtemp(prefix="fa4_first_step_")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor",
               FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED="1", FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=f"{caches}/fa4",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path.cwd()), os.environ.get("PYTHONPATH", "")]))
    results = {}
    for run in ("cold process", "second process"):
        for variant in ("stock", "plugin"):
            done = subprocess.run([sys.executable, __file__, "--child", variant], env=env,
                                  capture_output=True, text=True, timeout=900)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            results[f"{variant}, {run}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(variant, run, results[f"{variant}, {run}"], flush=True)
    import torch

    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "first_step.json").write_text(json.dumps(record, indent=1))
    lines = [f"# First training step ({record['device']}, torch {record['torch']})", "",
             "Attention block dim 2048, 16 heads, D=128, bf16, B=2, S=4096, causal; compile + fwd + bwd.", "",
             "| variant | first step (s) | second step (ms) | FA4 compiles at graph compile | FA4 compiles in the step |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        c, s = r["fa4_compiles"], r["fa4_compile_s"]
        lines.append(f"| {name} | {r['first_step_s']} | {r['second_step_ms']} | "
                     f"{c['at_graph_compile']} ({s['at_graph_compile']} s) | {c['at_run']} ({s['at_run']} s) |")
    (out_dir / "first_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
