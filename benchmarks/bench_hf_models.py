"""Hugging Face models (random weights, from configs) on one GPU: stock torch.compile vs fa4_inductor.

For each model and sequence length (bf16, B=2): a training step (forward + backward of the LM
loss) and an inference forward, each compiled stock and with the plugin, side by side in one
process, and Hugging Face's own ``attn_implementation="flash_attention_4"`` compiled (``hf_fa4``, what
users would pick instead) and compiled with the plugin (``hf_fa4_plugin``: HF's FA4 calls traced as the plugin's
ops); a variant that cannot run a model gets a note (traceback on stderr), not a failure. Checks the plugin's logits
against the uncompiled model, counts FA4 kernels with the profiler, and records peak memory. Writes JSON and markdown to --out.
With --left-pad F, batch row 1 is left-padded over a fraction F of its positions (an attention_mask,
labels -100 there) and errors are measured on the unpadded positions. With --attn flex_attention every model
runs HF's FlexAttention integration: ``stock`` is then FlexAttention's Triton backend and ``flex_flash`` the
same model with ``kernel_options={"BACKEND": "FLASH"}``.
Usage: python benchmarks/bench_hf_models.py --out benchmarks/results --models llama mistral --seq 2048 8192
       [--modes train infer] [--variants stock plugin hf_fa4 flex_flash] [--attn flex_attention]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import traceback
import unittest.mock

import torch
import transformers

import fa4_inductor
import problem_runner
from fa4_inductor import stats

LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB = 4, 2048, 16, 4, 32000


def build(name: str, attn: str | None = None) -> torch.nn.Module:
    """A 4-layer model of the family with ``attn`` as its attention implementation (default: Gemma2 on HF's eager
    path, where its softcap exists, the others on SDPA).

    GPT-2, BERT and RoBERTa have no GQA (16 KV heads); BERT and RoBERTa are
    masked LMs (bidirectional attention, the LM loss on every position).
    """
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=16384,
                  attn_implementation=attn or ("eager" if name == "gemma2" else "sdpa"))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if name == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=1024))
    if name == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, head_dim=HIDDEN // HEADS, sliding_window=1024))
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=16384,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"))
    encoder = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   attn_implementation="sdpa")
    if name == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(**encoder, max_position_embeddings=16384))
    if name == "roberta":
        return transformers.RobertaForMaskedLM(transformers.RobertaConfig(
            **encoder, max_position_embeddings=16386, pad_token_id=1))
    raise ValueError(name)


def _median_ms(fn, reps: int = 10) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _is_fa4(name: str) -> bool:
    return "flash_attncute" in name.lower()


def _is_other_attention(name: str) -> bool:
    # (Inductor's Triton kernels are named after the ops they fuse, e.g. "..._flash_attn_fwd_...")
    lowered = name.lower()
    return not lowered.startswith("triton_") and any(
        t in lowered for t in ("fmha", "flash", "cudnn", "attention", "efficient"))


def _kernel_profile(fn) -> dict:
    """Attention kernels of one step, counted and timed: FA4's, other attention kernels' (names of the first
    few), the GPU ms of every kernel of the step (against its time, the host's share), and the kernels taking
    the most GPU time."""
    launches = problem_runner.kernel_launches(fn)
    counts: dict = {"fa4": 0, "other_attention": 0, "other_names": [], "gpu_ms_attention": 0.0,
                    "gpu_ms_all": sum(ms for _, ms in launches)}
    for name, ms in launches:
        if _is_fa4(name):
            counts["fa4"] += 1
        elif _is_other_attention(name):
            counts["other_attention"] += 1
            if name[:120] not in counts["other_names"]:
                counts["other_names"].append(name[:120])
        else:
            continue
        counts["gpu_ms_attention"] += ms
    counts["top_gpu_ms"] = dict(list(problem_runner.ms_by_name(launches, 100).items())[:25])
    return counts


def _measure(step, reference, valid) -> dict:
    try:
        logits = step().float()[valid]
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return {"ms": _median_ms(step), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "kernels": _kernel_profile(step),
                "rel_err_vs_eager": ((logits - reference).norm() / reference.norm()).item()}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": float("nan"), "peak_gib": float("nan"), "kernels": {}, "rel_err_vs_eager": float("nan"),
                "oom": True}


def _padding(s: int, left_pad: float) -> torch.Tensor:
    mask = torch.ones(2, s, dtype=torch.long, device="cuda")
    mask[1, : int(s * left_pad)] = 0
    return mask


def _attention(model: torch.nn.Module, variant: str) -> contextlib.AbstractContextManager:
    """The attention implementation a variant runs: HF's FA4 integration for ``hf_fa4``; for
    ``plugin_no_sparsity`` the plugin with FA4 block sparsity off (key padding as a mask_mod on every tile,
    as before block sparsity); else the model's own."""
    if variant == "plugin_no_sparsity":
        return unittest.mock.patch.dict(os.environ, {"FA4_INDUCTOR_BLOCK_SPARSITY": "0"})
    if variant not in ("hf_fa4", "hf_fa4_plugin"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def swapped():
        from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

        before = model.config._attn_implementation
        model.set_attn_implementation("flash_attention_4")
        lazy_import_flash_attention("flash_attention_4")  # before compiling, as HF asks (Dynamo can't trace it)
        try:
            yield
        finally:
            model.set_attn_implementation(before)
    return swapped()


def _run_variant(model, variant: str, mode: str, inputs, masks, extra, references, rows, dynamic: bool) -> None:
    """Measure one variant (one compile, reused for every S when ``dynamic``) into ``rows``."""
    torch._dynamo.reset()
    stats.reset()
    on = variant.startswith("plugin") or variant == "hf_fa4_plugin"
    if variant == "flex_flash":
        extra = {s: {**kwargs, "kernel_options": {"BACKEND": "FLASH"}} for s, kwargs in extra.items()}
    with (fa4_inductor.enabled(compile=True, eager=False) if on else contextlib.nullcontext(),
          _attention(model, variant)):
        compiled = torch.compile(model, dynamic=dynamic or None)
        for s, ids in inputs.items():
            def step(ids=ids, s=s):
                if mode == "train":
                    out = compiled(ids, labels=ids.masked_fill(masks[s] == 0, -100), **extra[s])
                    out.loss.backward()
                    model.zero_grad(set_to_none=True)
                    return out.logits
                with torch.no_grad():
                    return compiled(ids, **extra[s]).logits
            reference = references[s] if references[s] is not None else torch.ones(1, device="cuda")
            for key, value in _measure(step, reference, masks[s].bool()).items():
                rows[(mode, s)][f"{variant}_{key}"] = value
            # What the rewrite decided per attention site (reasons of fallbacks included).
            rows[(mode, s)][f"{variant}_sites"] = sorted({f"{r.decision}: {r.reason or r.pattern}"
                                                          for r in stats.site_records()})


def run(name: str, seqs: list[int], left_pad: float = 0.0, modes=("train", "infer"),
        variants=("stock", "plugin", "hf_fa4"), attn: str | None = None, dynamic: bool = True) -> list[dict]:
    """All rows of one model: per mode, one compile per variant (dynamic-shape unless not ``dynamic``)."""
    torch.manual_seed(0)
    model = build(name, attn).cuda().to(torch.bfloat16)
    inputs = {s: torch.randint(0, VOCAB, (2, s), device="cuda") for s in seqs}
    masks = {s: _padding(s, left_pad) for s in seqs}
    extra = {s: {"attention_mask": masks[s]} if left_pad else {} for s in seqs}
    references = {}
    for s, ids in inputs.items():
        try:
            with torch.no_grad():
                references[s] = model(ids, **extra[s]).logits.float()[masks[s].bool()]
        except torch.OutOfMemoryError:
            references[s] = None
            torch.cuda.empty_cache()
    rows = {(mode, s): {"model": name, "S": s, "mode": mode, "left_pad": left_pad, "attn": attn or "default"}
            for mode in modes for s in seqs}
    for mode in modes:
        for variant in variants:
            try:
                _run_variant(model, variant, mode, inputs, masks, extra, references, rows, dynamic)
            except Exception as exc:  # a variant that can't run this model is reported (traceback on stderr)
                traceback.print_exc()
                for s in seqs:
                    rows[(mode, s)][f"{variant}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        for s in seqs:
            row = rows[(mode, s)]
            for key, peer in (("speedup", "stock"), ("speedup_vs_no_sparsity", "plugin_no_sparsity"),
                              ("speedup_vs_hf_fa4", "hf_fa4"), ("speedup_vs_flex_flash", "flex_flash")):
                if f"{peer}_ms" in row and "plugin_ms" in row:
                    row[key] = row[f"{peer}_ms"] / row["plugin_ms"]
            if "hf_fa4_plugin_ms" in row:  # the plugin on HF's FA4 calls: vs HF FA4 compiled, vs the plugin on sdpa
                for key, peer in (("hf_fa4_plugin_speedup_vs_hf_fa4", "hf_fa4"),
                                  ("hf_fa4_plugin_speedup_vs_plugin", "plugin")):
                    if f"{peer}_ms" in row:
                        row[key] = row[f"{peer}_ms"] / row["hf_fa4_plugin_ms"]
            print(json.dumps(row), flush=True)
    return list(rows.values())  # the model is freed with this frame


def markdown(result: dict) -> str:
    lines = [f"# Hugging Face models, stock torch.compile vs fa4_inductor ({result['device']})", "",
             f"torch {result['torch']}, transformers {result['transformers']}; bf16, B=2, {LAYERS} layers, "
             f"hidden {HIDDEN}, {HEADS} heads (D=128), {KV_HEADS} KV heads, sliding window 1024 (Mistral, Gemma2); "
             "median of 10 steps (CUDA events). 'train' = forward + backward of the LM loss. Compiled "
             + ("with dynamic=True." if result.get("dynamic", True) else "with static shapes (dynamic=None).")
             + (f" Batch row 1 left-padded over {result['rows'][0]['left_pad']:.0%} of its positions "
                "(attention_mask); errors on unpadded positions." if result["rows"] and result["rows"][0]["left_pad"]
                else "")
             + (" Every model runs attn_implementation=\"flex_attention\": 'stock' is FlexAttention's Triton backend "
                "compiled; FlexAttention FLASH times are in the notes." if result["rows"]
                and result["rows"][0].get("attn") == "flex_attention" else ""), "",
             "| model | S | mode | stock ms | HF flash_attention_4 ms | plugin ms | speedup | vs HF FA4 | FA4 kernels (plugin) | other attention kernels (plugin) | peak GiB stock | peak GiB plugin | rel err plugin vs eager | rel err stock vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in result["rows"]:
        for key in (k for k in r if k.endswith("_error")):
            notes.append(f"{r['model']} S={r['S']} {r['mode']}: {key[:-len('_error')]} did not run ({r[key]}).")
        if "stock_ms" not in r or "plugin_ms" not in r:
            continue
        hf = f"{r['hf_fa4_ms']:.2f}" if "hf_fa4_ms" in r else ""
        if "flex_flash_ms" in r:
            notes.append(f"{r['model']} S={r['S']} {r['mode']}: FlexAttention FLASH {r['flex_flash_ms']:.2f} ms, "
                         f"plugin {r['plugin_ms']:.2f} ms ({r['speedup_vs_flex_flash']:.2f}x).")
        if "hf_fa4_plugin_ms" in r:
            notes.append(f"{r['model']} S={r['S']} {r['mode']}: HF flash_attention_4 compiled with the plugin "
                         f"{r['hf_fa4_plugin_ms']:.2f} ms: "
                         + ", ".join(f"{r[key]:.2f}x {label}" for key, label in (
                             ("hf_fa4_plugin_speedup_vs_hf_fa4", "HF FA4 compiled without it"),
                             ("hf_fa4_plugin_speedup_vs_plugin", "the plugin on the sdpa model")) if key in r) + ".")
        if "plugin_no_sparsity_ms" in r:
            notes.append(f"{r['model']} S={r['S']} {r['mode']}: plugin without block sparsity "
                         f"{r['plugin_no_sparsity_ms']:.2f} ms, with it {r['plugin_ms']:.2f} ms "
                         f"({r['speedup_vs_no_sparsity']:.2f}x).")
        gpu = [f"{v} {r[f'{v}_ms']:.2f} ms: kernels {r[f'{v}_kernels']['gpu_ms_all']:.2f}, attention kernels "
               f"{r[f'{v}_kernels']['gpu_ms_attention']:.2f}" for v in ("stock", "hf_fa4", "plugin", "flex_flash")
               if "gpu_ms_all" in r.get(f"{v}_kernels", {})]
        if gpu:
            notes.append(f"{r['model']} S={r['S']} {r['mode']}, GPU time of one step's kernels (profiler): "
                         + "; ".join(gpu) + ".")
        vs_hf = f"{r['speedup_vs_hf_fa4']:.2f}x" if "speedup_vs_hf_fa4" in r else ""
        lines.append(
            f"| {r['model']} | {r['S']} | {r['mode']} | {r['stock_ms']:.2f} | {hf} | {r['plugin_ms']:.2f} | {r['speedup']:.2f}x | {vs_hf} | "
            f"{r['plugin_kernels'].get('fa4')} | {r['plugin_kernels'].get('other_attention')} | {r['stock_peak_gib']:.2f} | "
            f"{r['plugin_peak_gib']:.2f} | {r['plugin_rel_err_vs_eager']:.2e} | {r['stock_rel_err_vs_eager']:.2e} |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", nargs="+", default=["llama", "mistral", "gemma2", "qwen2"])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--tag", default="hf_models")
    parser.add_argument("--left-pad", type=float, default=0.0)
    parser.add_argument("--modes", nargs="+", default=["train", "infer"])
    parser.add_argument("--variants", nargs="+", default=["stock", "plugin", "hf_fa4"],
                        help="stock, plugin, hf_fa4, hf_fa4_plugin, plugin_no_sparsity, flex_flash")
    parser.add_argument("--attn", default=None, help="attention implementation of every model (flex_attention)")
    parser.add_argument("--static", action="store_true",
                        help="compile without dynamic=True (HF Gemma2's flex_attention does not compile with it on "
                             "torch 2.11, stock included)")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "dynamic": not args.static, "rows": []}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models:  # results are written after each model, so a run cut short keeps what it measured
        result["rows"] += run(name, args.seq, args.left_pad, args.modes, args.variants, args.attn, not args.static)
        (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
        (out / f"{args.tag}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
