"""Probe: FA4's kernels on the attention of the left-padded HF Llama benchmark, with and without GQA.

In ``bench_hf_models``' left-padded Llama step (B=2, 16 query / 4 KV heads, S=4096, D=128, row 1 left-padded
over a third) the plugin's FA4 backward took 1.50x, its forward 1.34x the GPU time of HF
``flash_attention_4``'s varlen calls, where the padded benchmark without GQA (``bench_padded``) showed ~1.17x.
This probe times that attention alone (forward + backward, side by side in one process, GPU ms by kernel):

- ``plugin``: compiled SDPA with ``(q_idx >= kv_idx) & pad`` and ``enable_gqa=True`` (the plugin's block-sparse
  route); ``plugin_expanded``: the same with K/V already at 16 heads;
- ``varlen``: FA4 varlen on the unpadded tokens (HF's route), 4 KV heads; ``varlen_expanded``: 16 KV heads;
- ``plugin_causal``: the plugin on the unpadded causal problem (FA4's own causal, no mask_mod), 4 KV heads;
- ``masked_pack_gqa`` / ``masked_no_pack_gqa``: FA4 called directly with the plugin's masking keywords
  (mask_mod, masking buffer, block sparsity) on B,S,H,D tensors, forward with FA4's ``pack_gqa`` on (its
  default for GQA) or off.

Usage: python benchmarks/probe_gqa_masked.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
import torch.nn.functional as F

import bench_padded
import fa4_inductor
import problem_runner

B, HQ, HKV, S, D = 2, 16, 4, 4096, 128
PADDED = S // 3  # row 1's padded positions


def _masked(q, k, v, pad):
    i, j = torch.arange(S, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i >= j)[None, None] & pad[:, None, None, :],
                                          enable_gqa=True)


def _causal(q, k, v, _):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _plugin(function, heads_kv: int, pad):
    q = bench_padded._leaves(B, HQ, S, D)[0]
    k, v = bench_padded._leaves(B, heads_kv, S, D)[:2]
    with fa4_inductor.enabled(compile=True, eager=False):
        compiled = torch.compile(problem_runner.with_own_code(function, f"kv{heads_kv}"), fullgraph=True)
        return problem_runner.warm(problem_runner.fwd_bwd(compiled, (q, k, v), pad))


def _varlen(heads_kv: int):
    lengths = torch.tensor([S, S - PADDED], device="cuda")
    total = int(lengths.sum())
    q = bench_padded._leaves(total, HQ, D)[0]
    k, v = bench_padded._leaves(total, heads_kv, D)[:2]
    return problem_runner.warm(problem_runner.fwd_bwd(bench_padded._varlen(lengths, lengths, True), (q, k, v)))


def _masked_direct(pad, pack_gqa: bool):
    """FA4's forward and backward with the plugin's masking keywords for causal & ``pad``, 4 KV heads."""
    from fa4_inductor.runtime import fa4_binding

    module = fa4_binding.module()
    q = bench_padded._leaves(B, S, HQ, D)[0]
    k, v = bench_padded._leaves(B, S, HKV, D)[:2]
    forward_masking, backward_masking = bench_padded.plugin_masking(q, k, v, pad)

    class Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = module._flash_attn_fwd(q, k, v, return_lse=True, pack_gqa=pack_gqa, **forward_masking)[:2]
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            return module._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, **backward_masking)[:3]

    return problem_runner.warm(problem_runner.fwd_bwd(Masked.apply, (q, k, v)))


def run() -> dict:
    torch.manual_seed(0)
    pad = torch.ones(B, S, dtype=torch.bool, device="cuda")
    pad[1, :PADDED] = False
    steps = {"plugin": _plugin(_masked, HKV, pad), "plugin_expanded": _plugin(_masked, HQ, pad),
             "varlen": _varlen(HKV), "varlen_expanded": _varlen(HQ), "plugin_causal": _plugin(_causal, HKV, pad),
             "masked_pack_gqa": _masked_direct(pad, True), "masked_no_pack_gqa": _masked_direct(pad, False)}
    row = {"ms": problem_runner.interleaved_medians(steps),
           "kernel_ms": {name: problem_runner.kernel_ms(step) for name, step in steps.items()}}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    pathlib.Path(args.out, "probe_gqa_masked.json").write_text(json.dumps(run(), indent=1))


if __name__ == "__main__":
    main()
