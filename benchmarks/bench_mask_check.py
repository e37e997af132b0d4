"""What reading a mask given as data costs (``fa4_inductor.runtime.mask_verdict``): the verdict on a fresh tensor
(every element read, one host sync) and a remembered one, beside the attention call it guards on a GPU.

CPU: ``python benchmarks/bench_mask_check.py --out benchmarks/results``; on a GPU the same, with the FA4 call timed
too (``triton.testing.do_bench``, medians). Writes ``mask_check_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from fa4_inductor.runtime import fa4_version, mask_verdict


def _median_ms(fn, repeat: int = 20) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _mask(batch: int, seqlen: int, device) -> torch.Tensor:
    i, j = torch.arange(seqlen, device=device)[:, None], torch.arange(seqlen, device=device)[None, :]
    padding = torch.ones(batch, 1, 1, seqlen, dtype=torch.bool, device=device)
    padding[-1, ..., : seqlen // 4] = False
    return (j <= i) & padding


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for batch, seqlen in ((2, 1024), (2, 4096), (1, 16384)):
        mask = _mask(batch, seqlen, device)
        fresh = _median_ms(lambda: mask_verdict.verdict(mask, False, batch, seqlen, seqlen))
        cache = mask_verdict.VerdictCache()
        cache.verdict(mask, False, batch, seqlen, seqlen)
        remembered = _median_ms(lambda: cache.verdict(mask, False, batch, seqlen, seqlen))
        row = dict(batch=batch, seqlen=seqlen, fresh_ms=fresh, remembered_ms=remembered)
        if device == "cuda":
            q = torch.randn(batch, seqlen, 16, 128, device=device, dtype=torch.bfloat16)
            row["fa4_forward_ms"] = _median_ms(lambda: torch.ops.fa4.flash_attn_fwd_kernel(
                q, q, q, 128 ** -0.5, True, -1, -1, 0.0, None, mask[:, 0, -1].contiguous(), None))
        rows.append(row)
        print(row)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = {"device": name, "torch": torch.__version__, "flash-attn-4": fa4_version.version()}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"mask_check_{device}.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
    lines = [f"# Reading a mask given as data ({name}, torch {header['torch']}, flash-attn-4 "
             f"{header['flash-attn-4']})", "", "causal + key padding, bool (B, 1, S, S); ms, medians", "",
             "| B | S | verdict, fresh tensor | verdict, remembered | FA4 forward (H=16, D=128) |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['seqlen']} | {r['fresh_ms']:.3f} | {r['remembered_ms']:.4f} | "
              f"{r.get('fa4_forward_ms', float('nan')):.3f} |" for r in rows]
    (out / f"mask_check_{device}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import fa4_inductor  # noqa: F401  (registers torch.ops.fa4)

    main()
