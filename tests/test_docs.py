"""The documents' links and the paths they name exist (README, docs/, benchmarks/README.md)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A markdown link's target, or a path in backticks (a folder/file name with an extension or a trailing slash).
_LINK = re.compile(r"\]\(([^)#\s]+)")
_PATH = re.compile(r"`([\w.-]+(?:/[\w.-]+)+/?)(?:::\w+)?`")


def _named_paths(text: str) -> set[str]:
    paths = set(_LINK.findall(text))
    paths |= {p for p in _PATH.findall(text) if "." in p.rsplit("/", 1)[-1] or p.endswith("/")}
    return {p for p in paths if not p.startswith(("http", "~", "/"))}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_named_path_exists(document):
    missing = [p for p in sorted(_named_paths(document.read_text()))
               if not any((base / p.rstrip("/")).exists() for base in (ROOT, document.parent, ROOT / "fa4_inductor"))]
    assert not missing, missing
