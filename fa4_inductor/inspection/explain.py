"""``explain(model, *args)``: what became of every attention site, and why.

The model runs once under ``torch.compile`` with a capturing backend: each
Dynamo graph is rewritten as the plugin would rewrite it, the records are
collected, and the graph that runs is the original one (stock kernels, no
Inductor compile), so explaining is quick and launches no FA4 kernel.
``arch="sm90"`` judges every site as if it ran on that GPU, also on a
machine without one; ``arch=None`` judges the tensors' real devices with
the routing of ``devices``. A softmax over matrix-product scores that no
pattern decided is reported too (the compile pass records it).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from fa4_inductor.compile import drawn_branches, library_calls

from fa4_inductor.runtime import plan_trust

from fa4_inductor.runtime import fa4_version

from fa4_inductor.compile import graph_dump

from fa4_inductor import stats
from fa4_inductor.compile.sites import RewriteContext
from fa4_inductor.compile.rewrite import rewrite_graph
from fa4_inductor.stats import SiteRecord

def _arch_major(arch: str | None) -> int | None:
    if arch is None:
        return None
    digits = arch.lower().removeprefix("sm_").removeprefix("sm").rstrip("af")
    if not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"arch {arch!r}: expected a form like 'sm90' or 'sm100'")
    return int(digits[:-1])


@dataclasses.dataclass
class Report:
    """Per-site records of one explained model, printable and JSON-convertible."""

    arch: str | None
    records: list[SiteRecord]
    graphs: list[graph_dump.GraphDump] = dataclasses.field(default_factory=list)
    # How FA4 calls run in this process (launch plans off for an untested FA4, plans that failed their check).
    notes: list[str] = dataclasses.field(default_factory=list)
    # The rewritten graph modules (for SVG rendering); not part of the JSON.
    graph_modules: list[torch.fx.GraphModule] = dataclasses.field(default_factory=list, repr=False, compare=False)

    @property
    def fa4_sites(self) -> list[SiteRecord]:
        """Records of sites that run (or would run) FA4."""
        return [r for r in self.records if r.decision == "fa4"]

    def to_json(self) -> str:
        """The report as JSON (graphs included)."""
        return json.dumps({
            "arch": self.arch,
            "records": [r.to_dict() for r in self.records],
            "graphs": [dataclasses.asdict(g) for g in self.graphs],
            "notes": self.notes,
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """Rebuild a report written by :meth:`to_json`."""
        data = json.loads(text)
        return cls(data["arch"], [SiteRecord(**r) for r in data["records"]],
                   [graph_dump.GraphDump(**g) for g in data["graphs"]], data.get("notes", []))

    def __str__(self) -> str:
        where = f"on {self.arch}" if self.arch else "on the tensors' devices"
        lines = [f"fa4_inductor: {len(self.fa4_sites)} of {len(self.records)} attention sites run FA4 {where}"]
        lines += [f"note: {note}" for note in self.notes]
        for i, r in enumerate(self.records, 1):
            lines.append(f"[{i}] {r.decision.upper():8} {r.location or '?'}  {r.module_path or ''}".rstrip())
            lines.append(f"    pattern: {r.pattern or 'none'}   node: {r.node} ({r.target})")
            if r.reason:
                lines.append(f"    reason: {r.reason}")
            shown = {k: v for k, v in r.features.items() if v not in (None, False)}
            if shown:
                lines.append("    " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        return "\n".join(lines)


def runtime_notes() -> list[str]:
    """What a report should say about how FA4 calls run in this process: launch plans off, and why; launch plans
    whose first replay disagreed with FA4 (those calls run FA4's entry point)."""
    notes = []
    if fa4_version.version() is not None and plan_trust.off_reason() is not None:
        notes.append(plan_trust.off_reason())
    failed = stats.counters["plans.check_failed"]
    if failed:
        notes.append(f"{failed} launch plan(s) disagreed with FA4's own call on their first replay and are not used "
                     f"(of {stats.counters['plans.checked']} checked): a sign the installed flash-attn-4 "
                     f"{fa4_version.version()} changed inside")
    return notes


def explain(model_or_fn, *args, arch: str | None = "sm90", devices=("cuda", "cpu"), **kwargs) -> Report:
    """Run ``model_or_fn(*args, **kwargs)`` once and report every attention site."""
    report = Report(arch, [], notes=runtime_notes())
    arch_major = _arch_major(arch)

    def capture(gm: torch.fx.GraphModule, example_inputs):
        original_forward = gm.forward
        before = graph_dump.graph_code(gm.graph)
        context = RewriteContext(devices=tuple(devices), arch_major=arch_major, assume_cuda=arch is not None,
                                 graph_name="explain", publish=False)
        records = rewrite_graph(gm.graph, context)
        gm.recompile()
        report.records.extend(records)
        report.graphs.append(graph_dump.GraphDump(context.graph_name, before, graph_dump.graph_code(gm.graph)))
        report.graph_modules.append(gm)
        return original_forward

    compiled: Any = torch.compile(model_or_fn, backend=capture)
    drawn_branches.see_through()
    library_calls.activate()
    try:
        with library_calls.reporting_left_calls_to(report.records.append):
            compiled(*args, **kwargs)
    finally:
        drawn_branches.stop_seeing_through()
        library_calls.deactivate()
    return report
