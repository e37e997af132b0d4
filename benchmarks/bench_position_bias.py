"""Attention with a position bias in model code on one GPU: the plugin's FA4 ops vs stock torch.compile, FA4 called
by hand and FlexAttention FLASH with the same score_mod (per-key bias included).

Problems (bf16, D=128), side by side in one process, median of 5 rounds of ``triton.testing.do_bench`` in which the
variants take turns:

- ``alibi_*``: an MPT-style layer, ``softmax(q·kᵀ·s + slopes[h] * arange(1 - S, 1)).masked_fill(causal)`` with the
  slopes computed in the step, forward + backward;
- ``falcon_*``: Falcon's ALiBi, ``slope * position`` in bfloat16 over positions counted from the attention mask
  (``cumsum``) laid into the causal mask, forward + backward (the plugin: its per-key bias op);
- ``bloom_*``: Bloom's layer, the same bias over (B * H, 1, S) added by ``baddbmm`` to the scores of operands with the
  heads folded into the batch, viewed as (B, H, S, S) for the additive causal mask and the softmax, folded again for
  ``bmm``, forward + backward (the plugin: its per-key bias op on the unfolded tensors);
- ``t5_*``: a T5 self-attention layer, unscaled scores plus its bucketed relative-position bias (an embedding of 32
  buckets), decoder (causal) and encoder: forward only with the learned table under ``no_grad`` (in training the
  table's gradient keeps PyTorch's attention), forward + backward with the table frozen.

Variants: ``plugin`` (fa4_inductor on: ``fa4.flash_attn_alibi_fwd`` / ``fa4.flash_attn_relative_bias_fwd``),
``stock`` (torch.compile alone), ``fa4_direct`` (``flash_attn.cute.flash_attn_func`` with the plugin's score_mod and
the slopes or the table as its aux tensor, computed outside the timing) and ``flex_flash`` (``flex_attention`` with
the same bias as a score_mod, the causal block mask built once outside the timing, ``BACKEND: FLASH``). Output: JSON
and markdown in --out, with each variant's largest difference from stock.
Usage: python benchmarks/bench_position_bias.py --out benchmarks/results
"""

from __future__ import annotations

import contextlib
import json
import math

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import fa4_inductor
import problem_runner
from fa4_inductor import stats
from fa4_inductor.runtime import fa4_binding
from tests.t5_buckets import relative_position_buckets

D, BUCKETS, MAX_DISTANCE = 128, 32, 128

# name: (kind, B, H, S, causal, training)
PROBLEMS = {
    "alibi_causal_s4k": ("alibi", 2, 16, 4096, True, True),
    "alibi_causal_s8k": ("alibi", 1, 16, 8192, True, True),
    "t5_decoder_inference_s2k": ("t5", 4, 16, 2048, True, False),
    "t5_encoder_inference_s2k": ("t5", 4, 16, 2048, False, False),
    "t5_decoder_frozen_table_s2k": ("t5", 4, 16, 2048, True, True),
    "falcon_key_bias_s4k": ("falcon", 2, 16, 4096, True, True),
    "bloom_key_bias_s4k": ("bloom", 2, 16, 4096, True, True),
}


def _slopes(heads: int, device) -> torch.Tensor:
    exponents = torch.arange(1, heads + 1, device=device).float() * (8 / heads)
    return 1.0 / torch.pow(2, exponents)


def _alibi_layer(q, k, v):
    """MPT's attention: ALiBi over the keys (a constant per row away from slope * (kv - q)), causal fill."""
    seqlen = k.shape[2]
    bias = torch.arange(1 - seqlen, 1, device=q.device, dtype=torch.int32).view(1, 1, 1, seqlen)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D) + bias * _slopes(q.shape[1], q.device).view(
        1, -1, 1, 1)
    hidden = torch.ones(q.shape[2], seqlen, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(hidden, torch.finfo(q.dtype).min)
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def _falcon_positions(batch: int, seqlen: int, device) -> torch.Tensor:
    kept = torch.ones(batch, seqlen, dtype=torch.long, device=device)
    return ((kept.cumsum(-1) - 1) * kept)[:, None, :]


def _falcon_layer(q, k, v):
    """Falcon's attention with ALiBi: the bf16 bias over mask-counted positions, the causal mask laid over it."""
    alibi = (_slopes(q.shape[1], q.device)[:, None].bfloat16() * _falcon_positions(q.shape[0], k.shape[2], q.device))
    hidden = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
    mask = torch.masked_fill(alibi[:, :, None, :] / math.sqrt(D), hidden, torch.finfo(q.dtype).min)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _bloom_alibi(batch: int, heads: int, seqlen: int, device) -> torch.Tensor:
    """Bloom's ``build_alibi_tensor``: ``slope * position`` over mask-counted positions, (B * H, 1, S) in bf16."""
    alibi = _slopes(heads, device)[..., None] * _falcon_positions(batch, seqlen, device)
    return alibi.reshape(batch * heads, 1, seqlen).to(torch.bfloat16)


def _bloom_layer(q, k, v):
    """Bloom's attention: ``alibi.baddbmm(q, kᵀ, beta=1, alpha=s)`` over folded heads, viewed 4-D for the mask."""
    batch, heads, seqlen, _ = q.shape
    q3, k3, v3 = (t.reshape(batch * heads, -1, D) for t in (q, k, v))
    scores = _bloom_alibi(batch, heads, seqlen, q.device).baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=1.0,
                                                                   alpha=1 / math.sqrt(D))
    hidden = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1)
    mask = torch.zeros(seqlen, seqlen, dtype=q.dtype, device=q.device).masked_fill(hidden, torch.finfo(q.dtype).min)
    probs = torch.softmax(scores.view(batch, heads, seqlen, -1) + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs.view(batch * heads, seqlen, -1), v3).view(batch, heads, seqlen, D)


def _buckets(relative_position: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    return relative_position_buckets(relative_position, bidirectional, BUCKETS, MAX_DISTANCE)


def _t5_layer(table: torch.nn.Embedding, causal: bool):
    def layer(q, k, v):
        positions = torch.arange(k.shape[2], device=q.device)[None, :] - torch.arange(q.shape[2], device=q.device)[:, None]
        bias = table(_buckets(positions, not causal)).permute([2, 0, 1]).unsqueeze(0)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() + bias.float()
        if causal:
            scores = scores.masked_fill(positions > 0, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    return layer


def _t5_table(table: torch.nn.Embedding, causal: bool, seqlen: int) -> torch.Tensor:
    """The (H, 2S - 1) float32 table of offsets -(S - 1) .. S - 1, for FA4 direct and the Flex score_mod."""
    offsets = torch.arange(1 - seqlen, seqlen, device=table.weight.device)
    return table(_buckets(offsets, not causal)).t().float().contiguous()


def _peers(kind: str, batch: int, heads: int, seqlen: int, causal: bool, table=None):
    """(fa4_direct, flex_flash) programs on B,H,S,D tensors."""
    from flash_attn.cute import flash_attn_func

    device = "cuda"
    if kind == "alibi":
        aux = _slopes(heads, device).contiguous()  # MPT's bias is slope * (kv - q) up to a constant per row
        score_mod, _ = fa4_binding.alibi_score_mods()

        def flex_mod(score, b, h, q_idx, kv_idx):
            return score + aux[h] * (kv_idx - q_idx)
    elif kind in ("falcon", "bloom"):  # Falcon's bias is scaled with the scores, Bloom's is not
        aux = ((_slopes(heads, device)[:, None].bfloat16() * _falcon_positions(batch, seqlen, device)).float()
               / math.sqrt(D)) if kind == "falcon" else _bloom_alibi(batch, heads, seqlen, device).view(
            batch, heads, seqlen).float()
        aux = aux.contiguous()
        score_mod, _ = fa4_binding.key_bias_score_mods()

        def flex_mod(score, b, h, q_idx, kv_idx):
            return score + aux[b, h, kv_idx]
    else:
        aux = _t5_table(table, causal, seqlen)
        score_mod, _ = fa4_binding.relative_bias_score_mods()

        def flex_mod(score, b, h, q_idx, kv_idx):
            return score + aux[h, kv_idx - q_idx + seqlen - 1]
    scale = 1.0 if kind == "t5" else 1 / math.sqrt(D)
    block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, seqlen, seqlen,
                                   device=device) if causal else None

    def fa4_direct(q, k, v):
        out = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=scale, causal=causal,
                              score_mod=score_mod, aux_tensors=[aux])
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    def flex_flash(q, k, v):
        return flex_attention(q, k, v, score_mod=flex_mod, block_mask=block_mask, scale=scale,
                              kernel_options={"BACKEND": "FLASH"})
    return fa4_direct, flex_flash


def run(name: str) -> dict:
    """Every variant on one problem; returns a result row."""
    kind, batch, heads, seqlen, causal, training = PROBLEMS[name]
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seqlen, D, device="cuda", dtype=torch.bfloat16, requires_grad=training)
               for _ in range(3))
    table = None
    if kind in ("alibi", "falcon", "bloom"):
        layer = {"alibi": _alibi_layer, "falcon": _falcon_layer, "bloom": _bloom_layer}[kind]
    else:
        table = torch.nn.Embedding(BUCKETS, heads, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        layer = _t5_layer(table, causal)
    fa4_direct, flex_flash = _peers(kind, batch, heads, seqlen, causal, table)
    row: dict = {"problem": name, "shape": f"B{batch} H{heads} S{seqlen} D{D}",
                 "step": "fwd+bwd" if training else "fwd", "ms": {}, "errors": {}}
    outputs, steps = {}, {}
    torch._dynamo.reset()
    for variant, program, plugin in (("plugin", layer, True), ("stock", layer, False),
                                     ("fa4_direct", fa4_direct, False), ("flex_flash", flex_flash, False)):
        stats.reset()
        try:
            with fa4_inductor.enabled(compile=True, eager=False) if plugin else contextlib.nullcontext():
                compiled = program if variant == "fa4_direct" else torch.compile(
                    problem_runner.with_own_code(program, variant), fullgraph=True)
                with torch.no_grad():
                    outputs[variant] = compiled(q, k, v).detach()
                if training:
                    steps[variant] = problem_runner.warm(problem_runner.fwd_bwd(compiled, (q, k, v)))
                else:
                    steps[variant] = problem_runner.warm(torch.no_grad()(lambda c=compiled: c(q, k, v)))
        except Exception as exc:  # a peer that can't run this problem is reported, not fatal
            row["errors"][variant] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if plugin:
            row["plugin_sites"] = [f"{r.decision}: {r.reason or r.features}" for r in stats.site_records()]
    problem_runner.time_and_compare(row, steps, outputs, "stock", ("stock", "fa4_direct", "flex_flash"))
    print(json.dumps(row), flush=True)
    return row


def markdown(result: dict) -> str:
    return problem_runner.markdown_table(
        result, "Position biases in model code",
        f"torch {result['torch']}, flash-attn-4 {result['fa4']}; bf16, D={D}. Median of 5 rounds of "
        "triton.testing.do_bench, the variants taking turns in each round, ms. Speedups are the peer's time over "
        "the plugin's.",
        ("plugin", "stock", "fa4_direct", "flex_flash"),
        {"stock": "vs stock", "fa4_direct": "vs FA4 direct", "flex_flash": "vs Flex FLASH"}, columns=("shape", "step"))


def main() -> None:
    """Run the problems named on the command line (default: all)."""
    problem_runner.main(__doc__.splitlines()[0], list(PROBLEMS), "position_bias_h200", run, markdown)


if __name__ == "__main__":
    main()
