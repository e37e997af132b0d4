"""The forward op's CUDA kernel in C++ (``native/forward_launcher.cpp``): no Python on a planned call.

A compiled graph calls ``fa4.flash_attn_fwd_kernel`` through the dispatcher.
With a Python kernel, every call pays the dispatcher's round trip into
Python (~4-6 µs on an H100 host) and the Python that hands the tensors to
FA4's compiled kernel (~7-9 µs). The C++ kernel keeps, per exact call
signature, the launch plan :mod:`.launch_plan` learned (the TVM-FFI
function of FA4's compiled kernel and its constant arguments), allocates
``out``/``lse`` and calls that function directly. A call it has no plan
for goes to the Python kernel, ``fa4::_flash_attn_fwd_python``, which
learns plans as before; :class:`NativePlans` mirrors each one here.

The library is compiled on first use with the system C++ compiler against
the installed torch and tvm-ffi (about 20-40 s, once) and cached under
``~/.cache/fa4_inductor/native`` by a hash of the source and versions.
``FA4_INDUCTOR_NATIVE=0`` turns it off, and so does anything that turns launch
plans off (:mod:`.plan_trust`); if it can't be built or loaded, the Python
kernel serves every call and the reason is logged.
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
from typing import Any

import torch

from . import launch_plan, plan_trust

log = logging.getLogger(__name__)

_SOURCE = pathlib.Path(__file__).with_name("native") / "forward_launcher.cpp"

# Argument kinds of fa4_native::add_plan, as forward_launcher.cpp numbers them.
_NONE, _BOOL, _INT, _FLOAT, _OBJECT, _TENSOR_SLOT = range(6)


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "fa4_inductor" / "native"


def _library_path() -> pathlib.Path:
    versions = f"{torch.__version__}|{importlib.metadata.version('apache-tvm-ffi')}|{sys.platform}"
    digest = hashlib.sha256(_SOURCE.read_bytes() + versions.encode()).hexdigest()[:16]
    return _cache_dir() / f"forward_launcher-{digest}.so"


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
            os.environ.get("CXX", "c++"), "-shared", "-fPIC", "-O2", "-std=c++20",  # torch >= 2.15 headers need C++20
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
            log.info("fa4_inductor: compiling the native FA4 forward launcher (once; cached in %s)", target.parent)
            _compile(target)
            log.info("fa4_inductor: compiled the native launcher in %.1f s", time.perf_counter() - start)
        torch.ops.load_library(str(target))
    except Exception as exc:  # no compiler, no tvm-ffi, a broken toolchain: the Python kernel serves
        return f"{type(exc).__name__}: {exc}"
    return None


def install_cuda_forward() -> bool:
    """Make the C++ launcher the CUDA kernel of ``fa4.flash_attn_fwd_kernel``; False when it can't be
    (the caller then registers the Python kernel)."""
    if os.environ.get("FA4_INDUCTOR_NATIVE", "1") == "0":
        return False
    if not torch.cuda.is_available() or importlib.util.find_spec("tvm_ffi") is None:
        return False  # no GPU, or no FA4 (tvm-ffi comes with it): the Python kernel says why when called
    if plan_trust.off_reason() is not None:
        return False  # it only replays launch plans
    reason = load()
    if reason is not None:
        log.warning("fa4_inductor: native forward launcher unavailable, using the Python kernel (%s)", reason)
        return False
    torch.ops.fa4_native.install_cuda_forward()
    PLANS.enabled = True
    return True


class NativePlans:
    """Mirrors the forward plans indexed by exact call signature into the C++ launcher.

    Keeps alive what the C++ side holds raw pointers to (each plan's TVM-FFI
    function and converted constant arguments) until :meth:`clear`.
    """

    def __init__(self):
        self.enabled = False
        self._held: list[Any] = []
        self._lock = threading.Lock()

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
        with self._lock:
            self._held.append(held)
            torch.ops.fa4_native.add_plan(
                fields["geometry"], fields["dtype"], fields["device"], fields["softmax_scale"], fields["causal"],
                fields["window_left"], fields["window_right"], fields["softcap"], fields["has_seqused_k"],
                bound.plan.entry.__chandle__(), kinds, values, reals)
        return True

    def clear(self) -> None:
        """Forget every mirrored plan."""
        if not self.enabled:
            return
        with self._lock:
            torch.ops.fa4_native.clear_plans()
            self._held.clear()

    def count(self) -> int:
        """How many plans the C++ launcher holds."""
        return torch.ops.fa4_native.plan_count() if self.enabled else 0


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
