"""Decoding on one GPU: one query row against a long KV cache, stock vs FA4 vs the plugin.

Kernels (bf16, 32 query heads, 8 KV heads, D=128, S_q=1, K/V a (B, H, S, D)
cache): stock SDPA without a mask (flash) and with the (B, 1, 1, S_kv) bool
mask a static-cache decoding step gets; FA4's own entry point and the
plugin's adapter (split-KV on sm90), without a mask and with that mask as key
padding. Each is captured in a CUDA graph (``do_bench_cudagraph``), as
decoding runs under ``mode="reduce-overhead"``, so the times are GPU times.

Generation: a 4-layer Llama (hidden 2048, 16 heads, 4 KV heads, bf16, random
weights) runs ``generate`` with a static cache, whose decoding step
transformers compiles itself (``reduce-overhead``), stock vs with the plugin
enabled. Tokens/s of the decoding steps come from two generation lengths
(the difference removes the prefill); the plugin's site records say what
each compiled attention site became.
Usage: python benchmarks/bench_decode.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from triton.testing import do_bench_cudagraph

import fa4_inductor
from fa4_inductor.runtime import fa4_call
from fa4_inductor import stats

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def _graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return 1000 * do_bench_cudagraph(fn, rep=50, return_mode="median")


def kernel_row(batch: int, kv_len: int) -> dict:
    """One (B, S_kv) row: GPU µs per decoding attention call, four ways."""
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, KV_HEADS, kv_len, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool, device="cuda")
    mask[:, ..., kv_len - kv_len // 8:] = False  # the unfilled tail of a static cache
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))  # the B,S,H,D views FA4 gets of a (B, H, S, D) cache
    padding = mask.view(batch, kv_len)
    params = dict(softmax_scale=HEAD_DIM ** -0.5, causal=False, window_left=-1, window_right=-1, softcap=0.0,
                  seqused_k=None)
    out = torch.empty_like(qb)
    lse = torch.empty(batch, HEADS, 1, device="cuda", dtype=torch.float32)
    variants = {
        "stock_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "stock_sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "fa4": lambda: fa4_call._fa4_forward(qb, kb, vb, out, lse, **params),  # FA4 alone: one CTA per KV head
        "fa4_key_padding": lambda: fa4_call._fa4_forward(qb, kb, vb, out, lse, **params, key_padding=padding),
        "plugin": lambda: fa4_call.forward(qb, kb, vb, **params),  # split-KV on sm90
        "plugin_key_padding": lambda: fa4_call.forward(qb, kb, vb, **params, key_padding=padding),
    }
    row = {"B": batch, "S_kv": kv_len, "splits": fa4_call.split_count(qb, kb, vb, {**params, "key_padding": None})}
    for name, fn in variants.items():
        try:
            row[f"{name}_us"] = _graph_us(fn)
        except Exception as exc:  # reported in the table rather than ending the run
            row[f"{name}_us"], row[f"{name}_error"] = float("nan"), f"{type(exc).__name__}: {exc}"[:200]
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    got, _ = fa4_call.forward(qb, kb, vb, **params, key_padding=padding)
    row["plugin_key_padding_max_err"] = (got.transpose(1, 2).float() - want).abs().max().item()
    return row


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=32768, attn_implementation="sdpa", pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()


def _generate_seconds(model, ids, new_tokens: int, cache_len: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, cache_implementation="static", cache_config={"max_cache_len": cache_len})
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def generate_row(model, ids: torch.Tensor, new_tokens: int, plugin: bool) -> dict:
    """Decoding tokens/s of ``generate`` with a static cache, stock or with the plugin."""
    torch._dynamo.reset()
    stats.reset()
    batch, prompt = ids.shape
    cache_len = prompt + new_tokens
    with fa4_inductor.enabled(compile=True, eager=True) if plugin else contextlib.nullcontext():
        _generate_seconds(model, ids, new_tokens, cache_len)  # compiles the decoding step, captures graphs
        short = statistics.median(_generate_seconds(model, ids, new_tokens // 4, cache_len)[0] for _ in range(3))
        runs = [_generate_seconds(model, ids, new_tokens, cache_len) for _ in range(3)]
    long = statistics.median(seconds for seconds, _ in runs)
    decode_tokens = new_tokens - new_tokens // 4
    return {
        "B": batch, "prompt": prompt, "cache_len": cache_len, "new_tokens": new_tokens,
        "variant": "plugin" if plugin else "stock",
        "decode_ms_per_step": 1000 * (long - short) / decode_tokens,
        "decode_tokens_per_s": batch * decode_tokens / (long - short),
        "sites": sorted({f"{r.decision}: {r.reason or r.pattern} (q {r.features.get('q_shape')}, k {r.features.get('k_shape')})"
                         for r in stats.site_records()}),
        "eager": {k: v for k, v in stats.counters.items() if k.startswith("eager")},
        "sequences": runs[-1][1].cpu(),
    }


def markdown(result: dict) -> str:
    lines = [f"# Decoding, stock vs FA4 vs fa4_inductor ({result['device']})", "",
             f"torch {result['torch']}, transformers {result['transformers']}.", "",
             f"## Attention kernel, S_q=1 (bf16, {HEADS} query / {KV_HEADS} KV heads, D={HEAD_DIM}; "
             "GPU µs per call, CUDA graph replay, median)", "",
             "No mask: stock SDPA vs FA4 alone vs the plugin (split-KV on sm90). With the mask: stock SDPA with "
             "the bool mask vs FA4 / the plugin with it as key padding (a mask_mod).", "",
             "| B | S_kv | splits | stock | FA4 | plugin | plugin/stock | stock + mask | FA4 + padding | "
             "plugin + padding | plugin/stock (mask) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        lines.append(f"| {r['B']} | {r['S_kv']} | {r['splits']} | {r['stock_sdpa_us']:.1f} | {r['fa4_us']:.1f} | "
                     f"{r['plugin_us']:.1f} | {r['plugin_us'] / r['stock_sdpa_us']:.2f} | "
                     f"{r['stock_sdpa_mask_us']:.1f} | {r['fa4_key_padding_us']:.1f} | "
                     f"{r['plugin_key_padding_us']:.1f} | {r['plugin_key_padding_us'] / r['stock_sdpa_mask_us']:.2f} |")
    lines += ["", "## `generate` with a static cache (4-layer Llama, bf16, decoding step compiled by transformers)", "",
              "| B | prompt | cache | variant | ms/step | tokens/s | sites | tokens equal to stock (common prefix) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["generate"]:
        lines.append(f"| {r['B']} | {r['prompt']} | {r['cache_len']} | {r['variant']} | {r['decode_ms_per_step']:.2f} | "
                     f"{r['decode_tokens_per_s']:.0f} | {'; '.join(r['sites'])} | {r.get('same_tokens', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32], help="batch sizes for the kernels")
    parser.add_argument("--kv", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--generate", type=int, nargs="*", default=[1, 8], help="batch sizes for generate")
    parser.add_argument("--prompt", type=int, default=4000)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "kernels": [], "generate": []}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        rows = [{k: v for k, v in r.items() if k != "sequences"} for r in result["generate"]]
        (out / "decode.json").write_text(json.dumps({**result, "generate": rows}, indent=1))
        (out / "decode.md").write_text(markdown({**result, "generate": rows}))

    # generate runs first: after the CUDA-graph kernel rows, generate twice hit an illegal memory access
    # (unexplained, see results/decode.md); each part alone runs clean.
    if args.generate:
        model = _llama()
        for batch in args.generate:
            ids = torch.randint(1, 32000, (batch, args.prompt), device="cuda")
            stock = generate_row(model, ids, args.new_tokens, plugin=False)
            plugin = generate_row(model, ids, args.new_tokens, plugin=True)
            # Greedy decoding of random weights in bf16: after a near-tie flips one token the rest differ too,
            # so report how much of each row's generated text matches stock before the first difference.
            equal = (stock["sequences"][:, args.prompt:] == plugin["sequences"][:, args.prompt:]).int()
            plugin["same_tokens"] = f"{equal.cumprod(-1).sum(-1).float().mean().item() / equal.shape[1]:.0%}"
            result["generate"] += [stock, plugin]
            for r in (stock, plugin):
                print(json.dumps({k: v for k, v in r.items() if k != "sequences"}), flush=True)
            save()
    for batch in args.batches:
        for kv_len in args.kv:
            result["kernels"].append(kernel_row(batch, kv_len))
            print(json.dumps(result["kernels"][-1]), flush=True)
    save()
    print(markdown({**result, "generate": [{k: v for k, v in r.items() if k != "sequences"}
                                           for r in result["generate"]]}))


if __name__ == "__main__":
    main()
