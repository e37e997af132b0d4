"""Stock torch.compile's SDPA gradients on transposed views, against float64: is the error PyTorch's own?

Masks FA4 can't express (prefix-LM, chunked) stay with stock SDPA under the plugin. On (B, S, H, D) leaves
transposed to (B, H, S, D) in the program, the GPU fuzz once saw such sites' gradients off by 0.2-1.0. This runs
each mask on both layouts four ways (eager, stock ``torch.compile``, stock on contiguous copies of q/k/v, compiled
with the plugin, which leaves the site to stock) and reports every gradient's relative error against float64 math
on the same inputs.
Usage: python benchmarks/probe_stock_transposed.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib

import torch
import torch.nn.functional as F

import fa4_inductor
from fa4_inductor.runtime import fa4_version
from fa4_inductor import stats

B, H, D = 2, 8, 64


def _mask(name: str, s: int, device) -> torch.Tensor | None:
    i, j = torch.arange(s, device=device)[:, None], torch.arange(s, device=device)[None, :]
    if name == "prefix_lm":
        return (j <= i) | (j < s // 4)
    if name == "chunked":
        return (i // 128) == (j // 128)
    if name == "prefix_lm_additive":
        return torch.where((j <= i) | (j < s // 4), 0.0, float("-inf"))
    return None


def _program(mask_name: str, layout: str, contiguous: bool = False):
    def attention(q, k, v):
        if layout == "bshd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if contiguous:
            q, k, v = (t.contiguous() for t in (q, k, v))
        mask = _mask(mask_name, q.shape[2], q.device)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask_name == "is_causal")
    return attention


def case(mask_name: str, layout: str, s: int) -> dict:
    """Relative gradient errors of eager, stock compile and the plugin against float64, for one case."""
    torch.manual_seed(0)
    shape = (B, H, s, D) if layout == "bhsd" else (B, s, H, D)
    leaves = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    fn = _program(mask_name, layout)
    want = fn(*(t.double() for t in leaves))
    dout = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, dout)
    row = {"mask": mask_name, "layout": layout, "S": s, "errors": {}}
    for variant in ("eager", "stock_compile", "stock_compile_contiguous", "plugin_compile"):
        torch._dynamo.reset()
        stats.reset()
        plugin = variant == "plugin_compile"
        with fa4_inductor.enabled(compile=True, eager=False) if plugin else contextlib.nullcontext():
            program = _program(mask_name, layout, contiguous=True) if variant.endswith("contiguous") else fn
            run = fn if variant == "eager" else torch.compile(program, fullgraph=True)
            grads = torch.autograd.grad(run(*leaves), leaves, dout.bfloat16())
        row["errors"][variant] = max(((g.double() - w).norm() / w.norm()).item() for g, w in zip(grads, want_grads))
        if variant == "plugin_compile":
            row["plugin_sites"] = [f"{r.decision}: {r.reason}" for r in stats.site_records()]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "fa4": fa4_version.version(),
              "rows": []}
    for mask_name in ("is_causal", "prefix_lm", "chunked", "prefix_lm_additive"):
        for layout in ("bhsd", "bshd"):
            for s in (1000,):
                result["rows"].append(case(mask_name, layout, s))
                print(json.dumps(result["rows"][-1]), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_stock_transposed_h200.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Stock SDPA gradients on transposed views vs float64 ({result['device']})", "",
             f"torch {result['torch']}, flash-attn-4 {result['fa4']}; bf16 B={B} H={H} D={D}; max over q, k, v of "
             "‖grad - grad_fp64‖ / ‖grad_fp64‖.", "",
             "| mask | layout | S | eager | stock compile | stock compile, contiguous q/k/v | plugin compile | "
             "plugin site |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        e = r["errors"]
        lines.append(f"| {r['mask']} | {r['layout']} | {r['S']} | {e['eager']:.4f} | {e['stock_compile']:.4f} | "
                     f"{e['stock_compile_contiguous']:.4f} | {e['plugin_compile']:.4f} | "
                     f"{'; '.join(r['plugin_sites'])[:80].replace('|', chr(92) + '|')} |")
    (out / "probe_stock_transposed_h200.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
