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

``..._with_fixup`` variants price an exact route built on it: varlen is exact only for rows whose visible keys
are one run, so such a route must also run a block-sparse FA4 call (the plugin's) for the other rows, with
empty lists for the rows varlen serves, before the varlen call overwrites those rows. Here every row is
varlen's, so the block-sparse call has only its fixed costs (forward writes, backward preprocess, empty main
kernel, dQ postprocess), which is what is measured (results: ``probe_varlen_fixup_h200.md``).
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

DOCUMENT_ROOM = (4 * B, 64 * B)  # sequences the documents' cu_seqlens make room for: tight, loose
# (room for B * S sequences, the only bound that holds for any input, took 10.2 ms: probe_zero_copy_varlen_h200.md)


def _in_place_varlen(cu_q, cu_k, used_q, used_k):
    from flash_attn.cute import flash_attn_varlen_func

    def fn(q, k, v):
        flat = [t.reshape(B * S, H, D) for t in (q, k, v)]
        out = flash_attn_varlen_func(*flat, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=S, max_seqlen_k=S,
                                     seqused_q=used_q, seqused_k=used_k, causal=True)
        return bench_padded.fa4_output(out).view(B, S, H, D)

    return fn


def _with_fixup(cu_q, cu_k, used_q, used_k, empty_masking: tuple[dict, dict]):
    """The in-place varlen call preceded, forward and backward, by a block-sparse FA4 call whose lists are all
    empty (``empty_masking``: its forward and backward FA4 masking keywords)."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    from fa4_inductor.runtime import fa4_binding

    scale = D ** -0.5
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=used_q, seqused_k=used_k, max_seqlen_q=S,
                  max_seqlen_k=S, causal=True, softmax_scale=scale)

    class Fixup(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = torch.empty_like(q)
            lse = torch.empty((B, H, S), device=q.device, dtype=torch.float32)
            fa4_binding.flash_forward(q, k, v, out, lse, softmax_scale=scale, softcap=0.0, seqused_k=None,
                                  masking=empty_masking[0])
            flat = [t.view(B * S, H, D) for t in (q, k, v, out)]
            lse_varlen = _flash_attn_fwd(*flat[:3], out=flat[3], return_lse=True, **varlen)[1]
            ctx.save_for_backward(q, k, v, out, lse, lse_varlen)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse, lse_varlen = ctx.saved_tensors
            dout = dout.contiguous()
            dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
            fa4_binding.flash_backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale=scale, softcap=0.0,
                                   seqused_k=None, deterministic=False, masking=empty_masking[1])
            flat = [t.view(B * S, H, D) for t in (q, k, v, out, dout, dq, dk, dv)]
            _flash_attn_bwd(*flat[:5], lse_varlen, dq=flat[5], dk=flat[6], dv=flat[7], **varlen)
            return dq, dk, dv

    return Fixup.apply


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
    # the plugin's masking for a causal call whose key padding hides every key: every list empty
    empty = bench_padded.plugin_masking(*bshd, torch.zeros((B, S), dtype=torch.bool, device="cuda"))
    if problem == "left":
        sequences = _left_sequences(extra)
        variants["in_place_varlen"] = _in_place_varlen(*sequences)
        variants["in_place_varlen_with_fixup"] = _with_fixup(*sequences, empty)
    else:
        for capacity in DOCUMENT_ROOM:
            sequences = _document_sequences(extra, capacity)
            variants[f"in_place_varlen_cap{capacity}"] = _in_place_varlen(*sequences)
            variants[f"in_place_varlen_cap{capacity}_with_fixup"] = _with_fixup(*sequences, empty)
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
    row["kernel_ms"] = {name: problem_runner.kernel_ms(step) for name, step in steps.items()
                        if name == "plugin" or name.endswith("with_fixup") or name == "fa4_varlen_packed"}
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
