"""The one module that talks to FlashAttention-4 (``flash_attn.cute``).

FA4's Python API drifts between releases (``_flash_attn_fwd`` returns five
values in 4.0.0b36, two in earlier betas), so every contact with it lives
here: importing it, reading what the installed version supports, building
its ``mask_mod`` callables and block-sparsity tuples, and calling its
forward and backward entry points. The rest of the package calls
:func:`flash_forward` / :func:`flash_backward` with plain arguments.

The tested versions are :data:`.fa4_version.TESTED_FA4_VERSIONS`; other versions are
used if their entry points have the parameters we pass, else they are
reported as unusable with the reason, and run without launch plans
(:mod:`.plan_trust`). FA4's on-disk kernel cache is switched on
(unless the user set it) before FA4 is imported, so a second process loads
kernels instead of compiling them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

from fa4_inductor import config

from fa4_inductor.runtime import launch_plan
from fa4_inductor.runtime import fa4_version

log = logging.getLogger(__name__)

_FA4_MODULE = "flash_attn.cute.interface"

# Parameters of FA4's private entry points that this module passes.
_FWD_PARAMS = (
    "softmax_scale", "causal", "softcap", "window_size_left", "window_size_right",
    "seqused_k", "return_lse", "out", "lse", "mask_mod", "aux_tensors", "block_sparse_tensors",
    "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "num_splits", "score_mod",
)
_BWD_PARAMS = (
    "softmax_scale", "causal", "softcap", "window_size_left", "window_size_right",
    "seqused_k", "deterministic", "dq", "dk", "dv", "mask_mod", "aux_tensors", "block_sparse_tensors",
    "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "score_mod", "score_mod_bwd",
)

# Architectures (major version) on which FA4 runs forward and backward.
SUPPORTED_ARCH_MAJORS = (9, 10, 11)


class FA4Unavailable(RuntimeError):
    """FA4 is not installed or its API does not match what the plugin needs."""


_DISK_CACHE_FLAG = config.FA4_DISK_CACHE.name
_DISK_CACHE_DIR = config.FA4_DISK_CACHE_DIR.name


def _configure_disk_cache() -> None:
    """Turn on FA4's persistent kernel cache unless the user decided; FA4 reads it at import."""
    if "flash_attn.cute.cache_utils" in sys.modules:
        if config.FA4_DISK_CACHE.value() != "1":
            log.info("flash_attn.cute was imported before fa4_inductor without %s=1: "
                     "FA4 kernels are not cached on disk", _DISK_CACHE_FLAG)
        return
    os.environ.setdefault(_DISK_CACHE_FLAG, "1")
    os.environ.setdefault(_DISK_CACHE_DIR, str(config.cache_dir("cute_dsl")))


def disk_cache_dir() -> str | None:
    """Where FA4 keeps compiled kernels across processes, or None when it doesn't."""
    return (config.FA4_DISK_CACHE_DIR.value() or None) if config.FA4_DISK_CACHE.value() == "1" else None


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    """Import FA4 once; return (module, None) or (None, reason)."""
    _configure_disk_cache()
    try:
        module = importlib.import_module(_FA4_MODULE)
    except Exception as exc:  # ImportError, or a CUDA/DSL init error of a broken install
        return None, f"flash-attn-4 is not importable ({type(exc).__name__}: {exc})"
    for name, params in (("_flash_attn_fwd", _FWD_PARAMS), ("_flash_attn_bwd", _BWD_PARAMS)):
        fn = getattr(module, name, None)
        if fn is None:
            return None, f"flash-attn-4 {fa4_version.version()} has no {name}"
        missing = [p for p in params if p not in inspect.signature(fn).parameters]
        if missing:
            return None, f"flash-attn-4 {fa4_version.version()}: {name} lacks parameters {missing}"
    if fa4_version.version() not in fa4_version.TESTED_FA4_VERSIONS:
        from fa4_inductor.runtime import plan_trust

        log.warning("fa4_inductor: %s", plan_trust.off_reason() or
                    f"flash-attn-4 {fa4_version.version()} is not a tested version; launch plans are on by request")
    return module, None


def unavailable_reason() -> str | None:
    """Why FA4 can't be used in this process, or None when it can."""
    return _load()[1]


def module() -> ModuleType:
    """FA4's interface module; raises :class:`FA4Unavailable` with the reason when it can't be used."""
    loaded, reason = _load()
    if loaded is None:
        raise FA4Unavailable(reason)
    return loaded


def head_dim_reason(arch_major: int, head_dim: int, head_dim_v: int, element_size: int,
                    backward: bool = False) -> str | None:
    """Why FA4 lacks a kernel for these head dims on this arch (``backward``: one that computes the gradients
    right too), or None.

    Mirrors ``flash_attn.cute.interface._validate_head_dims`` of the tested
    version, as a reason string instead of an assert, plus the sm90 backward
    bug below.
    """
    alignment = 16 // element_size
    if head_dim % alignment or head_dim_v % alignment:
        return f"head dims ({head_dim}, {head_dim_v}) must be multiples of {alignment}"
    if arch_major == 9:
        if not (8 <= head_dim <= 256 and 8 <= head_dim_v <= 256):
            return f"head dims ({head_dim}, {head_dim_v}) outside 8..256 (sm90)"
        return sm90_backward_head_dim_reason(head_dim, head_dim_v) if backward else None
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


def sm90_backward_head_dim_reason(head_dim: int, head_dim_v: int) -> str | None:
    """Why FA4's sm90 backward would return wrong gradients for these head dims, or None.

    Measured on an H200 with the GPU fuzz (d=8 and d=16: wrong dQ, and wrong dK/dV with GQA): the kernel writes
    its fp32 accumulators in head-dim tiles of 16 while the entry point lays them out in tiles of 32.
    """
    if any(-(-dim // 16) * 16 % 32 for dim in (head_dim, head_dim_v)):
        return (f"head dims ({head_dim}, {head_dim_v}): FA4's sm90 backward returns wrong gradients when a head "
                "dim rounded up to 16 is no multiple of 32 (flash-attention PR #2896); forward-only calls run FA4")
    return None


def check_backward_head_dims(q: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError where FA4's backward would return wrong gradients (sm90, some head dims)."""
    if q.device.type == "cuda" and arch_and_sms(q.device.index)[0] // 10 == 9:
        reason = sm90_backward_head_dim_reason(q.shape[-1], v.shape[-1])
        if reason:
            raise ValueError(f"fa4 backward: {reason}")


@functools.lru_cache(maxsize=None)
def arch_and_sms(device_index: int | None) -> tuple[int, int]:
    """FA4's target arch (e.g. 90; FLASH_ATTENTION_ARCH overrides) and its SM count for kernel choices;
    (0, 0) if this FA4 version doesn't tell."""
    try:
        from flash_attn.cute.cute_dsl_utils import get_num_sms_for_selection

        arch = module()._get_device_arch()
        return arch, get_num_sms_for_selection(device_index if device_index is not None else 0, arch)
    except (ImportError, AttributeError, RuntimeError) as exc:
        log.warning("fa4_inductor: FA4's arch/SM count unknown (%s: %s): no split-KV decoding, no block sparsity",
                    type(exc).__name__, exc)
        return 0, 0


@contextlib.contextmanager
def recording_forward() -> Iterator[list]:
    """Record the kernels FA4's forward entry point launches during the block; yields them, in order."""
    with _recording(module()._flash_attn_fwd) as launches:
        yield launches


@contextlib.contextmanager
def recording_backward() -> Iterator[list]:
    """Record FA4's backward launches (preprocess, main, postprocess) during the block."""
    fa4 = module()
    with _recording(fa4._bwd_preprocess, fa4._flash_attn_bwd, fa4._bwd_postprocess_convert) as launches:
        yield launches


@contextlib.contextmanager
def _recording(*entry_points) -> Iterator[list]:
    """Wrap FA4 entry points' compile caches in recorders for this call; yields the launches, in order."""
    launches: list = []
    for entry_point in entry_points:
        entry_point.compile_cache = launch_plan.Recorder(entry_point.compile_cache, launches)
    try:
        yield launches
    finally:
        for entry_point in entry_points:
            entry_point.compile_cache = entry_point.compile_cache.inner


@functools.lru_cache(maxsize=None)
def mask_mod(causal: bool, window_left: int, window_right: int, padding: bool, documents: bool):
    """A FA4 ``mask_mod`` keeping key ``j`` for query ``i`` of batch row ``b`` iff every given part holds:
    ``aux[0][b, j] != 0`` (``padding``), ``aux[-1][b, i] == aux[-1][b, j]`` (``documents``: segment ids),
    and the causal/window band, bottom-right aligned like FA4's (with a mask_mod FA4 drops its own)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    if not (padding or documents):
        raise ValueError("a mask_mod needs key padding or segment ids")
    right = 0 if causal else window_right
    segments_slot = 1 if padding else 0

    @cute.jit
    def attention_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        if cutlass.const_expr(padding):
            keep = aux_tensors[0]
            kept = scalar_to_ssa(keep[batch[0], kv_idx[0]], cutlass.Int32) != scalar_to_ssa(0, cutlass.Int32)
        if cutlass.const_expr(documents):
            segments = aux_tensors[segments_slot]
            same = (scalar_to_ssa(segments[batch[0], q_idx[0]], cutlass.Int32)
                    == scalar_to_ssa(segments[batch[0], kv_idx[0]], cutlass.Int32))
            if cutlass.const_expr(padding):
                kept = kept & same
            else:
                kept = same
        if cutlass.const_expr(right >= 0 or window_left >= 0):
            diagonal = q_idx + scalar_to_ssa(seqlen_info.seqlen_k - seqlen_info.seqlen_q, cutlass.Int32)
            if cutlass.const_expr(right >= 0):
                kept = kept & (kv_idx <= diagonal + scalar_to_ssa(right, cutlass.Int32))
            if cutlass.const_expr(window_left >= 0):
                kept = kept & (kv_idx >= diagonal - scalar_to_ssa(window_left, cutlass.Int32))
        return kept

    return attention_mask


@functools.lru_cache(maxsize=None)
def split_key_padding_mask_mod(group: int, splits: int):
    """The key-padding ``mask_mod`` of a split-KV call: query head ``x`` faces key chunk
    ``(x // group) % splits``, whose keys are ``aux[0][b, chunk, :]`` (see :mod:`.split_kv`)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def split_key_padding_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        keep = aux_tensors[0]
        chunk = (head[0] // group) % splits
        return scalar_to_ssa(keep[batch[0], chunk, kv_idx[0]], cutlass.Int32) != scalar_to_ssa(0, cutlass.Int32)

    return split_key_padding_mask


@functools.lru_cache(maxsize=None)
def alibi_score_mods(aux_index: int = 0):
    """FA4 (``score_mod``, ``score_mod_bwd``) adding ALiBi to the scaled scores: ``aux[aux_index][head] * (kv_idx -
    q_idx - (seqlen_k - seqlen_q))``, 0 on the bottom-right diagonal (as :func:`.reference.alibi_bias`); the aux
    tensors before ``aux_index`` are a mask_mod's. The bias does not depend on the score, so the backward passes the
    score's gradient through unchanged. FA4 calls a score_mod that reads aux tensors one score at a time (vector
    size 1), so ``head[0]`` is that score's head."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def alibi(score, batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        slope = scalar_to_ssa(aux_tensors[aux_index][head[0]], cutlass.Float32)
        diagonal = q_idx + scalar_to_ssa(seqlen_info.seqlen_k - seqlen_info.seqlen_q, cutlass.Int32)
        return score + slope * (kv_idx - diagonal).to(cutlass.Float32)

    return alibi, _gradient_through()


@functools.lru_cache(maxsize=None)
def relative_bias_score_mods(aux_index: int = 0):
    """FA4 (``score_mod``, ``score_mod_bwd``) adding a relative-position table to the scaled scores:
    ``aux[aux_index][head, kv_idx - q_idx + seqlen_q - 1]`` (as :func:`.reference.relative_bias`), the offset clamped
    into the table for the positions past the sequence ends that a tile also covers (those scores are masked). Its
    backward passes the score's gradient through, as :func:`alibi_score_mods`' does."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def relative_bias(score, batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        last = seqlen_info.seqlen_q + seqlen_info.seqlen_k - 2
        offset = cutlass.min(cutlass.max(kv_idx[0] - q_idx[0] + seqlen_info.seqlen_q - 1, 0), last)
        return score + scalar_to_ssa(aux_tensors[aux_index][head[0], offset], cutlass.Float32)

    return relative_bias, _gradient_through()


@functools.lru_cache(maxsize=None)
def key_bias_score_mods(aux_index: int = 0):
    """FA4 (``score_mod``, ``score_mod_bwd``) adding a bias per key to the scaled scores: ``aux[aux_index][batch,
    head, kv_idx]`` (as :func:`.reference.key_bias`), the key clamped into the table for the positions past the
    sequence end that a tile also covers (those scores are masked). Its backward passes the score's gradient
    through, as :func:`alibi_score_mods`' does."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def key_bias(score, batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        key = cutlass.min(kv_idx[0], seqlen_info.seqlen_k - 1)
        return score + scalar_to_ssa(aux_tensors[aux_index][batch[0], head[0], key], cutlass.Float32)

    return key_bias, _gradient_through()


@functools.lru_cache(maxsize=None)
def _gradient_through():
    """A ``score_mod_bwd`` for a bias that does not depend on the score: the score's gradient, unchanged."""
    import cutlass.cute as cute

    @cute.jit
    def gradient_through(grad, score, batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        return grad

    return gradient_through


def block_sparse_tensors(lists: tuple[torch.Tensor, ...], block_size: tuple[int, int]):
    """FA4's block-sparsity argument from (partial count, partial indices, full count, full indices)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return BlockSparseTensorsTorch(*lists, block_size=block_size)


def flash_forward(q, k, v, out, lse, *, softmax_scale, softcap, seqused_k, masking: dict,
                  packed: dict | None = None) -> None:
    """FA4's forward entry point on B,S,H,D tensors (packed (tokens, H, D) ones with ``packed``: FA4's
    ``cu_seqlens_q/k`` and ``max_seqlen_q/k`` keywords), writing ``out`` and ``lse``; ``masking`` holds FA4's
    masking keywords (causal/window, or mask_mod, aux_tensors and block_sparse_tensors)."""
    module()._flash_attn_fwd(
        q, k, v, softmax_scale=softmax_scale, softcap=softcap or None, seqused_k=seqused_k,
        return_lse=True, out=out, lse=lse, **masking, **(packed or {}),
    )


def flash_backward(dout, q, k, v, out, lse, dq, dk, dv, *, softmax_scale, softcap, seqused_k, deterministic,
                   masking: dict, packed: dict | None = None) -> None:
    """FA4's backward entry point, writing ``dq``, ``dk``, ``dv`` (``packed`` as for :func:`flash_forward`)."""
    module()._flash_attn_bwd(
        q, k, v, out, dout, lse, softmax_scale=softmax_scale, softcap=softcap, seqused_k=seqused_k,
        deterministic=deterministic, dq=dq, dk=dk, dv=dv, **masking, **(packed or {}),
    )
