"""When a launch plan may serve a call: never before its first replay matched FA4's own call.

A launch plan (:mod:`.launch_plan`) replays the kernels FA4's entry point
launched on an earlier call with the same exact signature. If FA4 changes
inside (a kernel fetched through a cache method the recorder doesn't see, a
launch argument FA4 now derives from something the signature lacks), a replay
could compute something else, with no error. So a plan is trusted only after
its first replay was checked: the replay runs into the call's outputs
(poisoned first, so an output it leaves unwritten can't pass), FA4's entry
point into fresh buffers, and the two must agree bit for bit where FA4 is
deterministic (every forward, a deterministic backward), else within the
rounding of FA4's fp32 atomic adds (twice the output dtype's epsilon of each
value, plus its epsilon of the largest). A plan that disagrees is never
replayed: the call keeps FA4's outputs, a warning is logged once per kind of
call and ``stats`` count it. The check costs one more FA4 call and one host
sync, once per plan; it doesn't run while a CUDA graph is being captured
(an unchecked plan isn't replayed there: FA4's entry point is captured).

Plans are off altogether, FA4's entry points serving every call and the
native launcher not installed, when the installed flash-attn-4 is not one of
:data:`.fa4_version.TESTED_FA4_VERSIONS` (unless ``FA4_INDUCTOR_TRUST_UNTESTED_FA4=1``:
every plan is still checked), or when ``FA4_INDUCTOR_LAUNCH_PLANS=0``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence

import torch

from fa4_inductor import config

from fa4_inductor import stats
from fa4_inductor._torch_private import empty_strided
from fa4_inductor.runtime import fa4_version

log = logging.getLogger(__name__)

OPT_IN = config.TRUST_UNTESTED_FA4.name
SWITCH = config.LAUNCH_PLANS.name


@functools.lru_cache(maxsize=None)
def off_reason() -> str | None:
    """Why launch plans (and the native launcher, which replays them) are off in this process, or None."""
    if not config.LAUNCH_PLANS.on():
        return f"launch plans are off ({SWITCH}=0): FA4's own entry points serve every call"
    version = fa4_version.version()
    if version not in fa4_version.TESTED_FA4_VERSIONS and config.TRUST_UNTESTED_FA4.value() != "1":
        return (f"flash-attn-4 {version} is not a tested version ({', '.join(fa4_version.TESTED_FA4_VERSIONS)}): FA4's "
                f"own entry points serve every call, no launch plans or native launcher ({OPT_IN}=1 turns them on, "
                "each plan checked against FA4 on its first replay)")
    return None


def capturing() -> bool:
    """Is the current CUDA stream capturing a graph (where a check's host sync is not allowed)?"""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def replay_checked(kind: str, tensors: Sequence[torch.Tensor | None], outputs: Mapping[int, str],
                   replay: Callable[[Sequence[torch.Tensor | None]], None],
                   call_fa4: Callable[[Sequence[torch.Tensor | None]], None], exact: bool) -> bool:
    """Replay a plan on ``tensors`` and compare with FA4's own call; True when they agree.

    ``outputs`` maps the positions of the tensors the call writes to their names. On disagreement the call's
    outputs are overwritten with FA4's, so the call is right either way.
    """
    for position in outputs:
        _poison(tensors[position])
    replay(tensors)
    reference = list(tensors)
    for position in outputs:
        written = tensors[position]
        reference[position] = empty_strided(tuple(written.shape), written.stride(), written.dtype, written.device)
    call_fa4(reference)
    failure = None
    for position, name in outputs.items():
        failure = failure or _disagreement(name, tensors[position], reference[position], exact)
    if failure is not None:
        for position in outputs:
            tensors[position].copy_(reference[position])
    stats.record_plan_check(kind, failure)
    return failure is None


def _poison(tensor: torch.Tensor) -> None:
    tensor.fill_(float("nan") if tensor.is_floating_point() else torch.iinfo(tensor.dtype).min)


def _disagreement(name: str, got: torch.Tensor, want: torch.Tensor, exact: bool) -> str | None:
    """Why ``got`` (the replay's) is not FA4's ``want``, or None."""
    same = (got == want) | (got.isnan() & want.isnan())
    if not exact and got.is_floating_point():
        eps = torch.finfo(got.dtype).eps
        magnitude = want.float().abs()
        tolerance = 2 * eps * magnitude + eps * magnitude.nan_to_num(posinf=0.0).amax()
        same |= (got.float() - want.float()).abs() <= tolerance
    if bool(same.all()):
        return None
    differ = ~same
    worst = (got.float() - want.float()).abs()[differ].nan_to_num(nan=float("inf")).amax().item()
    return (f"{name}: {int(differ.sum())} of {got.numel()} values differ from FA4's "
            f"({'bitwise' if exact else 'beyond rounding'}; largest difference {worst:.3g})")
