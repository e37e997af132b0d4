"""The differential fuzz on a GPU: random attention programs compiled with the plugin (Inductor, real FA4 kernels)
against eager PyTorch, larger and longer than the CPU test (``tests/compile/test_fuzz.py``, same generator).

Reports the rewrite rate of the FA4-expressible programs and every wrong result; writes JSON to --out.
Usage: python benchmarks/fuzz_gpu.py --programs 400 --max-seqlen 300 [--minutes 8] --out benchmarks/results
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root, for tests.*

import fa4_inductor  # noqa: E402
from fa4_inductor import stats  # noqa: E402
from tests.compile.fuzz_programs import random_programs  # noqa: E402


def _check(program) -> tuple[bool, str | None]:
    """(ran FA4, what was wrong or None)."""
    (q, k, v), extra = program.inputs("cuda")
    fn = program.function()
    want = fn(q, k, v, *extra)
    weights = torch.randn(want.shape, device="cuda", dtype=want.dtype)
    want_grads = torch.autograd.grad((want.float() * weights).sum(), (q, k, v))
    torch._dynamo.reset()
    stats.reset()
    with fa4_inductor.enabled(eager=False):
        got = torch.compile(fn, dynamic=program.dynamic, fullgraph=True)(q, k, v, *extra)
    got_grads = torch.autograd.grad((got.float() * weights).sum(), (q, k, v))
    ran_fa4 = any(r.decision == "fa4" for r in stats.site_records())
    scale = max(g.abs().max() for g in want_grads)
    errors = [(got.float() - want.float()).abs().max().item() / max(want.abs().max().item(), 1e-6)]
    errors += [((g - w).abs().max() / scale).item() for g, w in zip(got_grads, want_grads)]
    wrong = None if all(e < 4e-2 for e in errors) and not got.isnan().any() else f"relative errors {errors}"
    return ran_fa4, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=400)
    parser.add_argument("--max-seqlen", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long (reports how many ran)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    torch._inductor.config.fx_graph_cache = False  # every program compiled afresh
    rewritten = expressible_count = 0
    wrong, misses, checked = [], collections.Counter(), 0
    sm90 = torch.cuda.get_device_capability()[0] == 9
    # Head dim 16 checks that the plugin leaves the sites FA4's sm90 backward gets wrong alone.
    for program in random_programs(args.programs, seed=args.seed, max_seqlen=args.max_seqlen,
                                   head_dims=(16, 32, 64, 128)):
        if deadline is not None and time.monotonic() > deadline:
            break
        checked += 1
        ran_fa4, problem = _check(program)
        expressible = program.expressible_on_sm90() if sm90 else program.expressible
        if problem or (ran_fa4 and not expressible):
            wrong.append({"program": str(program), "problem": problem or "rewrote an inexpressible program"})
        if expressible:
            expressible_count += 1
            rewritten += ran_fa4
            if not ran_fa4:
                misses[f"{program.spelling}/{program.band}/{program.extra}"] += 1
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "programs": checked,
              "expressible": expressible_count, "rewritten": rewritten,
              "rate": rewritten / max(expressible_count, 1),
              "wrong": wrong, "misses": dict(misses)}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "wrong"}), f"wrong: {len(wrong)}")


if __name__ == "__main__":
    main()
