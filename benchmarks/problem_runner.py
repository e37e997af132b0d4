"""The command line shared by the per-problem GPU benchmarks: run each problem, save JSON and markdown as it goes."""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable

import torch

from fa4_inductor import fa4_api


def main(description: str, problems: list[str], tag: str, run: Callable[[str], dict],
         markdown: Callable[[dict], str]) -> None:
    """Parse --out/--problems/--tag, run every problem, and rewrite ``<tag>.json``/``.md`` after each (a run cut
    short keeps what it measured)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--problems", nargs="+", default=problems)
    parser.add_argument("--tag", default=tag)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "fa4": fa4_api.version(),
              "rows": []}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for problem in args.problems:
        result["rows"].append(run(problem))
        (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
        (out / f"{args.tag}.md").write_text(markdown(result))
    print(markdown(result))
