"""Every use of PyTorch internals that have no public equivalent, in one place.

Each function says which internal it touches and why no public hook does
the job; when PyTorch grows a public one, only this module changes.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable, Iterator

import torch
# The base class of dispatch modes: documented (extending PyTorch), but importable from a private module only.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401


def destroy_library(library: torch.library.Library) -> None:
    """Unregister every kernel a ``torch.library.Library`` registered.

    ``Library._destroy`` is what its finalizer runs; the public API offers no
    way to undo ``Library.impl`` deterministically (dropping the last
    reference defers it to the garbage collector).
    """
    library._destroy()


def forget_python_dispatch(qualified_names) -> None:
    """Drop the Python dispatcher's cached routing of these ops (``"aten::name"``), all overloads.

    ``OpOverload._dispatch_cache`` remembers, per dispatch key, whether to call
    the C++ kernel or decompose in Python, and registering or destroying a
    library's kernels doesn't invalidate it. After an override of a
    CompositeImplicitAutograd op at an Autograd key is gone, a stale "call the
    C++ kernel" makes AOTAutograd trace the op opaquely, and gradients through
    it come out disconnected (seen: a later stock compile's zero gradients).
    PyTorch clears the same cache where it swaps kernels itself (``torch.export``).
    """
    for qualified_name in qualified_names:
        namespace, name = qualified_name.split("::")
        packet = getattr(getattr(torch.ops, namespace), name)
        for overload in packet.overloads():
            getattr(packet, overload)._dispatch_cache.clear()


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


@contextlib.contextmanager
def fresh_fake_mode() -> Iterator[None]:
    """A new ``FakeTensorMode`` in which tensors get concrete sizes, outside any active one.

    FA4 compiles kernels under fake tensors but needs concrete sizes; the
    fake tensors a fake impl receives during tracing may have symbolic ones.
    ``FakeTensorMode`` and ``unset_fake_temporarily`` (step out of the
    tracer's mode) live in ``torch._subclasses``: there is no public API.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    with unset_fake_temporarily(), FakeTensorMode():
        yield


def is_fake(tensor: torch.Tensor) -> bool:
    """Is ``tensor`` a fake tensor (no data: precompiling under ``FakeTensorMode``)? ``FakeTensor`` lives in
    ``torch._subclasses``."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def concrete_fake_like(tensor: torch.Tensor, fallback: int = 4096) -> torch.Tensor:
    """A tensor like ``tensor`` with symbolic sizes and strides replaced by their hints.

    Call inside :func:`fresh_fake_mode`. The hint (the size Dynamo saw) comes
    from ``torch.fx.experimental.symbolic_shapes``: ``optimization_hint`` in
    torch >= 2.12, ``hint_int`` before. Unbacked sizes take ``fallback``.
    """
    from torch.fx.experimental import symbolic_shapes

    hint = getattr(symbolic_shapes, "optimization_hint", None) or symbolic_shapes.hint_int

    def concrete(value) -> int:
        return value if isinstance(value, int) else hint(value, fallback=fallback)

    sizes = [concrete(s) for s in tensor.shape]
    strides = [concrete(s) for s in tensor.stride()]
    return torch.empty_strided(sizes, strides, dtype=tensor.dtype, device=tensor.device)


def _fast_cuda_allocator():
    try:
        from torch._C._dynamo.guards import _empty_strided_cuda
    except ImportError:
        return None
    return _empty_strided_cuda


_EMPTY_STRIDED_CUDA = _fast_cuda_allocator()


def empty_strided(size: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """``torch.empty_strided``, ~3x cheaper on the current CUDA device.

    There it uses ``torch._C._dynamo.guards._empty_strided_cuda``, the
    allocator Inductor's generated code calls: it skips the Python argument
    parser and the dispatcher (a few µs per tensor, which matter on a
    per-call path of ~20 µs). It allocates on the current device only, hence
    the device check; ``torch._C._cuda_getDevice`` is what
    ``torch.cuda.current_device`` returns without its lazy-init check (a CUDA
    tensor exists, so CUDA is initialized).
    """
    if (device.type == "cuda" and _EMPTY_STRIDED_CUDA is not None
            and device.index == torch._C._cuda_getDevice()):
        return _EMPTY_STRIDED_CUDA(size, stride, dtype)
    return torch.empty_strided(size, stride, dtype=dtype, device=device)


def outside_dispatch_modes():
    """A context in which no ``TorchDispatchMode`` sees tensor ops (``_disable_current_modes``: there is
    no public way to step out of the active modes)."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


@functools.lru_cache(maxsize=1024)  # per-call allocations of the hot paths ask for the same few sizes
def contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of this size (a tuple of ints)."""
    strides, step = [], 1
    for extent in reversed(size):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def empty_contiguous(size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new contiguous tensor, through :func:`empty_strided`."""
    return empty_strided(size, contiguous_strides(size), dtype, device)


def is_pure_op(target) -> bool:
    """Is a graph call's ``target`` an op overload that mutates nothing and draws no random numbers (its result
    depends on its arguments only)?

    An op's schema lives in ``OpOverload._schema``; ``Node.is_impure`` answers a
    neighbouring question (may DCE drop it?) differently across releases.
    """
    return (isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in target.tags)


def is_tensor_property_symbol(symbol, shape_env) -> bool:
    """Does the ShapeEnv symbol stand for a tensor's size, stride or offset (rather than a Python scalar input)?

    ``ShapeEnv.var_to_sources`` and Dynamo's ``TensorPropertySource`` say where a symbol came from; no public
    API tells a size from an int the traced code captured.
    """
    from torch._dynamo.source import TensorPropertySource

    sources = shape_env.var_to_sources.get(symbol, ())
    return not sources or any(isinstance(source, TensorPropertySource) for source in sources)


def symbol_hint(shape_env, symbol) -> int | None:
    """The value a ShapeEnv symbol has in the example being traced, None for a data-dependent one.

    The ShapeEnv method was renamed: ``guarding_hint_or_throw`` from torch 2.13 (which deprecates
    ``size_hint``), ``size_hint`` before.
    """
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    hint = getattr(shape_env, "guarding_hint_or_throw", None)
    if hint is None:
        return shape_env.size_hint(symbol, allow_none=True)
    try:
        return hint(symbol)
    except GuardOnDataDependentSymNode:
        return None


def decide_tensor_branches(decide) -> Callable[[], None]:
    """Have Dynamo ask ``decide(node)`` about a one-element tensor it is about to branch on (``if t:``), and take the
    branch it answers (True or False) instead of breaking the graph; None leaves Dynamo to break it. Returns the
    function that undoes this.

    Dynamo has no hook here: it calls its conditional-jump handlers (``InstructionTranslatorBase.POP_JUMP_*``)
    through a per-class ``dispatch_table`` that each translator class builds when it is made, so the wrapper goes
    into those tables, in every translator class. Only the jumps that pop their value are decided: the tensor is
    consumed there, so it never turns into a Python bool anywhere the program reads it.
    """
    import dis

    from torch._dynamo import symbolic_convert
    from torch._dynamo.variables import ConstantVariable, TensorVariable

    def decided(original):
        def handler(translator, instruction):
            value = translator.stack[-1] if translator.stack else None
            if isinstance(value, TensorVariable):
                truth = decide(value.proxy.node)
                if truth is not None:
                    translator.stack[-1] = ConstantVariable.create(bool(truth))
            return original(translator, instruction)
        return handler

    opcodes = [code for name, code in dis.opmap.items()
               if name.startswith("POP_JUMP") and name.endswith(("IF_TRUE", "IF_FALSE"))]
    classes, pending = [], [symbolic_convert.InstructionTranslatorBase]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending.extend(cls.__subclasses__())
    replaced = []
    for cls in classes:
        table = cls.__dict__.get("dispatch_table")
        for code in opcodes if table is not None else ():
            if table[code] is not None:
                ours = decided(table[code])
                replaced.append((table, code, table[code], ours))
                table[code] = ours

    def undo() -> None:
        for table, code, original, ours in replaced:
            if table[code] is ours:
                table[code] = original
    return undo


_trace_time_callbacks: dict[str, Callable[..., None]] = {}


def on_trace(name: str, callback: Callable[..., None]) -> None:
    """Register ``callback(user_backtrace, *values)`` for :func:`call_while_tracing` under ``name``."""
    _trace_time_callbacks[name] = callback


def _run_trace_time_callback(ctx) -> None:
    name = ctx.get_local("_callback_name").as_python_constant()
    values = ctx.get_local("_callback_values").as_python_constant()
    backtrace = io.StringIO()
    ctx.print_bt(file=backtrace)
    _trace_time_callbacks[name](backtrace.getvalue(), *values)


def call_while_tracing(_callback_name: str, *_callback_values) -> None:
    """Run the callback registered under ``_callback_name`` with the user's backtrace and these constant values, in
    Python, while Dynamo traces the caller (once per trace, nothing in the graph; nothing in eager).

    ``torch._dynamo.comptime`` is Dynamo's only hook for code that runs at trace time: a library call that keeps its
    own implementation breaks the graph inside the code Dynamo inlines, so no marker in the graph would survive.
    The callback is looked up by name because comptime runs only module-level functions, reading the caller's locals.
    """
    from torch._dynamo.comptime import comptime

    comptime(_run_trace_time_callback)
