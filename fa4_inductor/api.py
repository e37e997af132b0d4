"""``enable()`` / ``disable()`` / ``enabled()``: switch the plugin on and off.

State changes are serialized by one lock. ``enable`` is idempotent: the same
settings twice change nothing, new settings replace the old ones. Without
an importable FA4 (or without CUDA), CUDA is dropped from the routed
devices with one warning; if nothing is left, PyTorch is left untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator, Sequence

import torch

from fa4_inductor.compile import drawn_branches, inductor_pass, library_calls

from fa4_inductor.runtime import fa4_binding
from fa4_inductor.eager.override import EagerOverride, register_with_pytorch

log = logging.getLogger(__name__)

_KNOWN_DEVICES = ("cuda", "cpu")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``enable`` was asked for."""

    compile: bool
    eager: bool
    devices: tuple[str, ...]


@dataclasses.dataclass
class _Active:
    settings: Settings
    eager_override: EagerOverride | None
    graph_pass: inductor_pass.FA4AttentionPass | None


_lock = threading.RLock()
_active: _Active | None = None
_warned_unavailable = False


def _usable_devices(devices: Sequence[str]) -> tuple[str, ...]:
    global _warned_unavailable
    unknown = [d for d in devices if d not in _KNOWN_DEVICES]
    if unknown:
        raise ValueError(f"devices {unknown} unknown; choose from {_KNOWN_DEVICES}")
    reason = fa4_binding.unavailable_reason() or (None if torch.cuda.is_available() else "CUDA is not available")
    if "cuda" in devices and reason:
        if not _warned_unavailable:
            _warned_unavailable = True
            log.warning("fa4_inductor: CUDA attention stays on PyTorch's kernels: %s", reason)
        return tuple(d for d in devices if d != "cuda")
    return tuple(dict.fromkeys(devices))


def enable(*, compile: bool = True, eager: bool = True, devices: Sequence[str] = ("cuda",)) -> bool:
    """Route attention to FA4: compiled graphs (``compile``) and eager SDPA (``eager``).

    ``devices`` lists the device types to route; ``"cpu"`` sends CPU tensors
    to the reference implementation (for tests). Returns whether anything
    is routed to FA4 now.
    """
    global _active
    with _lock:
        settings = Settings(bool(compile), bool(eager), _usable_devices(devices))
        if _active is not None and _active.settings == settings:
            return True
        _disable_locked()
        if not settings.devices or not (settings.compile or settings.eager):
            return False
        override = EagerOverride(settings.devices) if settings.eager else None
        graph_pass = inductor_pass.install(settings.devices) if settings.compile else None
        if settings.compile:  # LayerDrop at 0 would split a model's graph and hide its masks from the pass
            drawn_branches.see_through()
            library_calls.activate()
        _active = _Active(settings, override, graph_pass)
        log.info("fa4_inductor enabled: %s", settings)
        return True


def _disable_locked() -> None:
    global _active
    if _active is None:
        return
    if _active.eager_override is not None:
        _active.eager_override.remove()
    if _active.graph_pass is not None:
        inductor_pass.uninstall(_active.graph_pass)
        drawn_branches.stop_seeing_through()
        library_calls.deactivate()
    log.info("fa4_inductor disabled (was %s)", _active.settings)
    _active = None


def disable() -> None:
    """Undo ``enable``: stock SDPA kernels and Inductor passes are back as they were."""
    with _lock:
        _disable_locked()


def settings() -> Settings | None:
    """The active settings, or None when the plugin is off."""
    with _lock:
        return _active.settings if _active is not None else None


@contextlib.contextmanager
def enabled(*, compile: bool = True, eager: bool = True, devices: Sequence[str] = ("cuda",)) -> Iterator[bool]:
    """``enable(...)`` for a block, then restore whatever was active before."""
    with _lock:
        previous = settings()
        result = enable(compile=compile, eager=eager, devices=devices)
    try:
        yield result
    finally:
        with _lock:
            disable()
            if previous is not None:
                enable(compile=previous.compile, eager=previous.eager, devices=previous.devices)


class _RegistryHandle:
    """What PyTorch's flash-attention registry keeps while our impl is active."""

    def remove(self) -> None:
        disable()


def _activate_from_registry() -> _RegistryHandle:
    enable(compile=False, eager=True, devices=("cuda",))
    return _RegistryHandle()


register_with_pytorch(_activate_from_registry)
