"""What checking a launch plan costs: the first, second (checked) and later calls of one signature, on one GPU.

A plan serves no call before its first replay matched FA4's own call (``fa4_inductor.runtime.plan_trust``): the second
call of a signature replays the plan, runs FA4's entry point beside it and compares (one host sync). This times,
per signature, the learning call, the checked call and the median later call (host wall time around each call,
synchronized), forward and backward, and FA4's own entry point alone for scale. New signatures each time: the
cost is once per signature, never again.
Usage: python benchmarks/probe_plan_check.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from fa4_inductor.runtime import fa4_call

from fa4_inductor.runtime import fa4_version

from fa4_inductor import stats

PARAMS = dict(causal=True, window_left=-1, window_right=-1, softcap=0.0, seqused_k=None)


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def row(batch: int, seqlen: int, heads: int = 16, heads_kv: int = 16, head_dim: int = 128) -> dict:
    q = torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, seqlen, heads_kv, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    params = dict(softmax_scale=head_dim ** -0.5, **PARAMS)
    out, lse = torch.empty_like(q), torch.empty(batch, heads, seqlen, device="cuda")
    fa4_call._fa4_forward(q, k, v, out, lse, **params)  # compiles the kernel: not part of any timing
    dout = torch.randn_like(out)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    fa4_call._fa4_backward(dout, q, k, v, out, lse, *grads, **params, deterministic=False)
    result = {"shape": f"B{batch} H{heads}/{heads_kv} S{seqlen} D{head_dim}"}
    calls = {
        "forward": lambda: fa4_call.forward(q, k, v, **params),
        "backward": lambda: fa4_call.backward(dout, q, k, v, out, lse, **params, dq=grads[0], dk=grads[1],
                                                 dv=grads[2]),
    }
    own = {
        "forward": lambda: fa4_call._fa4_forward(q, k, v, torch.empty_like(out), torch.empty_like(lse), **params),
        "backward": lambda: fa4_call._fa4_backward(dout, q, k, v, out, lse, *grads, **params,
                                                      deterministic=False),
    }
    for name, call in calls.items():
        checked = stats.counters["plans.checked"]
        learn, check = _timed(call), _timed(call)
        later = statistics.median(_timed(call) for _ in range(20))
        fa4 = statistics.median(_timed(own[name]) for _ in range(20))
        result[name] = {"learning_call_ms": learn, "checked_call_ms": check, "later_call_ms": later,
                        "fa4_entry_point_ms": fa4, "check_cost_ms": check - later,
                        "checked": stats.counters["plans.checked"] - checked}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="plan_check_h200")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "fa4": fa4_version.version(),
              "rows": [row(16, 1024), row(4, 4096), row(1, 16384), row(8, 128)]}
    result["failed_checks"] = stats.counters["plans.check_failed"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# What a launch-plan check costs ({result['device']})", "",
             f"**flash-attn-4 {result['fa4']}**, torch {result['torch']}; bf16 causal; host wall ms around one "
             "synchronized call: the learning call, the checked second call, the median of 20 later calls, and "
             f"FA4's entry point alone. Failed checks: {result['failed_checks']}. The process's first check (first "
             "row) costs tens of ms (not broken down; the first use of the comparison's kernels is the likely part); "
             "later ones cost about one more FA4 call and a host sync.", "",
             "| shape | call | learning | checked | later | FA4 entry point | check cost |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for name in ("forward", "backward"):
            t = r[name]
            lines.append(f"| {r['shape']} | {name} | {t['learning_call_ms']:.3f} | {t['checked_call_ms']:.3f} | "
                         f"{t['later_call_ms']:.3f} | {t['fa4_entry_point_ms']:.3f} | {t['check_cost_ms']:.3f} |")
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
