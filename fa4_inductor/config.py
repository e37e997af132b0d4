"""Every environment variable the plugin reads, in one place; each is read when it is needed, not at import, so a
process (or a test) may set one later. The README's configuration table lists the same variables."""

from __future__ import annotations

import dataclasses
import os
import pathlib


@dataclasses.dataclass(frozen=True)
class Variable:
    """One environment variable: its name, its value when unset, and what it does."""

    name: str
    default: str
    meaning: str

    def value(self) -> str:
        """The variable's value now (its default when unset or empty)."""
        return os.environ.get(self.name) or self.default

    def on(self) -> bool:
        """A switch: anything but "0" is on."""
        return self.value() != "0"


LAUNCH_PLANS = Variable("FA4_INDUCTOR_LAUNCH_PLANS", "1",
                        "0: FA4's own entry points serve every call (no launch plans, no native launcher)")
TRUST_UNTESTED_FA4 = Variable("FA4_INDUCTOR_TRUST_UNTESTED_FA4", "0",
                              "1: launch plans also with a flash-attn-4 release that is not a tested one")
NATIVE = Variable("FA4_INDUCTOR_NATIVE", "1", "0: the Python kernels serve CUDA calls instead of the C++ launcher")
PRECOMPILE = Variable("FA4_INDUCTOR_PRECOMPILE", "1",
                      "0: FA4 kernels compile at their first call, not while the graph compiles")
BLOCK_SPARSITY = Variable("FA4_INDUCTOR_BLOCK_SPARSITY", "1",
                          "0: calls masked by data run the mask_mod on every tile, with no block lists")
CXX = Variable("CXX", "c++", "the C++ compiler that builds the native launcher (once, cached)")
CACHE_HOME = Variable("XDG_CACHE_HOME", str(pathlib.Path.home() / ".cache"),
                      "where the native launcher and FA4's kernel cache are kept (under fa4_inductor/)")
TORCH_TRACE = Variable("TORCH_TRACE", "", "set: graph dumps go to PyTorch's structured trace too")
FA4_DISK_CACHE = Variable("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "",
                          "FA4's own: 1 keeps its compiled kernels on disk (the plugin sets 1 unless set)")
FA4_DISK_CACHE_DIR = Variable("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "",
                              "FA4's own: where that cache lives (the plugin sets it under XDG_CACHE_HOME unless set)")

VARIABLES = (LAUNCH_PLANS, TRUST_UNTESTED_FA4, NATIVE, PRECOMPILE, BLOCK_SPARSITY, CXX, CACHE_HOME, TORCH_TRACE,
             FA4_DISK_CACHE, FA4_DISK_CACHE_DIR)


def cache_dir(*parts: str) -> pathlib.Path:
    """The plugin's cache folder under ``XDG_CACHE_HOME`` (default ``~/.cache``)."""
    return pathlib.Path(CACHE_HOME.value(), "fa4_inductor", *parts)
