"""The compute capability of a CUDA device, in one place for the support rules and the launch plans."""

from __future__ import annotations

import torch


def major(index: int | None) -> int:
    """Compute-capability major version of a CUDA device (9 for H100/H200, 10 for B200)."""
    return torch.cuda.get_device_capability(index)[0]
