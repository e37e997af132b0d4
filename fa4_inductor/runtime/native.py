"""The ``fa4`` ops' CUDA kernels in C++ (``native/launcher.cpp``): no Python on a planned call.

A compiled graph calls ``fa4.flash_attn_fwd_kernel`` and ``fa4.flash_attn_bwd``
through the dispatcher. With Python kernels, every call pays the dispatcher's
round trip into Python (~4-6 µs on an H100 host) and the Python that hands the
tensors to FA4's compiled kernels (~7-9 µs a kernel in the forward; a
backward's three kernels and their scratch buffers, ~100 µs on the H200's host,
more than a 1k-token causal backward's GPU time leaves). The C++ kernels keep,
per exact call signature, the launch plans :mod:`.launch_plan` learned and
checked (the TVM-FFI functions of FA4's compiled kernels and their constant
arguments), allocate the outputs (and a backward's scratch) and call those
functions directly. A call they have no plan for goes to the Python kernel,
``fa4::_flash_attn_fwd_python`` / ``fa4::_flash_attn_bwd_python``, which learns
and checks plans as before; :class:`NativePlans` and
:class:`NativeBackwardPlans` mirror each trusted one here.

The library is compiled on the first CUDA call (not at import) with the system C++ compiler against
the installed torch and tvm-ffi (about 20-40 s, once) and cached under
``~/.cache/fa4_inductor/native`` by a hash of the source and versions.
``FA4_INDUCTOR_NATIVE=0`` turns it off, and so does anything that turns launch
plans off (:mod:`.plan_trust`); if it can't be built or loaded, the Python
kernels serve every call and the reason is logged.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

import torch

from fa4_inductor import config

from fa4_inductor.runtime import launch_plan, plan_trust

log = logging.getLogger(__name__)

_SOURCE = pathlib.Path(__file__).with_name("native") / "launcher.cpp"

# Argument kinds of fa4_native::add_plan, as launcher.cpp numbers them.
_NONE, _BOOL, _INT, _FLOAT, _OBJECT, _TENSOR_SLOT = range(6)


def _cache_dir() -> pathlib.Path:
    return config.cache_dir("native")


def _library_path() -> pathlib.Path:
    versions = f"{torch.__version__}|{importlib.metadata.version('apache-tvm-ffi')}|{sys.platform}"
    digest = hashlib.sha256(_SOURCE.read_bytes() + versions.encode()).hexdigest()[:16]
    return _cache_dir() / f"launcher-{digest}.so"


def _compile(target: pathlib.Path) -> None:
    """Compile the launcher into ``target`` (atomically: ranks of one job may race)."""
    import tvm_ffi.libinfo
    from torch.utils import cpp_extension

    tvm_lib_dir = str(pathlib.Path(tvm_ffi.libinfo.find_libtvm_ffi()).parent)
    torch_lib_dirs = cpp_extension.library_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = pathlib.Path(scratch) / target.name
        command = [
            config.CXX.value(), "-shared", "-fPIC", "-O2", "-std=c++20",  # torch >= 2.15 headers need C++20
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{path}" for path in cpp_extension.include_paths()),
            f"-I{tvm_ffi.libinfo.find_include_path()}",
            str(_SOURCE), "-o", str(built),
            *(f"-L{path}" for path in torch_lib_dirs), "-lc10", "-ltorch_cpu",
            f"-L{tvm_lib_dir}", "-ltvm_ffi",
            *(f"-Wl,-rpath,{path}" for path in (*torch_lib_dirs, tvm_lib_dir)),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{result.stderr[-4000:]}")
        os.replace(built, target)


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    """Build (once) and load the launcher library; None when loaded, else why not."""
    try:
        import tvm_ffi  # noqa: F401  (loads libtvm_ffi, which the library links)

        target = _library_path()
        if not target.exists():
            start = time.perf_counter()
            log.info("fa4_inductor: compiling the native FA4 launcher (once; cached in %s)", target.parent)
            _compile(target)
            log.info("fa4_inductor: compiled the native launcher in %.1f s", time.perf_counter() - start)
        torch.ops.load_library(str(target))
    except Exception as exc:  # no compiler, no tvm-ffi, a broken toolchain: the Python kernel serves
        return f"{type(exc).__name__}: {exc}"
    return None


def _installable() -> bool:
    """Can the C++ kernels be installed here (logging why not where the library fails to load)?"""
    if not config.NATIVE.on():
        return False
    if not torch.cuda.is_available() or importlib.util.find_spec("tvm_ffi") is None:
        return False  # no GPU, or no FA4 (tvm-ffi comes with it): the Python kernels say why when called
    if plan_trust.off_reason() is not None:
        return False  # they only replay launch plans
    reason = load()
    if reason is not None:
        log.warning("fa4_inductor: native launcher unavailable, using the Python kernels (%s)", reason)
        return False
    return True


def _install(install_op: str, mirror: "_Mirror") -> bool:
    """Run the launcher's ``install_op`` (a C++ kernel registered over the op's Python CUDA kernel) and enable
    ``mirror``; False when the launcher can't be installed here. The dispatcher warns once about the override,
    which is the point here, so the warning is silenced."""
    if not _installable():
        return False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        getattr(torch.ops.fa4_native, install_op)()
    mirror.enabled = True
    return True


@functools.lru_cache(maxsize=None)
def install_cuda_forward() -> bool:
    """Make the C++ launcher the CUDA kernel of ``fa4.flash_attn_fwd_kernel`` (once); False when it can't be.
    Called by the Python kernel on its first CUDA call, so ``import fa4_inductor`` builds nothing."""
    return _install("install_cuda_forward", PLANS)


@functools.lru_cache(maxsize=None)
def install_cuda_backward() -> bool:
    """As :func:`install_cuda_forward`, for ``fa4.flash_attn_bwd``."""
    return _install("install_cuda_backward", BACKWARD_PLANS)


class _Mirror:
    """Plans mirrored into the C++ launcher, and what it holds raw pointers to (each plan's TVM-FFI functions and
    converted constant arguments), kept alive until :meth:`clear`. ``enabled`` once the launcher is installed."""

    _clear_op = _count_op = ""  # the fa4_native ops that clear and count this kind of plan

    def __init__(self):
        self.enabled = False
        self._held: list[Any] = []
        self._lock = threading.Lock()

    def _register(self, held: list[Any], add) -> None:
        with self._lock:
            self._held.append(held)
            add()

    def clear(self) -> None:
        """Forget every mirrored plan."""
        if not self.enabled:
            return
        with self._lock:
            getattr(torch.ops.fa4_native, self._clear_op)()
            self._held.clear()

    def count(self) -> int:
        """How many plans of this kind the C++ launcher holds."""
        return getattr(torch.ops.fa4_native, self._count_op)() if self.enabled else 0


class NativePlans(_Mirror):
    """Mirrors the forward plans indexed by exact call signature into the C++ launcher."""

    _clear_op, _count_op = "clear_plans", "plan_count"

    def add(self, signature, bound: launch_plan.BoundPlan) -> bool:
        """Register ``bound`` for calls with this exact signature; False if it can't be launched from C++."""
        if not self.enabled:
            return False
        arguments = _plan_arguments(bound.plan)
        if arguments is None:
            return False
        fields = launch_plan.signature_fields(signature)
        if len(fields["geometry"]) != 24:
            return False
        kinds, values, reals, held = arguments
        self._register(held, lambda: torch.ops.fa4_native.add_plan(
            fields["geometry"], fields["dtype"], fields["device"], fields["softmax_scale"], fields["causal"],
            fields["window_left"], fields["window_right"], fields["softcap"], fields["has_seqused_k"],
            bound.plan.entry.__chandle__(), kinds, values, reals))
        return True


class NativeBackwardPlans(_Mirror):
    """Mirrors trusted backward launch sequences (calls with no masking tensors) into the C++ launcher."""

    _clear_op, _count_op = "clear_backward_plans", "backward_plan_count"

    def add(self, signature, sequence: launch_plan.LaunchSequence) -> bool:
        """Register ``sequence`` for backward calls with this exact signature
        (:func:`.launch_plan.exact_signature` of the adapter's backward); False if C++ can't serve it."""
        if not self.enabled:
            return False
        fields = _backward_fields(signature)
        if fields is None:
            return False
        functions, arg_counts, kinds, values, reals, held = [], [], [], [], [], []
        for plan in sequence.launches:
            arguments = _plan_arguments(plan)
            if arguments is None:
                return False
            functions.append(plan.entry.__chandle__())
            arg_counts.append(len(arguments[0]))
            kinds += arguments[0]
            values += arguments[1]
            reals += arguments[2]
            held += arguments[3]
        scratch = [torch.empty_strided(s.size, s.stride, dtype=s.dtype, device="meta") for s in sequence.scratch]
        zeroed = [int(s.zeroed) for s in sequence.scratch]
        self._register(held, lambda: torch.ops.fa4_native.add_backward_plan(
            *fields, functions, arg_counts, kinds, values, reals, scratch, zeroed))
        return True


def _backward_fields(signature) -> tuple | None:
    """``add_backward_plan``'s leading arguments for a backward's exact signature, or None where the C++ kernel
    would not make the same call: masking tensors, other ranks or dtypes, or gradients in another layout than
    the one it allocates (``empty_like`` preserving q's, k's, v's, as the Python kernel does)."""
    geometry, device, options = signature
    softmax_scale, causal, window_left, window_right, softcap, *masks, deterministic = options
    if len(geometry) != 9 or any(masks) or None in geometry:
        return None
    dout, q, k, v, out, lse, *gradients = geometry
    dtype = q[2]
    if ([len(size) for size, _, _ in geometry[:6]] != [4, 4, 4, 4, 4, 3]
            or any(t[2] != dtype for t in (dout, k, v, out)) or lse[2] != torch.float32):
        return None
    for (size, stride, grad_dtype), (input_size, input_stride, input_dtype) in zip(gradients, (q, k, v)):
        allocated = torch.empty_like(torch.empty_strided(input_size, input_stride, dtype=input_dtype, device="meta"),
                                     memory_format=torch.preserve_format)
        if (size, stride, grad_dtype) != (allocated.shape, allocated.stride(), input_dtype):
            return None
    flat = [value for size, stride, _ in geometry[:6] for value in (*size, *stride)]
    return flat, dtype, device, softmax_scale, causal, window_left, window_right, softcap, deterministic


def _plan_arguments(plan: launch_plan.LaunchPlan):
    """(kinds, values, reals, objects to keep alive) describing the plan's arguments to the C++ side;
    None if its kernel isn't a bare TVM-FFI function or an argument has no TVM-FFI form."""
    import tvm_ffi

    if not isinstance(plan.entry, tvm_ffi.Function) or plan.nested:
        return None
    slots = dict(plan.slots)
    kinds, values, reals, held = [], [], [], [plan.entry]
    for position, arg in enumerate(plan.args):
        if position in slots:
            kind, value, real = _TENSOR_SLOT, slots[position], 0.0
        elif arg is None:
            kind, value, real = _NONE, 0, 0.0
        elif isinstance(arg, bool):
            kind, value, real = _BOOL, int(arg), 0.0
        elif isinstance(arg, int):
            kind, value, real = _INT, arg, 0.0
        elif isinstance(arg, float):
            kind, value, real = _FLOAT, 0, arg
        else:
            converted = tvm_ffi.convert(arg)
            if not isinstance(converted, tvm_ffi.Object):
                return None
            held.append(converted)
            kind, value, real = _OBJECT, converted.__chandle__(), 0.0
        kinds.append(kind)
        values.append(value)
        reals.append(real)
    return kinds, values, reals, held


PLANS = NativePlans()
BACKWARD_PLANS = NativeBackwardPlans()
