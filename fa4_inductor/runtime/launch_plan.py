"""Cached launch plans: call FA4's compiled kernels without FA4's per-call Python.

FA4's entry points redo on every call what a call's exact signature already
fixes: argument checks, tile and scheduler heuristics, a compile key of ~60
fields, its hash. That host work (~60-100 µs on an H100 host) dwarfs a small
attention kernel. A plan keeps the kernels FA4 launched and their arguments;
later calls with the same signature allocate the outputs and launch them
directly.

A plan is learned from FA4 itself: the first call of a signature runs FA4's
entry point with its compile caches wrapped by :class:`Recorder` s, which
note the kernels FA4 launched and their arguments, under a
:class:`CallWatch`, which notes the buffers FA4 allocated and any other
tensor op it ran. Tensor arguments become slots filled per call (the call's
tensors, or scratch buffers allocated alike on each call, zero-filled where
FA4 zero-filled them); every other argument must be fixed by the signature.
A call that ran tensor ops besides its kernels, or launched on a buffer that
is neither the call's nor one FA4 allocated, is never replayed. A call
passing one tensor in several slots (``attention(x, x, x)``) is learned on
copies of the repeats (:func:`distinct_inputs`), so that each launch argument
names one slot.

A learned plan serves no call before its first replay matched FA4's own call
on the same inputs (:mod:`.plan_trust`); :class:`PlanCache` runs that check.
Forward calls are planned by :func:`call_signature` (trusted single-kernel
forwards are bound to their outputs' sizes, :class:`BoundPlan`, and mirrored
into the native launcher); backward calls and calls masked by data by
:func:`exact_signature`.

Tensors FA4 passes inside tuples (its block-sparsity lists, ``AuxData``),
also as views of the call's tensors (lists expanded over heads), are made
anew from each call's tensors (:class:`NestedArgument`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from fa4_inductor.runtime import plan_trust
from fa4_inductor._torch_private import TorchDispatchMode, contiguous_strides, empty_strided, outside_dispatch_modes

log = logging.getLogger(__name__)

# Learning swaps an attribute of FA4's entry point: one learner at a time, or two swaps could interleave.
LEARNING = threading.Lock()


@dataclasses.dataclass(frozen=True)
class NestedArgument:
    """A launch argument that holds call tensors inside tuples (FA4's block-sparsity tuple, its ``AuxData``):
    ``build(tensors)`` makes it anew from a call's tensors."""

    position: int
    build: Callable[[Sequence[torch.Tensor | None]], Any]


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """A compiled FA4 kernel and its launch arguments, tensors left as slots."""

    kernel: Callable[..., Any]
    args: tuple[Any, ...]
    slots: tuple[tuple[int, int], ...]  # (argument position, index of the tensor in the call's tensors)
    nested: tuple[NestedArgument, ...] = ()
    entry: Callable[..., Any] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "entry", direct_entry(self.kernel, len(self.args)))

    def launch(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """Launch the kernel on the current stream with this call's tensors."""
        args = list(self.args)
        for position, slot in self.slots:
            args[position] = _without_grad(tensors[slot])
        for argument in self.nested:
            args[argument.position] = argument.build(tensors)
        self.entry(*args)


def _without_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as a kernel argument: detached only where autograd tracks it (detaching costs a few µs)."""
    return tensor.detach() if tensor.requires_grad else tensor


def direct_entry(kernel: Callable[..., Any], arg_count: int) -> Callable[..., Any]:
    """The TVM-FFI function behind a CuTe DSL compiled kernel, when calling it with the same positional
    arguments is what the kernel's own ``__call__`` would do; else the kernel itself.

    A CuTe DSL kernel compiled with ``--enable-tvm-ffi`` is a Python object whose ``__call__`` checks
    for pointer-address arguments and then goes through a generated keyword wrapper to the C function;
    those two Python frames cost ~1 µs a call. They are skipped only when they provably pass every
    argument through unchanged: no pointer-address arguments, every parameter given positionally (no
    defaults filled in) and no dataclass argument unpacked to a tuple. This reads CuTe DSL / tvm-ffi
    attributes that are not public API; if they change, the kernel is called as before.
    """
    execution_args = getattr(kernel, "execution_args", None)
    if execution_args is None or getattr(execution_args, "has_pointer_address_arg_specs", True):
        return kernel
    function = kernel.__tvm_ffi_object__() if hasattr(kernel, "__tvm_ffi_object__") else None
    wrapper = getattr(kernel, "_kwargs_wrapper", None)
    if function is None or wrapper is None:
        return kernel
    code = getattr(wrapper, "__code__", None)
    if (code is None or code.co_kwonlyargcount or code.co_argcount != arg_count
            or any("unpack" in name for name in code.co_names)):
        return kernel
    return function


class Recorder:
    """Stands in for one FA4 compile cache during one call of this thread.

    Appends each launch of a kernel fetched from it (``cache[key]``, or
    ``cache.get(key)`` as FA4 4.0.0b40's backward fetches its main kernel),
    ``(kernel, args)``, to ``launches``; the recorders of one call share that
    list, so it holds the call's launches in order. Other threads pass
    through. A kernel compiled during the call is noted as ``(COMPILED, ())``:
    FA4 may launch it from its own variable, past the cache (4.0.0b40's
    backward does), so such a call is not learned from. A kernel fetched
    another way goes unrecorded: the check of a plan's first replay
    (:mod:`.plan_trust`) is what catches that.
    """

    def __init__(self, inner, launches: list | None = None):
        self.inner = inner
        self.owner = threading.get_ident()
        self.launches: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [] if launches is None else launches

    def __contains__(self, key) -> bool:
        return key in self.inner

    def __setitem__(self, key, fn) -> None:
        self.inner[key] = fn
        if threading.get_ident() == self.owner:
            self.launches.append((COMPILED, ()))

    def __getitem__(self, key):
        return self._recording(self.inner[key])

    def get(self, key, default=None):
        fn = self.inner.get(key)
        return default if fn is None else self._recording(fn)

    def _recording(self, fn):
        if threading.get_ident() != self.owner:
            return fn

        def launch(*args):
            self.launches.append((fn, args))
            with outside_dispatch_modes():  # what a kernel does is replayed with it: not for a CallWatch
                return fn(*args)

        return launch

    def __getattr__(self, name):
        return getattr(self.inner, name)


class CallWatch(TorchDispatchMode):
    """Watches the tensor ops of one call into FA4 (this thread only) while it is being learned.

    Notes the buffers FA4 allocates (``allocations``: tensor, zero-filled),
    and every other op that is not a view (``other_ops``): a replay launches
    the recorded kernels only, so a call that also computes with torch ops
    is not replayable.
    """

    _ALLOCATING = {"empty": False, "empty_like": False, "empty_strided": False, "new_empty": False,
                   "new_empty_strided": False, "zeros": True, "zeros_like": True, "new_zeros": True}

    def __init__(self):
        super().__init__()
        self.allocations: list[tuple[torch.Tensor, bool]] = []
        self.other_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        zeroed = self._ALLOCATING.get(func.overloadpacket.__name__)
        if zeroed is not None:
            self.allocations.append((result, zeroed))
        elif not func.is_view:
            self.other_ops.append(str(func))
        return result


# What ``sequence_from`` returns when this call can't tell (two of its tensors
# are one buffer that ``distinct_inputs`` could not copy, so a slot is
# ambiguous; or it compiled a kernel): learn again on a later call.
UNDECIDED = object()
# The launch a Recorder notes when FA4 compiled a kernel during the call.
COMPILED = object()


def _launch_from(kernel, launch_args, tensors: Sequence[torch.Tensor | None],
                 call_count: int | None = None) -> LaunchPlan | None | object:
    """The plan of one launch; ``tensors[:call_count]`` are the call's own, the rest scratch buffers, which
    only top-level arguments may be (nested ones are built from the call's tensors)."""
    args, slots, nested = list(launch_args), [], []
    for position, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            match = _match(arg, tensors)
            if match is None or match is UNDECIDED:
                return match
            index, view = match
            if view is not None:
                return None  # FA4 passes views it made of the call's tensors only inside tuples
            slots.append((position, index))
            args[position] = None
        elif isinstance(arg, (tuple, list)) and _holds_tensor(arg):
            build = _builder(arg, tensors[:call_count])
            if build is None or build is UNDECIDED:
                return build
            nested.append(NestedArgument(position, build))
            args[position] = None
        elif _holds_tensor(arg):
            return None  # a tensor inside another structure would be replayed stale
    return LaunchPlan(kernel, tuple(args), tuple(slots), tuple(nested))


def _match(arg: torch.Tensor, tensors: Sequence[torch.Tensor | None]):
    """(index of the call tensor ``arg`` is, None) or (index of the call tensor ``arg`` is a view of at the same
    address, its (size, stride)); None when it is none of them (FA4 allocated it), UNDECIDED when ambiguous."""
    for same in (_same_view, _view_at_same_address):
        matches = [i for i, t in enumerate(tensors) if t is not None and same(arg, t)]
        if len(matches) > 1:
            return UNDECIDED
        if matches:
            return matches[0], None if same is _same_view else (tuple(arg.shape), tuple(arg.stride()))
    return None


def _builder(arg, tensors: Sequence[torch.Tensor | None]):
    """A function making ``arg`` (tensors nested in tuples, lists, named tuples) anew from a call's tensors;
    None or UNDECIDED as :func:`_match` says for one of its tensors."""
    if isinstance(arg, torch.Tensor):
        match = _match(arg, tensors)
        if match is None or match is UNDECIDED:
            return match
        index, view = match
        if view is None:
            return lambda call: _without_grad(call[index])
        size, stride = view
        return lambda call: _without_grad(call[index]).as_strided(size, stride)
    if isinstance(arg, (tuple, list)) and _holds_tensor(arg):
        parts = [_builder(part, tensors) for part in arg]
        for part in parts:
            if part is None or part is UNDECIDED:
                return part
        make = type(arg)._make if hasattr(type(arg), "_fields") else type(arg)
        return lambda call: make([part(call) for part in parts])
    if _holds_tensor(arg):
        return None
    return lambda call: arg


@dataclasses.dataclass(frozen=True)
class Scratch:
    """A buffer FA4 allocates per call for its kernels (accumulators, row sums): how to allocate it."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    zeroed: bool


@dataclasses.dataclass(frozen=True)
class LaunchSequence:
    """Kernels launched in order on a call's tensors plus scratch buffers allocated per call.

    Slots index the call's tensors, then the scratch buffers.
    """

    launches: tuple[LaunchPlan, ...]
    scratch: tuple[Scratch, ...]

    def launch(self, tensors: Sequence[torch.Tensor | None], device: torch.device) -> None:
        """Allocate the scratch buffers and launch every kernel on the current stream."""
        buffers = list(tensors)
        for recipe in self.scratch:
            buffer = empty_strided(recipe.size, recipe.stride, recipe.dtype, device)
            buffers.append(buffer.zero_() if recipe.zeroed else buffer)
        for plan in self.launches:
            plan.launch(buffers)

    def single(self) -> LaunchPlan | None:
        """The one kernel launch of a sequence with no scratch buffers (a forward FA4 launches alone), or None."""
        return self.launches[0] if len(self.launches) == 1 and not self.scratch else None


def sequence_from(launches: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
                  tensors: Sequence[torch.Tensor | None],
                  allocations: Sequence[tuple[torch.Tensor, bool]]) -> LaunchSequence | None | object:
    """Turn a call's recorded launches into a sequence, None if never replayable, or UNDECIDED.

    ``allocations`` are the (tensor, zero-filled) buffers FA4 allocated during
    the call; a launch argument that is neither one of the call's tensors nor
    one of those can't be replayed.
    """
    if not launches:
        return None
    if any(kernel is COMPILED for kernel, _ in launches):
        return UNDECIDED
    pool = [*tensors, *(buffer for buffer, _ in allocations)]
    plans = []
    for kernel, args in launches:
        plan = _launch_from(kernel, args, pool, len(tensors))
        if not isinstance(plan, LaunchPlan):
            return plan
        plans.append(plan)
    used = sorted({slot for plan in plans for _, slot in plan.slots if slot >= len(tensors)})
    renumber = {slot: len(tensors) + i for i, slot in enumerate(used)}
    plans = [dataclasses.replace(plan, slots=tuple((position, renumber.get(slot, slot))
                                                   for position, slot in plan.slots)) for plan in plans]
    scratch = tuple(
        Scratch(tuple(buffer.shape), tuple(buffer.stride()), buffer.dtype, zeroed)
        for buffer, zeroed in (allocations[slot - len(tensors)] for slot in used)
    )
    return LaunchSequence(tuple(plans), scratch)


def distinct_inputs(tensors: Sequence[torch.Tensor | None], inputs: int) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` to learn a plan on: each of the first ``inputs`` (read-only inputs) that starts where an
    earlier tensor starts (``attention(x, x, x)``) replaced by a copy in its layout, so that every launch argument
    names one call tensor (else the plan stays undecided for as long as the caller passes one tensor twice).
    The copy is made outside the learning call; an input whose layout a copy can't keep (overlapping, such as an
    expanded GQA view) is left as it is."""
    distinct = list(tensors)
    for index in range(inputs):
        tensor = distinct[index]
        if tensor is None or not any(other is not None and other.data_ptr() == tensor.data_ptr()
                                     for other in distinct[:index]):
            continue
        copy = tensor.detach().clone(memory_format=torch.preserve_format)
        if copy.stride() == tensor.stride():
            distinct[index] = copy
    return tuple(distinct)


def _holds_tensor(arg: Any) -> bool:
    if isinstance(arg, torch.Tensor):
        return True
    if isinstance(arg, (tuple, list)):
        return any(_holds_tensor(a) for a in arg)
    if dataclasses.is_dataclass(arg) and not isinstance(arg, type):
        return any(_holds_tensor(getattr(arg, f.name)) for f in dataclasses.fields(arg))
    return False


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _view_at_same_address(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Is ``a`` a view (an expand, a reshape) of ``b``'s memory starting where ``b`` starts?"""
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype


def call_signature(q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k) -> Hashable:
    """The exact identity of a call's launch (shapes included): cheap to build, unlike ``plan_key``."""
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.get_device(),
            softmax_scale, causal, window_left, window_right, softcap, seqused_k is None)


def exact_signature(tensors: Sequence[torch.Tensor | None], params: dict[str, Any]) -> Hashable:
    """A call's identity for plans learned per exact call: every tensor's geometry and dtype, its device, and
    the options in ``params``' order, which each caller keeps fixed (tensor options by presence only: their
    geometry is among ``tensors``)."""
    # List comprehensions, not generators: this runs on every planned backward (~1.5 µs less a call).
    geometry = tuple([None if t is None else (t.shape, t.stride(), t.dtype) for t in tensors])
    options = tuple([value is not None if value is None or isinstance(value, torch.Tensor) else value
                     for value in params.values()])
    return geometry, tensors[0].get_device(), options


def signature_fields(signature) -> dict[str, Any]:
    """A :func:`call_signature` by name (``geometry``: q, k, v sizes then strides, flat)."""
    q_size, k_size, v_size, q_stride, k_stride, v_stride, dtype, device, *params, seqused_k_absent = signature
    softmax_scale, causal, window_left, window_right, softcap = params
    return dict(geometry=[*q_size, *k_size, *v_size, *q_stride, *k_stride, *v_stride], dtype=dtype,
                device=device, softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                window_right=window_right, softcap=softcap, has_seqused_k=not seqused_k_absent)


@dataclasses.dataclass(frozen=True)
class BoundPlan:
    """A plan bound to one exact call signature: the outputs' sizes are known, so a call only
    allocates them and launches."""

    plan: LaunchPlan
    out_size: tuple[int, ...]
    out_stride: tuple[int, ...]
    lse_size: tuple[int, ...]
    lse_stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def __call__(self, q, k, v, seqused_k) -> tuple[torch.Tensor, torch.Tensor]:
        """Launch on new contiguous out (B,S,H,Dv) and lse (fp32 B,H,S); return them."""
        out = empty_strided(self.out_size, self.out_stride, self.dtype, self.device)
        lse = empty_strided(self.lse_size, self.lse_stride, torch.float32, self.device)
        self.plan.launch((q, k, v, out, lse, seqused_k))
        return out, lse


def bind(plan: LaunchPlan, q: torch.Tensor, v: torch.Tensor) -> BoundPlan:
    """``plan`` bound to calls with ``q``'s and ``v``'s shapes, dtype and device."""
    batch, seqlen_q, heads = q.shape[:3]
    out_size, lse_size = (batch, seqlen_q, heads, v.shape[-1]), (batch, heads, seqlen_q)
    return BoundPlan(plan, out_size, contiguous_strides(out_size), lse_size, contiguous_strides(lse_size),
                     q.dtype, q.device)


class PlanCache:
    """Launch plans by exact call signature, each trusted once its first replay matched FA4's own call, plus a
    front index of trusted forwards bound to their outputs' sizes (:class:`BoundPlan`).

    The front index turns a repeated forward into one dict lookup. ``None`` marks a signature whose launches are
    never replayed. A ``mirror`` (``add(signature, bound)``, ``clear()``) is told of every bound plan indexed and
    of every clearing of the front index; a ``trusted_mirror`` (``add(signature, sequence)``, ``clear()``) of every
    plan that passed its check and of every clearing of the plans.
    """

    def __init__(self, max_signatures: int = 4096, mirror=None, trusted_mirror=None):
        self._plans: dict[Hashable, tuple[LaunchSequence | None, bool]] = {}  # signature -> (plan, trusted)
        self._by_signature: dict[Hashable, BoundPlan | None] = {}
        self._max_signatures = max_signatures
        self._mirror = mirror
        self._trusted_mirror = trusted_mirror
        self._lock = threading.Lock()

    def by_signature(self, signature: Hashable) -> BoundPlan | None | bool:
        """The bound plan indexed under this exact call signature, None if unplannable, False if unseen."""
        return self._by_signature.get(signature, False)

    def index(self, signature: Hashable, bound: BoundPlan | None) -> None:
        """Index a trusted bound plan (None: not replayable) under an exact call signature."""
        with self._lock:
            if len(self._by_signature) >= self._max_signatures:
                self._clear_signatures()  # bounded under endlessly varying shapes
            self._by_signature[signature] = bound
            if bound and self._mirror is not None:
                self._mirror.add(signature, bound)

    def _clear_signatures(self) -> None:
        self._by_signature.clear()
        if self._mirror is not None:
            self._mirror.clear()

    def _put(self, signature: Hashable, plan: LaunchSequence | None, trusted: bool) -> None:
        with self._lock:
            if signature not in self._plans and len(self._plans) >= self._max_signatures:
                self._clear_plans()  # bounded under endlessly varying shapes
            self._plans[signature] = (plan, trusted)
            if plan and trusted and self._trusted_mirror is not None:
                self._trusted_mirror.add(signature, plan)

    def _clear_plans(self) -> None:
        self._plans.clear()
        if self._trusted_mirror is not None:
            self._trusted_mirror.clear()

    def get(self, signature: Hashable) -> LaunchSequence | None | bool:
        """The trusted plan of a signature, None if never replayed, False if not learned or not checked yet."""
        plan, trusted = self._plans.get(signature, (False, False))
        return plan if plan is None or trusted else False

    def replay_or_learn(self, signature: Hashable, tensors: Sequence[torch.Tensor | None], device: torch.device,
                        call_fa4: Callable[[Sequence[torch.Tensor | None]], None], recording, *, inputs: int,
                        outputs: dict[int, str], kind: str, exact: bool = True) -> None:
        """Run one call of ``signature`` on ``tensors``: replay its trusted plan; check an untrusted one
        (:func:`.plan_trust.replay_checked`, ``outputs``, ``kind`` and ``exact`` as it takes them); else
        ``call_fa4(tensors)`` (FA4's entry point on them), learning the plan on the signature's first call
        (``recording``: the context manager that records FA4's launches; the first ``inputs`` tensors are
        read-only, see :func:`distinct_inputs`)."""
        plan, trusted = self._plans.get(signature, (False, False))
        if plan and trusted:
            plan.launch(tensors, device)
        elif plan and not plan_trust.capturing():
            passed = plan_trust.replay_checked(kind, tensors, outputs, lambda call: plan.launch(call, device),
                                               call_fa4, exact)
            self._put(signature, plan if passed else None, trusted=True)
        elif plan is not False or plan_trust.off_reason() is not None:
            call_fa4(tensors)
        else:
            self._learn(signature, tensors, call_fa4, recording, inputs, kind)

    def _learn(self, signature, tensors, call_fa4, recording, inputs: int, kind: str) -> None:
        tensors = distinct_inputs(tensors, inputs)
        with LEARNING, CallWatch() as watch, recording() as launches:
            call_fa4(tensors)
        learned = None if watch.other_ops else sequence_from(launches, tensors, watch.allocations)
        if learned is not UNDECIDED:
            self._put(signature, learned, trusted=False)
            log.debug("FA4 %s launch sequence %s for %s", kind, "learned" if learned else "not replayable", signature)

    def keys(self) -> list[Hashable]:
        """The signatures learned so far (for tests and inspection)."""
        return list(self._plans)

    def clear(self) -> None:
        """Forget every plan."""
        with self._lock:
            self._clear_plans()
            self._clear_signatures()
