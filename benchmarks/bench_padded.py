"""Padded and packed batches on one GPU: the plugin vs FA4 varlen, FlexAttention FLASH/Triton and stock compile.

Problems (bf16, B=4, H=16, S=4096, D=128, causal, forward + backward):

- ``right``: rows keep 100 / 87.5 / 75 / 62.5 % of their tokens, padding last;
- ``left``: the same lengths, padding first;
- ``documents``: 4 packed documents per row (random cut points, fixed seed), causal within each;
- ``causal``: no padding (the reference point, and the layout-copy check).

Variants, side by side in one process, median of ``triton.testing.do_bench`` (forward + backward through
``torch.autograd.grad``, so no gradient accumulation is timed):

- ``plugin``: ``torch.compile`` of SDPA with the mask built in the graph the way model code builds it
  (``(q_idx >= kv_idx) & pad[:, None, None, :]``, or ``seg[b, q_idx] == seg[b, kv_idx]``), fa4_inductor on;
- ``stock``: the same function compiled without the plugin;
- ``fa4_varlen``: FA4's ``flash_attn_varlen_func`` on the unpadded tokens (documents: one sequence each);
  it computes only the valid query rows, the others compute every row as SDPA defines them;
- ``fa4_varlen_all_rows`` (``right`` only): the same plus a second varlen call for the padded query rows,
  which under right padding see every valid key of their row: varlen doing the plugin's work (with left
  padding the padded rows see no key and are zeros, and documents have no padded rows);
- ``flex_flash`` / ``flex_triton``: compiled ``flex_attention`` with the same mask as a block mask
  (built once, outside the timing), ``kernel_options={"BACKEND": "FLASH"}`` / default;
- ``fa4_direct`` (``causal`` only): FA4's ``flash_attn_func`` on B,S,H,D-contiguous copies;
- ``hf_packed`` (``documents`` only): Hugging Face's packed flash-attention path (``_flash_attention_forward`` with
  ``cu_seq_lens_q/k`` and ``max_length_q/k``, as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` hands
  them to a model) with ``attn_implementation="flash_attention_4"``, compiled with the plugin: HF's
  ``flash_attn_varlen_func`` call runs the plugin's varlen op on the same tokens as ``fa4_varlen``.

Every variant is compiled and warmed first, then timed in rounds in which the variants take turns.

q/k/v are B,H,S,D leaves (varlen: packed (total, H, D) leaves). Output: JSON and markdown in --out, with
each variant's GPU ms by kernel in one step (profiler) and the plugin's largest difference from
FlexAttention FLASH.
Usage: python benchmarks/bench_padded.py --out benchmarks/results
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

import fa4_inductor
import problem_runner
from fa4_inductor import stats

B, H, S, D = 4, 16, 4096, 128
KEEP = (1.0, 0.875, 0.75, 0.625)


def _lengths() -> torch.Tensor:
    return torch.tensor([int(S * f) for f in KEEP], device="cuda")


def _padding(side: str) -> torch.Tensor:
    idx = torch.arange(S, device="cuda")[None, :]
    lengths = _lengths()[:, None]
    return idx < lengths if side == "right" else idx >= S - lengths


def _segments(documents: int = 4) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(0)
    cuts = torch.sort(torch.randint(256, S - 256, (B, documents - 1), device="cuda", generator=generator), 1).values
    return (torch.arange(S, device="cuda")[None, None, :] >= cuts[:, :, None]).sum(dim=1).to(torch.int32)


def _sdpa_padded(q, k, v, pad):
    i, j = torch.arange(q.shape[2], device=q.device)[:, None], torch.arange(k.shape[2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i >= j)[None, None] & pad[:, None, None, :])


def _sdpa_documents(q, k, v, seg):
    i, j = torch.arange(q.shape[2], device=q.device)[:, None], torch.arange(k.shape[2], device=q.device)[None, :]
    same = seg[:, None, :, None] == seg[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i >= j)[None, None] & same)


def _sdpa_causal(q, k, v, _):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _mask_mod(problem: str, extra: torch.Tensor):
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def padded(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & extra[b, kv_idx]

    def documents(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (extra[b, q_idx] == extra[b, kv_idx])

    return {"causal": causal, "right": padded, "left": padded, "documents": documents}[problem]


def _leaves(*shape):
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16).requires_grad_(True) for _ in range(3)]


def fa4_output(result):
    """The attention output of an FA4 ``flash_attn_*func`` call, which returns it alone or with its lse."""
    return result[0] if isinstance(result, tuple) else result


def plugin_masking(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor) -> tuple[dict, dict]:
    """The plugin's FA4 masking keywords (forward, backward) for a causal call on these B,S,H,D tensors masked by
    the (B, S) ``key_padding``, from one masking buffer made here (as a compiled step makes it)."""
    from fa4_inductor.runtime import mask_routes

    params = dict(causal=True, window_left=-1, window_right=-1, segment_ids=None, key_padding=key_padding)
    params["masking_buffer"] = mask_routes.make_buffer(key_padding, None, q.shape[1], q.shape[-1], v.shape[-1], params)
    return tuple(mask_routes.fa4_masking(q, k, v, params, backward=backward) for backward in (False, True))


def _varlen(lengths_q: torch.Tensor, lengths_k: torch.Tensor, causal: bool):
    """FA4 varlen attention on packed (total, H, D) tokens of sequences this long, its cu_seqlens and maximal
    lengths made once here (a user packing a batch makes them once per step, outside the attention)."""
    from flash_attn.cute import flash_attn_varlen_func

    cu_q, cu_k = (F.pad(n.cumsum(0), (1, 0)).to(torch.int32) for n in (lengths_q, lengths_k))
    longest_q, longest_k = int(lengths_q.max()), int(lengths_k.max())

    def fn(q, k, v):
        return fa4_output(flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                 max_seqlen_q=longest_q, max_seqlen_k=longest_k, causal=causal))

    return fn


def _sequence_lengths(problem: str, extra: torch.Tensor) -> torch.Tensor:
    """The packed sequences' lengths: each row's unpadded tokens, or each document."""
    if problem != "documents":
        return _lengths()
    lengths = torch.stack([torch.bincount(row, minlength=int(extra.max()) + 1) for row in extra.long()]).flatten()
    return lengths[lengths > 0]


def _varlen_step(problem: str, extra: torch.Tensor):
    """FA4 varlen on the unpadded tokens (or on each document): (step, tokens)."""
    lengths = _sequence_lengths(problem, extra)
    total = int(lengths.sum())
    return problem_runner.fwd_bwd(_varlen(lengths, lengths, True), _leaves(total, H, D)), total


def _hf_packed_step(extra: torch.Tensor):
    """Hugging Face's packed flash-attention path on the documents' tokens, compiled with the plugin (which must
    stay on while the step runs: the compiled code guards on it)."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward, lazy_import_flash_attention

    lazy_import_flash_attention("flash_attention_4")
    lengths = _sequence_lengths("documents", extra)
    cu_seq_lens, longest = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), int(lengths.max())

    def packed(q, k, v):
        return _flash_attention_forward(q, k, v, None, q.shape[1], is_causal=True, cu_seq_lens_q=cu_seq_lens,
                                        cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest,
                                        attn_implementation="flash_attention_4")

    return problem_runner.fwd_bwd(torch.compile(packed, fullgraph=True), _leaves(1, int(lengths.sum()), H, D))


def _varlen_all_rows_step():
    """FA4 varlen computing every row SDPA defines under right padding: the valid rows (causal, as
    ``fa4_varlen``), then the padded query rows, which see every valid key of their row (a second, non-causal
    varlen call on the same keys). The same work as the plugin's."""
    lengths = _lengths()
    padded = S - lengths
    (q, k, v), q_padded = _leaves(int(lengths.sum()), H, D), _leaves(int(padded.sum()), H, D)[0]

    valid_rows, padded_rows = _varlen(lengths, lengths, True), _varlen(padded, lengths, False)

    def fn(q, q_padded, k, v):
        return torch.cat([valid_rows(q, k, v), padded_rows(q_padded, k, v)])

    return problem_runner.fwd_bwd(fn, (q, q_padded, k, v))


def run(problem: str) -> dict:
    """Every variant on one problem; returns a result row."""
    torch.manual_seed(0)
    q, k, v = _leaves(B, H, S, D)
    extra = _segments() if problem == "documents" else (_padding(problem) if problem in ("right", "left") else None)
    function = {"documents": _sdpa_documents, "causal": _sdpa_causal}.get(problem, _sdpa_padded)
    row: dict = {"problem": problem}
    outputs, steps = {}, {}  # every variant compiled and warmed first, then timed taking turns

    torch._dynamo.reset()
    stats.reset()
    with fa4_inductor.enabled(compile=True, eager=False):
        plugin = torch.compile(lambda *a: function(*a), fullgraph=True)
        outputs["plugin"] = plugin(q, k, v, extra).detach()
        steps["plugin"] = problem_runner.warm(problem_runner.fwd_bwd(plugin, (q, k, v), extra))
    row["plugin_sites"] = [f"{r.decision}: {r.reason or r.features}" for r in stats.site_records()]

    stock = torch.compile(lambda *a: function(*a), fullgraph=True)
    steps["stock"] = problem_runner.warm(problem_runner.fwd_bwd(stock, (q, k, v), extra))

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(_mask_mod(problem, extra), B, None, S, S, device="cuda")
    flex = torch.compile(flex_attention)
    for name, options in (("flex_flash", {"BACKEND": "FLASH"}), ("flex_triton", None)):
        try:
            def fn(q, k, v, options=options):
                return flex(q, k, v, block_mask=block_mask, kernel_options=options)
            outputs[name] = fn(q, k, v).detach()
            steps[name] = problem_runner.warm(problem_runner.fwd_bwd(fn, (q, k, v)))
        except Exception as exc:  # a peer that can't run this problem is reported, not fatal
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if problem == "causal":
        from flash_attn.cute import flash_attn_func

        def direct(q, k, v):
            return fa4_output(flash_attn_func(q, k, v, causal=True))
        bshd = [t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v)]
        steps["fa4_direct"] = problem_runner.warm(problem_runner.fwd_bwd(direct, bshd))
    else:
        varlen, row["varlen_tokens"] = _varlen_step(problem, extra)
        steps["fa4_varlen"] = problem_runner.warm(varlen)
        if problem == "right":
            steps["fa4_varlen_all_rows"] = problem_runner.warm(_varlen_all_rows_step())
    if problem == "documents":
        fa4_inductor.enable(compile=True, eager=False)  # on until the timing is done (see _hf_packed_step)
        stats.reset()
        steps["hf_packed"] = problem_runner.warm(_hf_packed_step(extra))
        row["hf_packed_sites"] = [f"{r.decision}: {r.pattern} {r.reason or r.features}" for r in stats.site_records()]
    row["ms"] = problem_runner.interleaved_medians(steps)
    fa4_inductor.disable()
    row["kernel_ms"] = {name: problem_runner.kernel_ms(step) for name, step in steps.items()}
    if "flex_flash" in outputs:
        row["plugin_vs_flex_flash_max_abs_diff"] = (outputs["plugin"].float() - outputs["flex_flash"].float()).abs().max().item()
    same_work = row["ms"].get("fa4_varlen_all_rows") or row["ms"].get("fa4_varlen") or row["ms"].get("fa4_direct")
    row["plugin_vs_best_peer"] = row["ms"]["plugin"] / min(same_work, row["ms"].get("flex_flash") or same_work)
    if "hf_packed" in row["ms"]:
        row["hf_packed_vs_fa4_varlen"] = row["ms"]["hf_packed"] / row["ms"]["fa4_varlen"]
        row["hf_packed_vs_plugin_documents"] = row["ms"]["hf_packed"] / row["ms"]["plugin"]
    print(json.dumps(row), flush=True)
    return row


def markdown(result: dict) -> str:
    names = ("plugin", "stock", "fa4_varlen", "fa4_varlen_all_rows", "fa4_direct", "flex_flash", "flex_triton",
             "hf_packed")
    lines = [f"# Padded and packed batches, forward + backward ({result['device']})", "",
             f"torch {result['torch']}, flash-attn-4 {result['fa4']}; bf16, B={B}, H={H}, S={S}, D={D}, causal; "
             f"padded rows keep {', '.join(f'{f:.1%}' for f in KEEP)} of their tokens; documents: 4 per row. "
             "Median of 5 rounds of triton.testing.do_bench, the variants taking turns in each round, ms. plugin / best = the plugin's time over the faster "
             "of FlexAttention FLASH and FA4 varlen (or direct) doing the same work: every row SDPA defines "
             "(fa4_varlen_all_rows where padded query rows see keys, i.e. right padding).", "",
             "| problem | " + " | ".join(names) + " | plugin / best |", "|---" * (len(names) + 2) + "|"]
    for r in result["rows"]:
        cells = [f"{r['ms'][n]:.3f}" if r["ms"].get(n) else "" for n in names]
        lines.append(f"| {r['problem']} | " + " | ".join(cells) + f" | {r['plugin_vs_best_peer']:.2f}x |")
    notes = [f"{r['problem']}: HF's packed path with the plugin (hf_packed) {r['hf_packed_vs_fa4_varlen']:.3f}x FA4 "
             f"varlen direct, {r['hf_packed_vs_plugin_documents']:.3f}x the plugin's document-mask route"
             for r in result["rows"] if "hf_packed_vs_fa4_varlen" in r]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> None:
    """Run the problems named on the command line (default: all)."""
    problem_runner.main(__doc__.splitlines()[0], ["right", "left", "documents", "causal"], "padded", run, markdown)


if __name__ == "__main__":
    main()
