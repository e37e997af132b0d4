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
