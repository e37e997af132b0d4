"""The plugin against FA4 called directly, and stock torch.compile, on one GPU: forward + backward, bf16, D=128.

Each problem is SDPA as model code writes it (B,S,H,D projection memory seen as B,H,S,D) compiled with the plugin
(``plugin``), and the same compiled stock (``stock``), against FA4's own ``flash_attn_func`` on B,S,H,D leaves
(``fa4_direct``; the window as its ``window_size``, GQA natively). Median of 5 rounds of ``triton.testing.do_bench``
in which the variants take turns, in one process; the result header names the FA4 version, and each row the
plugin's launch-plan checks (counted per call signature, once) and the kernels that ran. Padded batches:
``bench_padded.py`` (FA4 varlen doing the same work).
Usage: python benchmarks/bench_vs_fa4.py --out benchmarks/results --tag vs_fa4_h200_b40
"""

from __future__ import annotations

import contextlib
import json

import torch
import torch.nn.functional as F

import fa4_inductor
import problem_runner
from bench_padded import fa4_output
from fa4_inductor import stats

D = 128

# name: (B, H, H_kv, S, causal, left window or None)
PROBLEMS = {
    "noncausal_s1k_b16": (16, 16, 16, 1024, False, None),
    "causal_s1k_b16": (16, 16, 16, 1024, True, None),
    "noncausal_s4k_b4": (4, 16, 16, 4096, False, None),
    "causal_s4k_b4": (4, 16, 16, 4096, True, None),
    "noncausal_s16k_b1": (1, 16, 16, 16384, False, None),
    "causal_s16k_b1": (1, 16, 16, 16384, True, None),
    "gqa_causal_s8k": (2, 32, 8, 8192, True, None),
    "window1024_s8k": (2, 16, 16, 8192, True, 1023),
}


def _sdpa(causal: bool, window: int | None, heads: int, heads_kv: int):
    """SDPA on B,S,H,D memory, a window as Hugging Face builds it, GQA by ``enable_gqa``."""
    def attention(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = None
        if window is not None:
            i = torch.arange(q.shape[2], device=q.device)[:, None]
            j = torch.arange(k.shape[2], device=q.device)[None, :]
            mask = (j <= i) & (j >= i - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              enable_gqa=heads != heads_kv).transpose(1, 2)
    return attention


VARIANTS = ("plugin", "stock", "fa4_direct")


def variant_steps(name: str, row: dict | None = None, variants: tuple[str, ...] = VARIANTS) -> tuple[dict, dict]:
    """The warm forward + backward step of each of ``variants`` on one problem, and its output; ``row`` gets the
    plugin's sites and launch-plan checks."""
    from flash_attn.cute import flash_attn_func

    batch, heads, heads_kv, seqlen, causal, window = PROBLEMS[name]
    torch.manual_seed(0)
    q = torch.randn(batch, seqlen, heads, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, seqlen, heads_kv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    attention = _sdpa(causal, window, heads, heads_kv)

    def fa4_direct(q, k, v):
        return fa4_output(flash_attn_func(q, k, v, causal=causal and window is None,
                                          window_size=(window, 0) if window is not None else (None, None)))

    row = {} if row is None else row
    outputs, steps = {}, {}
    torch._dynamo.reset()
    for variant, plugin in (("plugin", True), ("stock", False)):
        if variant not in variants:
            continue
        stats.reset()
        with fa4_inductor.enabled(compile=True, eager=False) if plugin else contextlib.nullcontext():
            compiled = torch.compile(problem_runner.with_own_code(attention, variant), fullgraph=True)
            outputs[variant] = compiled(q, k, v).detach()
            steps[variant] = problem_runner.warm(problem_runner.fwd_bwd(compiled, (q, k, v)))
            if plugin:
                steps[variant]()  # the first replays: each launch plan checked against FA4's own call
                row["plugin_sites"] = [f"{r.decision}: {r.reason or r.features}" for r in stats.site_records()]
                row["plan_checks"] = {key: value for key, value in stats.counters.items() if key.startswith("plans.")}
    if "fa4_direct" in variants:
        outputs["fa4_direct"] = fa4_direct(q, k, v).detach()
        steps["fa4_direct"] = problem_runner.warm(problem_runner.fwd_bwd(fa4_direct, (q, k, v)))
    return steps, outputs


def run(name: str) -> dict:
    """Every variant on one problem; returns a result row."""
    batch, heads, heads_kv, seqlen, _, _ = PROBLEMS[name]
    row: dict = {"problem": name, "shape": f"B{batch} H{heads}/{heads_kv} S{seqlen} D{D}", "ms": {}}
    steps, outputs = variant_steps(name, row)
    row["ms"] = problem_runner.interleaved_medians(steps)
    row["kernel_ms"] = {variant: problem_runner.kernel_ms(step) for variant, step in steps.items()}
    row["max_abs_diff_vs_fa4_direct"] = {
        variant: (out.float() - outputs["fa4_direct"].float()).abs().max().item() for variant, out in outputs.items()}
    row["plugin_speed_vs_fa4_direct"] = row["ms"]["fa4_direct"] / row["ms"]["plugin"]
    row["speedup_vs_stock"] = row["ms"]["stock"] / row["ms"]["plugin"]
    print(json.dumps(row), flush=True)
    return row


def markdown(result: dict) -> str:
    lines = [f"# The plugin against FA4 direct, forward + backward ({result['device']})", "",
             f"**flash-attn-4 {result['fa4']}**, torch {result['torch']}; bf16, D={D}. Median of 5 rounds of "
             "triton.testing.do_bench, the variants taking turns in each round, ms. `plugin / FA4 direct` is FA4 "
             "direct's time over the plugin's (>= 1: the plugin as fast).", "",
             "| problem | shape | plugin | FA4 direct | stock compile | plugin / FA4 direct | vs stock | plan checks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ms = r["ms"]
        checks = r.get("plan_checks", {})
        lines.append(f"| {r['problem']} | {r['shape']} | {ms['plugin']:.3f} | {ms['fa4_direct']:.3f} | "
                     f"{ms['stock']:.3f} | {r['plugin_speed_vs_fa4_direct']:.3f}x | {r['speedup_vs_stock']:.2f}x | "
                     f"{checks.get('plans.checked', 0)} checked, {checks.get('plans.check_failed', 0)} failed |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the problems named on the command line (default: all)."""
    problem_runner.main(__doc__.splitlines()[0], list(PROBLEMS), "vs_fa4_h200", run, markdown)


if __name__ == "__main__":
    main()
