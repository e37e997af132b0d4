"""Command line: ``fa4-inductor explain script.py[:callable]`` (also ``python -m fa4_inductor``).

The callable (default ``build``) takes no arguments and returns
``(model_or_fn, args)`` or ``(model_or_fn, args, kwargs)``; the model is
explained as :func:`fa4_inductor.explain` does and the report printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

from fa4_inductor.inspection.explain import explain
from fa4_inductor.compile.graph_dump import write_svg


def _load_callable(spec: str):
    path, _, name = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    if module_spec is None or module_spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(pathlib.Path(path).resolve().parent))
    module_spec.loader.exec_module(module)
    name = name or "build"
    if not hasattr(module, name):
        raise SystemExit(f"{path} defines no callable {name!r}")
    return getattr(module, name)


def _dump_graphs(report, directory: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, (dump, gm) in enumerate(zip(report.graphs, report.graph_modules)):
        (directory / f"graph{i}_before.py").write_text(dump.before)
        (directory / f"graph{i}_after.py").write_text(dump.after)
        write_svg(gm, str(directory / f"graph{i}_after.svg"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fa4-inductor`` command."""
    parser = argparse.ArgumentParser(prog="fa4-inductor", description="FlashAttention-4 for torch.compile")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("explain", help="report what becomes of every attention site of a model")
    ex.add_argument("target", help="path/to/script.py[:callable]; the callable returns (model, args[, kwargs])")
    ex.add_argument("--arch", default="sm90", help="judge sites for this GPU (sm90, sm100); 'native' for the real devices")
    ex.add_argument("--json", type=pathlib.Path, help="write the report as JSON here")
    ex.add_argument("--dump-graphs", type=pathlib.Path, help="write FX graphs before/after (and SVG if graphviz) here")
    args = parser.parse_args(argv)
    built = _load_callable(args.target)()
    model, call_args, call_kwargs = (*built, {}) if len(built) == 2 else built
    report = explain(model, *call_args, arch=None if args.arch == "native" else args.arch, **call_kwargs)
    print(report)
    if args.json:
        args.json.write_text(report.to_json())
    if args.dump_graphs:
        _dump_graphs(report, args.dump_graphs)
    return 0
