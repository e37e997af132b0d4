"""What the per-problem GPU benchmarks share: their command line (run each problem, save JSON and markdown as it
goes) and their timing (variants taking turns)."""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import types
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters


from fa4_inductor.runtime import fa4_version

ROUNDS = 5


def interleaved_medians(steps: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """The median ms of each warm step over ``rounds`` rounds of ``triton.testing.do_bench``, the steps taking
    turns within each round, so drift of clocks or host load hits every variant alike. RuntimeError if a step
    compiled anything while timed (it would time a compile, and a plugin step would lose its rewrite)."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    graphs = counters["stats"]["unique_graphs"]
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(do_bench(step, warmup=25, rep=100))
    if counters["stats"]["unique_graphs"] != graphs:
        raise RuntimeError("a step compiled while it was being timed")
    return {name: statistics.median(times) for name, times in samples.items()}


def fwd_bwd(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], *extra) -> Callable[[], object]:
    """A forward + backward step of ``fn(*inputs, *extra)``: the gradients of ``inputs`` by ``torch.autograd.grad``
    (no accumulation timed), fed a contiguous gradient, as a loss on the output gives, for every variant alike.
    (``ones_like`` would copy the strides of outputs that are transposed views, which AOTAutograd then copies to
    its traced layout.) Its halves are attributes: ``step.forward()`` returns the output, ``step.backward(out)``
    its gradients."""
    out = fn(*inputs, *extra)
    grad = torch.ones(out.shape, dtype=out.dtype, device=out.device)

    def step():
        return torch.autograd.grad(fn(*inputs, *extra), inputs, grad)

    step.forward = lambda: fn(*inputs, *extra)
    step.backward = lambda out: torch.autograd.grad(out, inputs, grad)
    return step


def kernel_launches(step: Callable[[], object]) -> list[tuple[str, float]]:
    """(kernel name, GPU ms) of every kernel one call of a warm ``step`` launches, in order, from the profiler."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return [(event.name, event.device_time / 1000) for event in prof.events()
            if event.device_type == torch.autograd.DeviceType.CUDA]


def ms_by_name(launches: list[tuple[str, float]], name_length: int = 90) -> dict[str, float]:
    """GPU ms of ``launches`` summed by kernel name (its first ``name_length`` characters), largest first."""
    ms: dict[str, float] = {}
    for name, time in launches:
        ms[name[:name_length]] = ms.get(name[:name_length], 0.0) + time
    return dict(sorted(ms.items(), key=lambda item: -item[1]))


def kernel_ms(step: Callable[[], object]) -> dict[str, float]:
    """GPU ms by kernel name of one call of a warm ``step``, largest first: where a variant's time goes, and
    proof of which kernels ran."""
    return ms_by_name(kernel_launches(step))


def warm(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` after one call (which compiles what it runs, the backward included): ready to be timed."""
    step()
    return step


def with_own_code(function: types.FunctionType, tag: str) -> types.FunctionType:
    """``function`` with a code object of its own. Dynamo keeps compiled code per code object: variants made from
    one closure would share it, and where their guards match (the plugin's and stock's) run each other's."""
    code = function.__code__.replace(co_name=f"{function.__name__}_{tag}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


def time_and_compare(row: dict, steps: dict[str, Callable[[], object]], outputs: dict[str, torch.Tensor],
                     reference: str, peers: tuple[str, ...]) -> None:
    """Fill ``row``: each warm step's median ms (taking turns) and GPU ms by kernel, each output's largest difference
    from ``reference``'s, and the plugin's speedup over each of ``peers``."""
    row["ms"] = interleaved_medians(steps)
    row["kernel_ms"] = {name: kernel_ms(step) for name, step in steps.items()}
    if reference in outputs:
        row[f"max_abs_diff_vs_{reference}"] = {
            name: (out.float() - outputs[reference].float()).abs().max().item() for name, out in outputs.items()}
    for peer in peers:
        if row["ms"].get(peer) and row["ms"].get("plugin"):
            row[f"speedup_vs_{peer}"] = row["ms"][peer] / row["ms"]["plugin"]


def markdown_table(result: dict, title: str, preamble: str, names: tuple[str, ...], peers: dict[str, str],
                   columns: tuple[str, ...] = ("shape",)) -> str:
    """A result's markdown: ``title`` with the device, ``preamble``, a row per problem (its ``columns``, each
    variant's ms in ``names``, then the speedup over each peer in ``peers``, a column heading by ``speedup_vs_<peer>``
    key) and the variants' errors."""
    headings = ("problem", *columns, *names, *peers.values())
    lines = [f"# {title} ({result['device']})", "", preamble, "", "| " + " | ".join(headings) + " |",
             "|" + "---|" * len(headings)]
    for r in result["rows"]:
        cells = [f"{r['ms'][n]:.3f}" if r["ms"].get(n) else "error" if n in r["errors"] else "" for n in names]
        speedups = [f"{r[f'speedup_vs_{peer}']:.2f}x" if f"speedup_vs_{peer}" in r else "" for peer in peers]
        lines.append("| " + " | ".join([r["problem"], *(r[c] for c in columns), *cells, *speedups]) + " |")
    notes = [f"- {r['problem']} {variant}: {error}" for r in result["rows"] for variant, error in r["errors"].items()]
    return "\n".join(lines + (["", "Errors:"] + notes if notes else [])) + "\n"


def main(description: str, problems: list[str], tag: str, run: Callable[[str], dict],
         markdown: Callable[[dict], str]) -> None:
    """Parse --out/--problems/--tag, run every problem, and rewrite ``<tag>.json``/``.md`` after each (a run cut
    short keeps what it measured)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--problems", nargs="+", default=problems)
    parser.add_argument("--tag", default=tag)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "fa4": fa4_version.version(),
              "rows": []}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for problem in args.problems:
        result["rows"].append(run(problem))
        (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
        (out / f"{args.tag}.md").write_text(markdown(result))
    print(markdown(result))
