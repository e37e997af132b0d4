"""Which flash-attn-4 is installed, and which releases are tested; imports nothing from the package."""

from __future__ import annotations

import importlib.metadata

# Every GPU test passes on an H200 with these; pyproject.toml's range admits exactly these releases.
TESTED_FA4_VERSIONS = ("4.0.0b36", "4.0.0b40")


def version() -> str | None:
    """Installed flash-attn-4 version, or None."""
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None
