"""FlexAttention programs on one GPU: the plugin's FA4 rewrite vs FlexAttention FLASH and Triton.

Each problem is one ``flex_attention`` program (bf16, D=128, forward + backward), compiled three ways,
side by side in one process, median of 5 rounds of ``triton.testing.do_bench`` in which the variants take turns:

- ``plugin``: fa4_inductor on; the call becomes an FA4 call and the block mask built in the step is removed;
- ``flex_flash``: no plugin, ``kernel_options={"BACKEND": "FLASH"}`` (PyTorch's own route to FA4's kernels);
- ``flex_triton``: no plugin, FlexAttention's default Triton backend.

The program builds its block mask with ``create_block_mask`` inside the compiled step; the peers pay for that
construction, the plugin removes it. ``flex_flash_premade``: FlexAttention FLASH with the block mask built once
outside the timing (what torchtitan and gpt-fast do), the comparison of the attention alone. Output: JSON and markdown in --out, with each variant's largest difference
from FlexAttention FLASH, its GPU ms by kernel in one step (profiler) and the plugin's site decision.
Usage: python benchmarks/bench_flex.py --out benchmarks/results
"""

from __future__ import annotations

import contextlib
import json

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import fa4_inductor
import problem_runner
from fa4_inductor import stats

D = 128


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 1024)


def _softcap(score, b, h, q_idx, kv_idx):
    return 50.0 * torch.tanh(score / 50.0)


def _padding_lookup(pad: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & pad[b, kv_idx]
    return mask_mod


def _documents(segments: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (segments[b, q_idx] == segments[b, kv_idx])
    return mask_mod


# name: (B, H, H_kv, S, mask_mod factory, score_mod)
PROBLEMS = {
    "causal_s1k_b16": (16, 16, 16, 1024, lambda: _causal, None),
    "causal_s2k_b8": (8, 16, 16, 2048, lambda: _causal, None),
    "causal_s4k_b4": (4, 16, 16, 4096, lambda: _causal, None),
    "causal_s8k_b2": (2, 16, 16, 8192, lambda: _causal, None),
    "causal_s16k_b1": (1, 16, 16, 16384, lambda: _causal, None),
    "gqa_causal_s8k": (2, 32, 8, 8192, lambda: _causal, None),
    "window1024_s8k": (2, 16, 16, 8192, lambda: _window, None),
    "window1024_softcap_s8k": (2, 16, 16, 8192, lambda: _window, _softcap),
    "padded_causal_s4k": (4, 16, 16, 4096, None, None),
    "documents_causal_s4k": (4, 16, 16, 4096, None, None),
}


def _mask_mod(name: str, batch: int, seqlen: int):
    if name == "padded_causal_s4k":
        keep = torch.tensor([1.0, 0.875, 0.75, 0.625], device="cuda")
        pad = torch.arange(seqlen, device="cuda")[None, :] < (keep * seqlen).long()[:, None]
        return _padding_lookup(pad)
    if name == "documents_causal_s4k":
        generator = torch.Generator(device="cuda").manual_seed(0)
        cuts = torch.sort(torch.randint(256, seqlen - 256, (batch, 3), device="cuda", generator=generator), 1).values
        return _documents((torch.arange(seqlen, device="cuda")[None, None, :] >= cuts[:, :, None]).sum(1))
    return PROBLEMS[name][4]()


def run(name: str) -> dict:
    """Every variant on one problem; returns a result row."""
    batch, heads, heads_kv, seqlen, _, score_mod = PROBLEMS[name]
    torch.manual_seed(0)
    q = torch.randn(batch, heads, seqlen, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, heads_kv, seqlen, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    mask_mod = _mask_mod(name, batch, seqlen)
    gqa = heads != heads_kv

    def in_step(options=None):
        def program(q, k, v):
            block_mask = create_block_mask(mask_mod, batch, None, seqlen, seqlen, device="cuda")
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                                  kernel_options=options)
        return program

    premade_mask = create_block_mask(mask_mod, batch, None, seqlen, seqlen, device="cuda")

    def premade(options=None):
        def program(q, k, v):
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=premade_mask, enable_gqa=gqa,
                                  kernel_options=options)
        return program

    row: dict = {"problem": name, "shape": f"B{batch} H{heads}/{heads_kv} S{seqlen} D{D}", "ms": {}, "errors": {}}
    outputs, steps = {}, {}
    variants = [("plugin", in_step(), True), ("flex_flash", in_step({"BACKEND": "FLASH"}), False),
                ("flex_triton", in_step(), False), ("flex_flash_premade", premade({"BACKEND": "FLASH"}), False)]
    torch._dynamo.reset()
    for variant, program, plugin in variants:  # compiled and warmed one by one, then timed taking turns
        stats.reset()
        try:
            with fa4_inductor.enabled(compile=True, eager=False) if plugin else contextlib.nullcontext():
                compiled = torch.compile(problem_runner.with_own_code(program, variant), fullgraph=True)
                outputs[variant] = compiled(q, k, v).detach()
                steps[variant] = problem_runner.warm(problem_runner.fwd_bwd(compiled, (q, k, v)))
        except Exception as exc:  # a peer that can't run this problem is reported, not fatal
            row["errors"][variant] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if plugin:
            row["plugin_sites"] = [f"{r.decision}: {r.reason or r.features}" for r in stats.site_records()]
    problem_runner.time_and_compare(row, steps, outputs, "flex_flash", ("flex_flash", "flex_triton",
                                                                        "flex_flash_premade"))
    print(json.dumps(row), flush=True)
    return row


def markdown(result: dict) -> str:
    return problem_runner.markdown_table(
        result, "FlexAttention programs, forward + backward",
        f"torch {result['torch']}, flash-attn-4 {result['fa4']}; bf16, D={D}. Median of 5 rounds of "
        "triton.testing.do_bench, the variants taking turns in each round, ms. The block mask is built inside the "
        "compiled step (the plugin removes it), except in the flex_flash_premade column, where FlexAttention FLASH "
        "gets it built once outside the timing. Speedups are the peer's time over the plugin's.",
        ("plugin", "flex_flash", "flex_triton", "flex_flash_premade"),
        {"flex_flash": "vs FLASH", "flex_triton": "vs Triton", "flex_flash_premade": "vs FLASH premade"})


def main() -> None:
    """Run the problems named on the command line (default: all)."""
    problem_runner.main(__doc__.splitlines()[0], list(PROBLEMS), "flex_h200", run, markdown)


if __name__ == "__main__":
    main()
