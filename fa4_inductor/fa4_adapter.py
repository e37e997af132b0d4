"""The one module that talks to FlashAttention-4 (``flash_attn.cute``).

FA4's Python API drifts between releases (``_flash_attn_fwd`` returns five
values in 4.0.0b36, two in earlier betas), so every contact with it lives
here: importing it, reading what the installed version supports, and calling
its forward and backward entry points. Everything else in the package calls
:func:`forward` / :func:`backward` with plain arguments.

The tested version is :data:`TESTED_FA4_VERSION`; other versions are used
if their entry points have the parameters we pass, else they are reported
as unusable with the reason.

Three things keep FA4's costs out of the training loop:

- Forward and backward calls replay cached launch plans
  (:mod:`.launch_plan`) instead of FA4's per-call Python; forward plans
  are mirrored into the C++ kernel of :mod:`.native`, so a planned call
  from a graph runs no Python at all.
- :func:`precompile_forward` / :func:`precompile_backward` build the kernels
  under fake tensors, so the op's fake impls compile them while
  ``torch.compile`` compiles the graph, not on the first step.
- FA4's on-disk kernel cache is switched on (unless the user set it), so a
  second process loads kernels instead of compiling them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import pathlib
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType

import torch

from . import launch_plan, native, split_kv
from ._torch_private import concrete_fake_like, fresh_fake_mode

log = logging.getLogger(__name__)

TESTED_FA4_VERSION = "4.0.0b36"
_FA4_MODULE = "flash_attn.cute.interface"

# Parameters of FA4's private entry points that this adapter passes.
_FWD_PARAMS = (
    "softmax_scale", "causal", "softcap", "window_size_left", "window_size_right",
    "seqused_k", "return_lse", "out", "lse", "mask_mod", "aux_tensors",
)
_BWD_PARAMS = (
    "softmax_scale", "causal", "softcap", "window_size_left", "window_size_right",
    "seqused_k", "deterministic", "dq", "dk", "dv", "mask_mod", "aux_tensors",
)

# Architectures (major version) on which FA4 runs forward and backward.
SUPPORTED_ARCH_MAJORS = (9, 10, 11)


class FA4Unavailable(RuntimeError):
    """FA4 is not installed or its API does not match what the adapter needs."""


_DISK_CACHE_FLAG = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
_DISK_CACHE_DIR = "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"


def _default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "fa4_inductor" / "cute_dsl"


def _configure_disk_cache() -> None:
    """Turn on FA4's persistent kernel cache unless the user decided; FA4 reads it at import."""
    if "flash_attn.cute.cache_utils" in sys.modules:
        if os.environ.get(_DISK_CACHE_FLAG) != "1":
            log.info("flash_attn.cute was imported before fa4_inductor without %s=1: "
                     "FA4 kernels are not cached on disk", _DISK_CACHE_FLAG)
        return
    os.environ.setdefault(_DISK_CACHE_FLAG, "1")
    os.environ.setdefault(_DISK_CACHE_DIR, str(_default_cache_dir()))


def disk_cache_dir() -> str | None:
    """Where FA4 keeps compiled kernels across processes, or None when it doesn't."""
    return os.environ.get(_DISK_CACHE_DIR) if os.environ.get(_DISK_CACHE_FLAG) == "1" else None


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


_FORWARD_PLANS = launch_plan.PlanCache(mirror=native.PLANS)  # planned calls skip Python when native
# Learning swaps an attribute of FA4's entry point: one learner at a time, or two swaps could interleave.
_LEARNING = threading.Lock()


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
def _key_padding_mask_mod(causal: bool, window_left: int, window_right: int):
    """A FA4 ``mask_mod`` keeping key ``j`` of batch row ``b`` iff ``aux[0][b, j] != 0``.

    With a mask_mod FA4 drops its own causal/window masking, so they are
    folded in here, bottom-right aligned like FA4's.
    """
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    right = 0 if causal else window_right

    @cute.jit
    def key_padding_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        keep = aux_tensors[0]
        kept = scalar_to_ssa(keep[batch[0], kv_idx[0]], cutlass.Int32) != scalar_to_ssa(0, cutlass.Int32)
        if cutlass.const_expr(right >= 0 or window_left >= 0):
            diagonal = q_idx + scalar_to_ssa(seqlen_info.seqlen_k - seqlen_info.seqlen_q, cutlass.Int32)
            if cutlass.const_expr(right >= 0):
                kept = kept & (kv_idx <= diagonal + scalar_to_ssa(right, cutlass.Int32))
            if cutlass.const_expr(window_left >= 0):
                kept = kept & (kv_idx >= diagonal - scalar_to_ssa(window_left, cutlass.Int32))
        return kept

    return key_padding_mask


@functools.lru_cache(maxsize=None)
def _split_key_padding_mask_mod(group: int, splits: int):
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


def _masking(causal, window_left, window_right, key_padding, group: int = 1) -> dict:
    """FA4 keyword arguments for the masking: built-in causal/window, or a mask_mod for key padding
    ((B, S_kv), or (B, splits, S_kv / splits) for a split-KV call, which has no causal or window)."""
    if key_padding is None:
        return dict(causal=causal, window_size_left=_window(window_left), window_size_right=_window(window_right))
    if key_padding.dim() == 3:
        mask_mod = _split_key_padding_mask_mod(group, key_padding.shape[1])
    else:
        mask_mod = _key_padding_mask_mod(causal, window_left, window_right)
    return dict(causal=False, window_size_left=None, window_size_right=None, mask_mod=mask_mod,
                aux_tensors=[_mask_mod_operand(key_padding)])


# FA4 evaluates a mask_mod on whole key tiles (up to 256 keys), also past the last key.
_KEY_TILE_SLACK = 256


def _mask_mod_operand(key_padding: torch.Tensor) -> torch.Tensor:
    """The key padding as the mask_mod reads it: int32, with hidden columns past the end, so that reads
    of a partial last tile stay inside the tensor."""
    return torch.nn.functional.pad(key_padding.to(torch.int32), (0, _KEY_TILE_SLACK))


def _fa4_forward(q, k, v, out, lse, *, softmax_scale, causal, window_left, window_right, softcap, seqused_k,
                 key_padding=None):
    """FA4's own forward entry point, writing into ``out`` and ``lse``."""
    _module()._flash_attn_fwd(
        q, k, v,
        softmax_scale=softmax_scale,
        softcap=softcap or None,
        seqused_k=seqused_k,
        return_lse=True,
        out=out,
        lse=lse,
        **_masking(causal, window_left, window_right, key_padding, group=q.shape[2] // k.shape[2]),
    )


@functools.lru_cache(maxsize=None)
def _arch_and_sms(device_index: int | None) -> tuple[int, int]:
    """FA4's target arch (e.g. 90; FLASH_ATTENTION_ARCH overrides) and its SM count for kernel choices;
    (0, 0) if this FA4 version doesn't tell (then nothing is split)."""
    try:
        from flash_attn.cute.cute_dsl_utils import get_num_sms_for_selection

        arch = _module()._get_device_arch()
        return arch, get_num_sms_for_selection(device_index if device_index is not None else 0, arch)
    except (ImportError, AttributeError, RuntimeError) as exc:
        log.warning("fa4_inductor: no split-KV decoding (FA4's arch/SM count unknown: %s: %s)",
                    type(exc).__name__, exc)
        return 0, 0


def _decode_splits(q, k, params: dict) -> int:
    """Key chunks for this call (1: none). Only on sm90, where FA4 has no split-KV of its own, and only
    for calls whose masking doesn't depend on the key's position relative to the end (no causal,
    window or seqused_k)."""
    if (params["causal"] or params["window_left"] >= 0 or params["window_right"] >= 0
            or params["seqused_k"] is not None):
        return 1
    arch, sms = _arch_and_sms(q.device.index)
    if arch // 10 != 9:
        return 1
    sizes = _hints((*q.shape[:3], k.shape[2], k.shape[1]))
    return 1 if None in sizes else split_kv.num_splits(*sizes, sms)


def _hints(values) -> list[int | None]:
    """Symbolic sizes (precompiling for a dynamic graph) by their hints, so that deciding adds no guards."""
    return [s.node.hint if isinstance(s, torch.SymInt) else s for s in values]


def _split_count(q, k, v, params: dict) -> int:
    """The key chunks :func:`_forward_maybe_split` runs these inputs in (1: unsplit)."""
    splits = _decode_splits(q, k, params)
    if splits > 1 and all(split_kv.chunkable(*_hints((t.shape[1], t.stride(1), t.stride(2)))) for t in (k, v)):
        return splits
    return 1


def _forward_maybe_split(q, k, v, out, lse, params: dict, run, merge: bool = True) -> None:
    """``run(q, k, v, out, lse, params)`` on the call, or on its key chunks merged after (split-KV; ``merge``
    False only compiles: precompiling must not launch the merge kernel on fake tensors)."""
    splits = _decode_splits(q, k, params)
    parts = split_kv.split_inputs(q, k, v, params["key_padding"], splits) if splits > 1 else None
    if parts is None:
        run(q, k, v, out, lse, params)
        return
    q_parts, k_parts, v_parts, padding = parts
    out_parts = q_parts.new_empty((*q_parts.shape[:3], v.shape[-1]))
    lse_parts = q_parts.new_empty((q.shape[0], q_parts.shape[2], q.shape[1]), dtype=torch.float32)
    run(q_parts, k_parts, v_parts, out_parts, lse_parts, {**params, "key_padding": padding})
    if merge:
        split_kv.combine(out_parts, lse_parts, k.shape[2], splits, out, lse)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    seqused_k: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 forward on real B,S,H,D CUDA tensors; returns (out B,S,H,Dv, lse fp32 B,H,S).

    The parameters are those of the ``fa4::flash_attn_fwd_kernel`` schema, in
    its order, so the op's CUDA kernel is this function. ``out``, if given,
    is an aligned B,S,H,Dv buffer FA4 writes into. Decoding-shaped calls run
    split-KV on sm90 (:mod:`.split_kv`). Calls replay the launch plan of
    their key once one has been learned (calls with ``key_padding`` always
    take FA4's entry point).
    """
    if key_padding is None and out is None:
        # The hot path: an exact signature seen before allocates and replays its plan, no further decisions.
        bound = _FORWARD_PLANS.by_signature(launch_plan.call_signature(
            q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k))
        if bound:
            return bound(q, k, v, seqused_k)
    batch, seqlen_q, heads, _ = q.shape
    if out is None:
        out = q.new_empty((batch, seqlen_q, heads, v.shape[-1]))
    lse = q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)
    params = dict(softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                  window_right=window_right, softcap=softcap, seqused_k=seqused_k, key_padding=key_padding)
    _forward_maybe_split(q, k, v, out, lse, params, _forward_planned)
    return out, lse


def _forward_planned(q, k, v, out, lse, params: dict) -> None:
    """One FA4 forward into ``out``/``lse``: by launch plan when one is known, else FA4's entry point
    (learning the plan of a new key on the way)."""
    if params["key_padding"] is not None:
        _fa4_forward(q, k, v, out, lse, **params)
        return
    tensors = (q, k, v, out, lse, params["seqused_k"])
    signature = launch_plan.call_signature(q, k, v, params["softmax_scale"], params["causal"], params["window_left"],
                                           params["window_right"], params["softcap"], params["seqused_k"])
    bound = _FORWARD_PLANS.by_signature(signature)
    if bound is False:  # a new signature: its plan key may have a plan already
        key = launch_plan.plan_key(q, k, v, params)
        plan = _FORWARD_PLANS.get(key) if key is not None else None
        if plan is False:
            _learn(key, signature, tensors, params)
            return
        bound = launch_plan.bind(plan, q, v) if plan else None
        _FORWARD_PLANS.index(signature, bound)
    if bound:
        bound.plan.launch(tensors)
    else:
        _fa4_forward(q, k, v, out, lse, **params)


def _learn(key, signature, tensors, params: dict) -> None:
    """Run the call through FA4's entry point and keep the launch plan it shows."""
    q, k, v, out, lse, _ = tensors
    with _LEARNING, launch_plan.CallWatch() as watch, _recording(_module()._flash_attn_fwd) as launches:
        _fa4_forward(q, k, v, out, lse, **params)
    learned = None if watch.other_ops else launch_plan.plan_from(launches, tensors)
    if learned is not launch_plan.UNDECIDED:
        _FORWARD_PLANS.put(key, learned)
        _FORWARD_PLANS.index(signature, launch_plan.bind(learned, q, v) if learned else None)
        log.debug("FA4 forward launch plan %s for %s", "learned" if learned else "not replayable", key)


def forward_plans() -> launch_plan.PlanCache:
    """The forward launch plans learned in this process."""
    return _FORWARD_PLANS


def _fake_inputs(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [concrete_fake_like(t) if t is not None else None for t in tensors]


def _timed_precompile(what: str, describe: str, build) -> float:
    start = time.perf_counter()
    try:
        build()
    except Exception as exc:  # the real call will raise it; compiling the graph must not
        log.warning("fa4_inductor: could not precompile the FA4 %s kernel (%s): %s: %s",
                    what, describe, type(exc).__name__, exc)
        return 0.0
    seconds = time.perf_counter() - start
    if seconds > 0.2:
        log.info("fa4_inductor: compiled FA4 %s kernel (%s) in %.1f s", what, describe, seconds)
    return seconds


def _describe(q, k, params) -> str:
    flags = [f"{q.dtype}".replace("torch.", ""), f"d={q.shape[-1]}", f"heads={q.shape[2]}/{k.shape[2]}"]
    flags += [name for name in ("causal",) if params["causal"]]
    if params["window_left"] >= 0 or params["window_right"] >= 0:
        flags.append(f"window=({params['window_left']}, {params['window_right']})")
    if params["softcap"]:
        flags.append(f"softcap={params['softcap']}")
    if params.get("key_padding") is not None:
        flags.append("key padding")
    return ", ".join(flags)


_precompiled: set = set()


def _precompile_once(what: str, q, k, v, params: dict, build) -> float:
    if unavailable_reason() is not None:
        return 0.0
    key = (what, q.dtype, tuple(q.shape[2:]), k.shape[2], v.shape[-1], params["causal"],
           params["window_left"], params["window_right"], bool(params["softcap"]),
           params["seqused_k"] is None, params.get("key_padding") is None,
           _split_count(q, k, v, params) if what == "forward" else 1)
    if key in _precompiled:
        return 0.0
    _precompiled.add(key)
    return _timed_precompile(what, _describe(q, k, params), build)


def precompile_forward(q, k, v, **params) -> float:
    """Compile (or load from disk) FA4's forward kernel for these (fake) inputs; return seconds.

    Symbolic sizes are replaced by their hints. Nothing is launched.
    """
    def build():
        fq, fk, fv, fseq, fpad = _fake_inputs(q, k, v, params["seqused_k"], params.get("key_padding"))
        out = torch.empty((*fq.shape[:3], fv.shape[-1]), dtype=fq.dtype, device=fq.device)
        lse = torch.empty((fq.shape[0], fq.shape[2], fq.shape[1]), dtype=torch.float32, device=fq.device)
        _forward_maybe_split(fq, fk, fv, out, lse, {**params, "seqused_k": fseq, "key_padding": fpad},
                             lambda *call: _fa4_forward(*call[:5], **call[5]), merge=False)
    return _precompile_once("forward", q, k, v, params, lambda: _in_fresh_fake_mode(build))


def precompile_backward(dout, q, k, v, out, lse, **params) -> float:
    """Compile (or load from disk) FA4's backward kernels for these (fake) inputs; return seconds."""
    def build():
        fdout, fq, fk, fv, fout, flse, fseq, fpad = _fake_inputs(
            dout, q, k, v, out, lse, params["seqused_k"], params.get("key_padding"))
        grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (fq, fk, fv)]
        _fa4_backward(fdout, fq, fk, fv, fout, flse, *grads, **{**params, "seqused_k": fseq, "key_padding": fpad},
                      deterministic=torch.are_deterministic_algorithms_enabled())
    return _precompile_once("backward", q, k, v, params, lambda: _in_fresh_fake_mode(build))


def _in_fresh_fake_mode(build) -> None:
    with fresh_fake_mode():
        build()


_BACKWARD_PLANS = launch_plan.PlanCache()


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
    key_padding: torch.Tensor | None = None,
) -> None:
    """FA4 backward, writing into the given contiguous dq, dk, dv.

    A call replays the launch sequence learned for its exact signature (FA4's
    preprocess, main and postprocess kernels, scratch allocated alike), skipping
    FA4's per-call Python; calls with ``seqused_k`` or ``key_padding`` always take
    FA4's entry point.
    """
    params = dict(softmax_scale=softmax_scale, causal=causal, window_left=window_left, window_right=window_right,
                  softcap=softcap, seqused_k=seqused_k, key_padding=key_padding,
                  deterministic=torch.are_deterministic_algorithms_enabled())
    tensors = (dout, q, k, v, out, lse, dq, dk, dv)
    if seqused_k is not None or key_padding is not None:
        _fa4_backward(*tensors, **params)
        return
    signature = (tuple((t.shape, t.stride()) for t in tensors), q.dtype, q.get_device(), softmax_scale, causal,
                 window_left, window_right, softcap, params["deterministic"])
    plan = _BACKWARD_PLANS.get(signature)
    if plan:
        plan.launch(tensors, q.device)
        return
    if plan is None:
        _fa4_backward(*tensors, **params)
        return
    module = _module()
    with _LEARNING, launch_plan.CallWatch() as watch, _recording(
            module._bwd_preprocess, module._flash_attn_bwd, module._bwd_postprocess_convert) as launches:
        _fa4_backward(*tensors, **params)
    learned = None if watch.other_ops else launch_plan.sequence_from(launches, tensors, watch.allocations)
    if learned is not launch_plan.UNDECIDED:
        _BACKWARD_PLANS.put(signature, learned)
        log.debug("FA4 backward launch sequence %s for %s", "learned" if learned else "not replayable", signature)


def backward_plans() -> launch_plan.PlanCache:
    """The backward launch sequences learned in this process, by exact call signature."""
    return _BACKWARD_PLANS


def _fa4_backward(dout, q, k, v, out, lse, dq, dk, dv, *, softmax_scale, causal, window_left, window_right, softcap,
                  seqused_k, key_padding, deterministic):
    """FA4's own backward entry point, writing into ``dq``, ``dk``, ``dv``."""
    _module()._flash_attn_bwd(
        q, k, v, out, dout, lse,
        softmax_scale=softmax_scale,
        softcap=softcap,
        seqused_k=seqused_k,
        deterministic=deterministic,
        dq=dq, dk=dk, dv=dv,
        **_masking(causal, window_left, window_right, key_padding),
    )
