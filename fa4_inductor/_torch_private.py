"""Every use of PyTorch internals that have no public equivalent, in one place.

Each function says which internal it touches and why no public hook does
the job; when PyTorch grows a public one, only this module changes.
"""

from __future__ import annotations

import torch


def destroy_library(library: torch.library.Library) -> None:
    """Unregister every kernel a ``torch.library.Library`` registered.

    ``Library._destroy`` is what its finalizer runs; the public API offers no
    way to undo ``Library.impl`` deterministically (dropping the last
    reference defers it to the garbage collector).
    """
    library._destroy()


def trace_artifact(name: str, payload_fn) -> None:
    """Emit a string artifact into ``TORCH_TRACE`` output (read by tlparse).

    ``torch._logging.trace_structured`` is the only way into the structured
    trace; it does nothing (and calls nothing) when tracing is off.
    """
    from torch._logging import trace_structured

    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": name, "encoding": "string"},
        payload_fn=payload_fn,
    )
