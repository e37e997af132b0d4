"""The fast call path to FA4: forward and backward as the ``fa4`` ops' kernels call them.

Everything here calls FA4 through :mod:`.fa4_binding` (the only module that
touches ``flash_attn.cute``) with the masking keywords of :mod:`.masking`.
Three things keep FA4's costs out of the training loop:

- Forward and backward calls replay cached launch plans
  (:mod:`.launch_plan`, one per exact call signature, each trusted only
  after its first replay matched FA4's own call: :mod:`.plan_trust`)
  instead of FA4's per-call Python; trusted single-kernel forward plans
  and backward sequences without masking tensors are mirrored into the
  C++ kernels of :mod:`.native`, so a planned call from a graph runs no
  Python at all.
- :func:`precompile_forward` / :func:`precompile_backward` build the kernels
  under fake tensors, so the op's fake impls compile them while
  ``torch.compile`` compiles the graph, not on the first step.
- FA4's on-disk kernel cache is switched on (:mod:`.fa4_binding`), so a second
  process loads kernels instead of compiling them.

Calls with key padding or segment ids (the block-sparse route) read their
aux tensors and block-sparsity lists from the masking buffer of their masks
(they are data: made by the ``fa4.masking_buffer`` op, reused by the
backward), then replay the launches learned for their exact signature;
once learned, a call given its buffer is bound by what the caller passes
(:mod:`.masked_launch`) and replays with no further decisions.
"""

from __future__ import annotations

import logging
import time

import torch

from fa4_inductor.runtime import fa4_binding, launch_plan, masked_launch, mask_routes, native, split_kv
from fa4_inductor._torch_private import concrete_fake_like, fresh_fake_mode

log = logging.getLogger(__name__)

_FORWARD_PLANS = launch_plan.PlanCache(mirror=native.PLANS)  # planned calls skip Python when native
# The tensors each call writes, by position in the tensors its plan launches on (what a plan's check compares).
_FORWARD_OUTPUTS = {3: "out", 4: "lse"}
_BACKWARD_OUTPUTS = {6: "dq", 7: "dk", 8: "dv"}


def _fa4_forward(q, k, v, out, lse, *, softmax_scale, causal, window_left, window_right, softcap, seqused_k,
                 key_padding=None, segment_ids=None, masking_buffer=None, fa4_masking=None):
    """FA4's own forward entry point, writing into ``out`` and ``lse`` (``fa4_masking``: FA4's masking keywords
    for these params, when already computed)."""
    params = dict(causal=causal, window_left=window_left, window_right=window_right, key_padding=key_padding,
                  segment_ids=segment_ids, masking_buffer=masking_buffer)
    fa4_binding.flash_forward(q, k, v, out, lse, softmax_scale=softmax_scale, softcap=softcap, seqused_k=seqused_k,
                          masking=fa4_masking or mask_routes.fa4_masking(q, k, v, params))


def _masked_by_data(params: dict) -> bool:
    """Does the call's masking read tensors (key padding, segment ids)? Such calls are planned by exact
    signature, with their masking tensors made per call."""
    return params.get("key_padding") is not None or params.get("segment_ids") is not None


_MASKED_FORWARD_PLANS = launch_plan.PlanCache()
_BOUND_MASKED_CALLS = masked_launch.BoundMaskedCalls()  # forward and backward front keys differ in shape


def _forward_masked_by_data(q, k, v, out, lse, params: dict, front_key=None) -> None:
    """A forward whose masking reads tensors: FA4's aux tensors and block lists are made for this call, the
    kernel launch replays the plan of the call's exact signature (then bound to ``front_key``, when given: a
    call reading its masking buffer into outputs it allocated)."""
    fa4_masking = mask_routes.fa4_masking(q, k, v, params)
    masking_tensors = mask_routes.tensors_of(fa4_masking)
    tensors = (q, k, v, out, lse, params["seqused_k"], *masking_tensors)
    signature = launch_plan.exact_signature(tensors, params)
    _MASKED_FORWARD_PLANS.replay_or_learn(
        signature, tensors, q.device, lambda call: _fa4_forward(*call[:5], **params, fa4_masking=fa4_masking),
        fa4_binding.recording_forward, inputs=3, outputs=_FORWARD_OUTPUTS, kind="masked forward")
    if front_key is not None:
        _BOUND_MASKED_CALLS.bind(front_key, _MASKED_FORWARD_PLANS.get(signature), masking_tensors,
                                 params["masking_buffer"])


def _decode_splits(q, k, params: dict) -> int:
    """Key chunks for this call (1: none). Only on sm90, where FA4 has no split-KV of its own, and only
    for calls whose masking doesn't depend on the key's position relative to the end (no causal,
    window or seqused_k) nor on the query (no segment ids)."""
    if (params["causal"] or params["window_left"] >= 0 or params["window_right"] >= 0
            or params["seqused_k"] is not None or params.get("segment_ids") is not None):
        return 1
    arch, sms = fa4_binding.arch_and_sms(q.device.index)
    if arch // 10 != 9:
        return 1
    sizes = hints((*q.shape[:3], k.shape[2], k.shape[1]))
    return 1 if None in sizes else split_kv.num_splits(*sizes, sms)


def hints(values) -> list:
    """Symbolic sizes and scalars (precompiling for a dynamic graph) by their hints, so that deciding adds no guards
    and keys hash."""
    return [s.node.hint if isinstance(s, (torch.SymInt, torch.SymFloat, torch.SymBool)) else s for s in values]


def split_count(q, k, v, params: dict) -> int:
    """The key chunks :func:`_forward_maybe_split` runs these inputs in (1: unsplit)."""
    splits = _decode_splits(q, k, params)
    if splits > 1 and all(split_kv.chunkable(*hints((t.shape[1], t.stride(1), t.stride(2)))) for t in (k, v)):
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
    segment_ids: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    masking_buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 forward on real B,S,H,D CUDA tensors; returns (out B,S,H,Dv, lse fp32 B,H,S).

    The parameters are those of the ``fa4::flash_attn_fwd_kernel`` schema, in
    its order, so the op's CUDA kernel is this function. ``out``, if given,
    is an aligned B,S,H,Dv buffer FA4 writes into; ``masking_buffer`` the
    call's masking buffer (:mod:`.masking_buffer`) when made already.
    Decoding-shaped calls run split-KV on sm90 (:mod:`.split_kv`). Calls
    replay the launch plan of their exact signature once it is trusted.
    """
    front_key = None
    if out is None:
        # The hot paths: an exact call seen before allocates and replays its launches, no further decisions.
        if key_padding is None and segment_ids is None:
            bound = _FORWARD_PLANS.by_signature(launch_plan.call_signature(
                q, k, v, softmax_scale, causal, window_left, window_right, softcap, seqused_k))
            if bound:
                return bound(q, k, v, seqused_k)
        elif masking_buffer is not None and seqused_k is None:
            front_key = masked_launch.forward_key(q, k, v, softmax_scale, causal, window_left, window_right, softcap,
                                                  key_padding, segment_ids, masking_buffer)
            bound = _BOUND_MASKED_CALLS.get(front_key)
            if bound:
                return bound.forward(q, k, v, masking_buffer)
            if bound is None:
                front_key = None  # not replayable: nothing to learn again
    batch, seqlen_q, heads, _ = q.shape
    if out is None:
        out = q.new_empty((batch, seqlen_q, heads, v.shape[-1]))
    lse = q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)
    params = dict(softmax_scale=softmax_scale, causal=causal, window_left=window_left,
                  window_right=window_right, softcap=softcap, seqused_k=seqused_k, key_padding=key_padding,
                  segment_ids=segment_ids, masking_buffer=masking_buffer)
    if front_key is not None and split_count(q, k, v, params) == 1:
        _forward_masked_by_data(q, k, v, out, lse, params, front_key)
    else:
        _forward_maybe_split(q, k, v, out, lse, params, _forward_planned)
    return out, lse


def _forward_planned(q, k, v, out, lse, params: dict) -> None:
    """One FA4 forward into ``out``/``lse``: by the trusted launch plan of its exact signature when there is one,
    else through :meth:`.launch_plan.PlanCache.replay_or_learn` (FA4's entry point, learning or checking the plan
    on the way); a trusted single-kernel plan is then bound for the hot path and the native launcher."""
    if _masked_by_data(params):
        _forward_masked_by_data(q, k, v, out, lse, params)
        return
    tensors = (q, k, v, out, lse, params["seqused_k"])
    signature = launch_plan.call_signature(q, k, v, params["softmax_scale"], params["causal"], params["window_left"],
                                           params["window_right"], params["softcap"], params["seqused_k"])
    bound = _FORWARD_PLANS.by_signature(signature)
    if bound:
        bound.plan.launch(tensors)
        return
    _FORWARD_PLANS.replay_or_learn(signature, tensors, q.device, lambda call: _fa4_forward(*call[:5], **params),
                                   fa4_binding.recording_forward, inputs=3, outputs=_FORWARD_OUTPUTS, kind="forward")
    sequence = _FORWARD_PLANS.get(signature)
    if bound is False and sequence is not False:
        single = sequence.single() if sequence else None
        _FORWARD_PLANS.index(signature, launch_plan.bind(single, q, v) if single else None)


def forward_plans() -> launch_plan.PlanCache:
    """The forward launch plans learned in this process, by call signature (calls masked by data:
    :func:`masked_forward_plans`)."""
    return _FORWARD_PLANS


def masked_forward_plans() -> launch_plan.PlanCache:
    """The forward launch sequences learned for calls masked by data, by exact call signature."""
    return _MASKED_FORWARD_PLANS


def _fake_inputs(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [concrete_fake_like(t) if t is not None else None for t in tensors]


def timed_precompile(what: str, describe: str, build) -> float:
    """Run ``build`` (compiling FA4 kernels under fake tensors); return its seconds, or 0.0 when it raised (logged:
    the real call will raise it, compiling the graph must not)."""
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
    flags += mask_routes.describe(params)
    if params["softcap"]:
        flags.append(f"softcap={params['softcap']}")
    return ", ".join(flags)


_precompiled: set = set()


def _precompile_once(what: str, q, k, v, params: dict, build) -> float:
    if fa4_binding.unavailable_reason() is not None:
        return 0.0
    key = (what, q.dtype, *hints((*q.shape[2:], k.shape[2], v.shape[-1], params["softcap"])), params["causal"],
           params["window_left"], params["window_right"],
           params["seqused_k"] is None, params.get("key_padding") is None, params.get("segment_ids") is None,
           masking_route(what, q, k, v, params),
           split_count(q, k, v, params) if what == "forward" else torch.are_deterministic_algorithms_enabled())
    return precompile_once(key, what, _describe(q, k, params), build)


def precompile_once(key: tuple, what: str, describe: str, build) -> float:
    """Run ``build`` (compiling FA4 kernels on fake tensors it makes) in a fresh fake mode, once per ``key`` (which
    names the op family first: every family's keys share one set); return seconds, 0.0 when done before or FA4 is
    not usable."""
    if fa4_binding.unavailable_reason() is not None or key in _precompiled:
        return 0.0
    _precompiled.add(key)
    return timed_precompile(what, describe, lambda: _in_fresh_fake_mode(build))


def masking_route(what: str, q, k, v, params: dict):
    """The masking route a (possibly symbolic) call takes, by the sizes' hints: its sparse block size or None."""
    sizes = hints((*q.shape, k.shape[1]))
    if not _masked_by_data(params) or None in sizes:
        return None
    return mask_routes.block_sparsity_route(tuple(sizes[:4]), sizes[4], v.shape[-1], params,
                                        fa4_binding.arch_and_sms(q.device.index)[0] // 10, backward=what == "backward",
                                        deterministic=torch.are_deterministic_algorithms_enabled())


def precompile_forward(q, k, v, **params) -> float:
    """Compile (or load from disk) FA4's forward kernel for these (fake) inputs; return seconds.

    Symbolic sizes are replaced by their hints. Nothing is launched.
    """
    def build():
        fq, fk, fv, *masks = _fake_inputs(q, k, v, *_mask_tensors(params))
        out = torch.empty((*fq.shape[:3], fv.shape[-1]), dtype=fq.dtype, device=fq.device)
        lse = torch.empty((fq.shape[0], fq.shape[2], fq.shape[1]), dtype=torch.float32, device=fq.device)
        _forward_maybe_split(fq, fk, fv, out, lse, {**params, **dict(zip(_MASK_TENSORS, masks))},
                             lambda *call: _fa4_forward(*call[:5], **call[5]), merge=False)
    return _precompile_once("forward", q, k, v, params, build)


def precompile_backward(dout, q, k, v, out, lse, **params) -> float:
    """Compile (or load from disk) FA4's backward kernels for these (fake) inputs; return seconds."""
    def build():
        fdout, fq, fk, fv, fout, flse, *masks = _fake_inputs(dout, q, k, v, out, lse, *_mask_tensors(params))
        grads = [gradient_like(t) for t in (fq, fk, fv)]
        _fa4_backward(fdout, fq, fk, fv, fout, flse, *grads, **{**params, **dict(zip(_MASK_TENSORS, masks))},
                      deterministic=torch.are_deterministic_algorithms_enabled())
    return _precompile_once("backward", q, k, v, params, build)


_MASK_TENSORS = ("seqused_k", "key_padding", "segment_ids")


def _mask_tensors(params: dict) -> list[torch.Tensor | None]:
    return [params.get(name) for name in _MASK_TENSORS]


def gradient_like(t: torch.Tensor) -> torch.Tensor:
    """An empty gradient for ``t`` in ``t``'s layout when that is dense (a B,S,H,D view of a B,H,S,D leaf gets
    B,H,S,D memory, so nothing copies it back), else the layout ``torch.empty_like`` suggests; the fake impl and
    the kernels both allocate through here, so they agree."""
    return torch.empty_like(t, memory_format=torch.preserve_format)


def _in_fresh_fake_mode(build) -> None:
    with fresh_fake_mode():
        build()


_BACKWARD_PLANS = launch_plan.PlanCache(trusted_mirror=native.BACKWARD_PLANS)  # trusted ones replay from C++


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
    segment_ids: torch.Tensor | None = None,
    masking_buffer: torch.Tensor | None = None,
) -> None:
    """FA4 backward, writing into the given dq, dk, dv.

    A call replays the launch sequence learned for its exact signature (FA4's
    preprocess, main and postprocess kernels, scratch allocated alike), skipping
    FA4's per-call Python; calls with ``key_padding`` or ``segment_ids`` make
    their masking tensors first (views of the ``masking_buffer`` their forward
    made, when given), calls with ``seqused_k`` always take FA4's entry point.
    """
    params = dict(softmax_scale=softmax_scale, causal=causal, window_left=window_left, window_right=window_right,
                  softcap=softcap, seqused_k=seqused_k, key_padding=key_padding, segment_ids=segment_ids,
                  masking_buffer=masking_buffer, deterministic=torch.are_deterministic_algorithms_enabled())
    tensors = (dout, q, k, v, out, lse, dq, dk, dv)
    if seqused_k is not None:
        _fa4_backward(*tensors, **params)
        return
    masked, front_key = _masked_by_data(params), None
    if masked and masking_buffer is not None:
        # The hot path of a backward masked by data: its exact call seen before replays with no further decisions.
        front_key = masked_launch.backward_key(tensors, params, masking_buffer)
        bound = _BOUND_MASKED_CALLS.get(front_key)
        if bound:
            bound.launch(tensors, masking_buffer)
            return
        if bound is None:
            front_key = None
    fa4_masking, masking_tensors = None, []
    if masked:
        fa4_masking = mask_routes.fa4_masking(q, k, v, params, backward=True, deterministic=params["deterministic"])
        masking_tensors = mask_routes.tensors_of(fa4_masking)
    tensors = (*tensors, *masking_tensors)
    signature = launch_plan.exact_signature(tensors, params)
    _BACKWARD_PLANS.replay_or_learn(
        signature, tensors, q.device, lambda call: _fa4_backward(*call[:9], **params, fa4_masking=fa4_masking),
        fa4_binding.recording_backward, inputs=6, outputs=_BACKWARD_OUTPUTS,
        kind="masked backward" if masked else "backward", exact=params["deterministic"])
    if front_key is not None:
        _BOUND_MASKED_CALLS.bind(front_key, _BACKWARD_PLANS.get(signature), masking_tensors, masking_buffer)


def backward_plans() -> launch_plan.PlanCache:
    """The backward launch sequences learned in this process, by exact call signature."""
    return _BACKWARD_PLANS


def _fa4_backward(dout, q, k, v, out, lse, dq, dk, dv, *, softmax_scale, causal, window_left, window_right, softcap,
                  seqused_k, deterministic, key_padding=None, segment_ids=None, masking_buffer=None,
                  fa4_masking=None):
    """FA4's own backward entry point, writing into ``dq``, ``dk``, ``dv`` (``fa4_masking`` as for
    :func:`_fa4_forward`)."""
    params = dict(causal=causal, window_left=window_left, window_right=window_right, key_padding=key_padding,
                  segment_ids=segment_ids, masking_buffer=masking_buffer)
    fa4_binding.flash_backward(
        dout, q, k, v, out, lse, dq, dk, dv, softmax_scale=softmax_scale, softcap=softcap, seqused_k=seqused_k,
        deterministic=deterministic,
        masking=fa4_masking or mask_routes.fa4_masking(q, k, v, params, backward=True, deterministic=deterministic))
