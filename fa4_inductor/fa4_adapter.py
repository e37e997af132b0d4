"""The one module that talks to FlashAttention-4 (``flash_attn.cute``).

FA4's Python API drifts between releases (``_flash_attn_fwd`` returns five
values in 4.0.0b36, two in earlier betas), so every contact with it lives
here: importing it, reading what the installed version supports, and calling
its forward and backward entry points. Everything else in the package calls
:func:`forward` / :func:`backward` with plain arguments.

The tested version is :data:`TESTED_FA4_VERSION`; other versions are used
if their entry points have the parameters we pass, else they are reported
as unusable with the reason.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
from types import ModuleType

import torch

log = logging.getLogger(__name__)

TESTED_FA4_VERSION = "4.0.0b36"
_FA4_MODULE = "flash_attn.cute.interface"

# Parameters of FA4's private entry points that this adapter passes.
_FWD_PARAMS = (
    "softmax_scale", "causal", "softcap", "window_size_left", "window_size_right",
    "seqused_k", "return_lse",
)
_BWD_PARAMS = (
    "softmax_scale", "causal", "softcap", "window_size_left", "window_size_right",
    "seqused_k", "deterministic", "dq", "dk", "dv",
)

# Architectures (major version) on which FA4 runs forward and backward.
SUPPORTED_ARCH_MAJORS = (9, 10, 11)


class FA4Unavailable(RuntimeError):
    """FA4 is not installed or its API does not match what the adapter needs."""


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    """Import FA4 once; return (module, None) or (None, reason)."""
    try:
        module = importlib.import_module(_FA4_MODULE)
    except Exception as exc:  # ImportError, or a CUDA/DSL init error of a broken install
        return None, f"flash-attn-4 is not importable ({type(exc).__name__}: {exc})"
    for name, params in (("_flash_attn_fwd", _FWD_PARAMS), ("_flash_attn_bwd", _BWD_PARAMS)):
        fn = getattr(module, name, None)
        if fn is None:
            return None, f"flash-attn-4 {version()} has no {name}"
        missing = [p for p in params if p not in inspect.signature(fn).parameters]
        if missing:
            return None, f"flash-attn-4 {version()}: {name} lacks parameters {missing}"
    if version() != TESTED_FA4_VERSION:
        log.warning(
            "flash-attn-4 %s is installed; fa4_inductor is tested with %s",
            version(), TESTED_FA4_VERSION,
        )
    return module, None


def version() -> str | None:
    """Installed flash-attn-4 version, or None."""
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


def unavailable_reason() -> str | None:
    """Why FA4 can't be used in this process, or None when it can."""
    return _load()[1]


def _module() -> ModuleType:
    module, reason = _load()
    if module is None:
        raise FA4Unavailable(reason)
    return module


def head_dim_reason(arch_major: int, head_dim: int, head_dim_v: int, element_size: int) -> str | None:
    """Why FA4 lacks a kernel for these head dims on this arch, or None.

    Mirrors ``flash_attn.cute.interface._validate_head_dims`` of the tested
    version, as a reason string instead of an assert.
    """
    alignment = 16 // element_size
    if head_dim % alignment or head_dim_v % alignment:
        return f"head dims ({head_dim}, {head_dim_v}) must be multiples of {alignment}"
    if arch_major == 9:
        if not (8 <= head_dim <= 256 and 8 <= head_dim_v <= 256):
            return f"head dims ({head_dim}, {head_dim_v}) outside 8..256 (sm90)"
        return None
    if arch_major in (10, 11):
        ok = (
            (8 <= head_dim <= 128 and 8 <= head_dim_v <= 128)
            or (head_dim, head_dim_v) in ((192, 128), (256, 256))
        )
        return None if ok else (
            f"head dims ({head_dim}, {head_dim_v}) unsupported on sm{arch_major}0 "
            "(8..128, (192, 128) or (256, 256))"
        )
    return f"FA4 is not used on sm{arch_major}x"


def _window(value: int) -> int | None:
    """Our ops use -1 for 'no limit' like aten; FA4 uses None."""
    return None if value < 0 else value


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    seqused_k: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 forward on B,S,H,D tensors; returns (out B,S,H,Dv, lse fp32 B,H,S).

    ``out``, if given, is an aligned B,S,H,Dv buffer FA4 writes into.
    """
    result = _module()._flash_attn_fwd(
        q, k, v,
        softmax_scale=softmax_scale,
        causal=causal,
        softcap=softcap or None,
        window_size_left=_window(window_left),
        window_size_right=_window(window_right),
        seqused_k=seqused_k,
        return_lse=True,
        out=out,
    )
    # 4.0.0b36 returns (out, lse, p, row_max, o_lo); earlier betas (out, lse).
    out, lse = result[0], result[1]
    if lse is None:
        raise FA4Unavailable(f"flash-attn-4 {version()} returned no logsumexp with return_lse=True")
    return out, lse


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    seqused_k: torch.Tensor | None,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """FA4 backward, writing into the given contiguous dq, dk, dv."""
    _module()._flash_attn_bwd(
        q, k, v, out, dout, lse,
        softmax_scale=softmax_scale,
        causal=causal,
        softcap=softcap,
        window_size_left=_window(window_left),
        window_size_right=_window(window_right),
        seqused_k=seqused_k,
        deterministic=torch.are_deterministic_algorithms_enabled(),
        dq=dq, dk=dk, dv=dv,
    )
