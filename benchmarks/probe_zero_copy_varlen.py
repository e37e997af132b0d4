"""Probe: FA4 varlen run in place over a padded (B, S, H, D) batch, for left padding and packed documents.

The question: can a padded batch get FA4 varlen's speed with no copy and no host sync, its sequences located
by ``cu_seqlens``/``seqused`` computed on the device from the mask? Rows are views of the padded buffer:

- ``left``: query rows are the whole row (``cu_seqlens_q[b] = b*S``, ``seqused_q = S``), keys the visible
  suffix (``cu_seqlens_k[b] = b*S + first_visible``, ``seqused_k = S - first_visible``); FA4's causal mask
  aligns the ends (bottom right), so query i sees keys first_visible..i and padded rows see none;
- ``documents``: one sequence per document run, ``cu_seqlens`` over the flattened batch, padded to a fixed
  capacity with empty sequences (the number of documents is data).

Each is timed (forward + backward) side by side with the plugin's compiled step and FA4 varlen on packed tokens
(``bench_padded``'s problems), and checked against the plugin at every position.
Usage: python benchmarks/probe_zero_copy_varlen.py --out OUT_DIR
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
from bench_padded import B, D, H, S

DOCUMENT_ROOM = (4 * B, 64 * B, B * S)  # sequences the documents' cu_seqlens make room for: tight, loose, any input


def _in_place_varlen(cu_q, cu_k, used_q, used_k):
    from flash_attn.cute import flash_attn_varlen_func

    def fn(q, k, v):
        flat = [t.reshape(B * S, H, D) for t in (q, k, v)]
        out = flash_attn_varlen_func(*flat, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=S, max_seqlen_k=S,
                                     seqused_q=used_q, seqused_k=used_k, causal=True)
        return bench_padded.fa4_output(out).view(B, S, H, D)

    return fn


def _left_sequences(pad: torch.Tensor):
    """cu_seqlens / seqused of the left-padded rows, computed on the device from the (B, S) key padding."""
    rows = torch.arange(B, device="cuda", dtype=torch.int32) * S
    visible = pad.sum(1, dtype=torch.int32)
    cu_q = F.pad(rows + S, (1, 0))
    cu_k = F.pad(rows + S - visible, (0, 1), value=B * S)
    used_q = torch.full((B,), S, dtype=torch.int32, device="cuda")
    return cu_q, cu_k, used_q, visible


def _document_sequences(seg: torch.Tensor, capacity: int):
    """cu_seqlens of every document run of the flattened (B, S) segment ids, padded with empty sequences to
    ``capacity`` sequences, on the device."""
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    flat = starts.flatten()
    positions = torch.nonzero(flat, as_tuple=False).flatten()  # a sync in this probe only: the route would scan
    cu = torch.full((capacity + 1,), B * S, dtype=torch.int32, device="cuda")
    cu[: positions.numel()] = positions.to(torch.int32)
    return cu, cu, None, None


def _compare(name: str, plugin_step_out, probe_out, grads_plugin, grads_probe) -> dict:
    diff = {"out": (plugin_step_out.float() - probe_out.float()).abs().max().item()}
    for label, a, b in zip("qkv", grads_plugin, grads_probe):
        diff[f"d{label}"] = (a.float() - b.float()).abs().max().item()
        diff[f"d{label}_nan"] = bool(torch.isnan(b).any())
    print(name, diff, flush=True)
    return diff


def run(problem: str) -> dict:
    torch.manual_seed(0)
    q, k, v = bench_padded._leaves(B, H, S, D)
    extra = bench_padded._segments() if problem == "documents" else bench_padded._padding(problem)
    function = bench_padded._sdpa_documents if problem == "documents" else bench_padded._sdpa_padded
    bshd = [t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v)]
    steps, row = {}, {"problem": problem, "diff": {}}
    with fa4_inductor.enabled(compile=True, eager=False):
        plugin = torch.compile(lambda *a: function(*a), fullgraph=True)
        out = plugin(q, k, v, extra)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        steps["plugin"] = problem_runner.warm(problem_runner.fwd_bwd(plugin, (q, k, v), extra))
    variants = {}
    if problem == "left":
        variants["in_place_varlen"] = _in_place_varlen(*_left_sequences(extra))
    else:
        for capacity in DOCUMENT_ROOM:
            variants[f"in_place_varlen_cap{capacity}"] = _in_place_varlen(*_document_sequences(extra, capacity))
    for name, fn in variants.items():
        try:
            probe_out = fn(*bshd)
            probe_grads = torch.autograd.grad(probe_out, bshd, grad.transpose(1, 2))
            row["diff"][name] = _compare(name, out.transpose(1, 2), probe_out,
                                         [g.transpose(1, 2) for g in grads], probe_grads)
            steps[name] = problem_runner.warm(problem_runner.fwd_bwd(fn, bshd))
        except Exception as exc:
            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            print(name, row[f"{name}_error"], flush=True)
    varlen, row["varlen_tokens"] = bench_padded._varlen_step(problem, extra)
    steps["fa4_varlen_packed"] = problem_runner.warm(varlen)
    row["ms"] = problem_runner.interleaved_medians(steps)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--problems", nargs="+", default=["left", "documents"])
    args = parser.parse_args()
    rows = [run(p) for p in args.problems]
    pathlib.Path(args.out, "probe_zero_copy_varlen.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
