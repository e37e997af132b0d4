"""Flash-attention library calls traced by Dynamo become the ``fa4`` ops.

FA4's own API (``flash_attn.cute.flash_attn_func`` / ``flash_attn_varlen_func``, what Hugging Face's
``attn_implementation="flash_attention_4"`` calls) is Python that Dynamo can't trace: it breaks the graph at every
call. FA2's API (``flash_attn.flash_attn_func`` and its varlen, qkv/kv-packed and kv-cache forms, what
``"flash_attention_2"`` calls) wraps its ops in ``autograd.Function``\ s; traced here, a training graph gets the fa4
op itself. While the plugin compiles (``enable(compile=True)``, or ``explain``), Dynamo traces a substitute instead
(``torch.compiler.substitute_in_graph``, PyTorch's public hook for this): a call whose arguments our ops compute
exactly becomes ``fa4.flash_attn_fwd`` / ``fa4.flash_attn_varlen_fwd`` in the graph, annotated with the API it came
from (``torch.fx.traceback.annotate``), so the compile pass records the site under that pattern name. A call with
an argument they don't take (a ``score_mod``, a ``learnable_sink``, paged KV, ...) keeps FA4's own call (a graph
break, as without the plugin) and is recorded with the reason while Dynamo traces it (the break drops the code
Dynamo inlined, so nothing in the graph could carry it). Eager calls never see any of this: substitutes are used
only while Dynamo traces, and with the plugin off they trace FA4's call as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import math
import os
import pathlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.fx.traceback as fx_traceback

from fa4_inductor import stats
from fa4_inductor._torch_private import call_while_tracing, on_trace
from fa4_inductor.compile.fx_utils import user_location
from fa4_inductor.compile.library_ops import alibi_reason, call_features, schema_arguments
from fa4_inductor.runtime import ops  # noqa: F401  (the fa4 ops the substitutes call)
from fa4_inductor.runtime.support import FA4_DTYPES

log = logging.getLogger(__name__)

# node.meta["custom"] key naming the library function an fa4 op node was traced from.
ANNOTATION = "fa4_inductor.library_call"


class _Switch:
    """Whether the substitutes translate calls (read while Dynamo traces, so a change recompiles)."""

    def __init__(self) -> None:
        self.on = False
        self.holders = 0
        self.lock = threading.Lock()


_switch = _Switch()


def activate() -> None:
    """Translate library calls in graphs traced from now on (counted: the plugin and ``explain`` may overlap)."""
    _install_once()
    with _switch.lock:
        _switch.holders += 1
        _switch.on = True


def deactivate() -> None:
    """Undo one :func:`activate`; with none left, Dynamo traces the libraries' own calls again."""
    with _switch.lock:
        _switch.holders = max(0, _switch.holders - 1)
        _switch.on = _switch.holders > 0


def _window(left, right, causal: bool) -> tuple[int, int] | str:
    """FA4's ``window_size`` (None or a negative pair: unbounded) with ``causal`` as our ops take it (-1 unbounded;
    causal implies a right side of 0), or why not."""
    if left is not None and right is not None and left < 0 and right < 0:
        left = right = None
    if causal:
        right = None
    for side, value in (("left", left), ("right", right)):
        if value is not None and value < 0:
            return f"window_size {side} side {value} with the other side bounded: FA4's own reading of it is kept"
    return (-1 if left is None else left, -1 if right is None else right)


# Arguments that change what FA4 computes and that our ops don't take: a call that sets one keeps FA4's own call.
_UNSERVED = ("qv", "gather_kv_indices", "learnable_sink", "score_mod", "score_mod_bwd", "mask_mod", "aux_tensors",
             "aux_scalars", "block_sparse_tensors", "block_sparse_tensors_bwd", "scales", "config", "page_table",
             "seqused_q", "min_seqlen_k", "scheduler_metadata", "seqlen_k_per_split", "gather_bwd_token_chunk",
             "block_table")


def _common_reason(params: dict) -> str | None:
    """Why our ops can't compute this FA4 API call, or None: an argument they don't take, or a deterministic
    backward asked of a process whose deterministic algorithms are off (our backward follows
    ``torch.use_deterministic_algorithms``)."""
    for name in _UNSERVED:
        if params.get(name) is not None:
            return f"{name} is set: the fa4 ops don't take it; FA4's own call is kept"
    if params.get("gather_bwd_recompute_p"):
        return "gather_bwd_recompute_p is set: the fa4 ops don't take it; FA4's own call is kept"
    if params.get("dropout_p", 0.0) != 0.0:
        return f"dropout_p={params['dropout_p']}: FA4 has no dropout; the library's own call is kept"
    if params.get("return_attn_probs"):
        return "return_attn_probs=True: FA4 returns no attention probabilities; the library's own call is kept"
    query = params.get("q", params.get("qkv"))
    if query is not None and query.dtype not in FA4_DTYPES:
        return f"dtype {query.dtype}: the fa4 ops take float16/bfloat16; the library's own call is kept"
    if params.get("deterministic") and not torch.are_deterministic_algorithms_enabled():
        return ("deterministic=True while torch.use_deterministic_algorithms is off: the fa4 backward follows the "
                "latter; FA4's own call is kept")
    return None


def _scale(params: dict, q) -> float:
    scale = params.get("softmax_scale")
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _dense_call(params: dict):
    """``flash_attn_func`` → ``fa4.flash_attn_fwd`` on the same B,S,H,D tensors, or a reason."""
    reason = _common_reason(params)
    q = params["q"]
    if reason is None and q.dim() != 4:
        reason = f"q is {q.dim()}-D: flash_attn_func takes (B, S, H, D)"
    window = _window(*params["window_size"], params["causal"]) if reason is None else reason
    if isinstance(window, str):
        return window
    return lambda: torch.ops.fa4.flash_attn_fwd(q, params["k"], params["v"], _scale(params, q), params["causal"],
                                                *window, params["softcap"] or 0.0)


def _varlen_call(params: dict):
    """``flash_attn_varlen_func`` on packed tokens → ``fa4.flash_attn_varlen_fwd``, or a reason."""
    reason = _common_reason(params)
    q = params["q"]
    if reason is None and (params["cu_seqlens_q"] is None or params["cu_seqlens_k"] is None or q.dim() != 3):
        reason = "not packed tokens with cu_seqlens_q and cu_seqlens_k (the batch form): FA4's own call is kept"
    window = _window(*params["window_size"], params["causal"]) if reason is None else reason
    if isinstance(window, str):
        return window
    return lambda: torch.ops.fa4.flash_attn_varlen_fwd(
        q, params["k"], params["v"], params["cu_seqlens_q"], params["cu_seqlens_k"], params["max_seqlen_q"],
        params["max_seqlen_k"], _scale(params, q), params["causal"], *window, params["softcap"] or 0.0,
        params["seqused_k"])


@dataclasses.dataclass(frozen=True)
class LibraryFunction:
    """A library's attention function and how a call of it becomes an fa4 op: ``translate(arguments)`` returns a
    thunk making the op call, or the reason the call keeps its own implementation."""

    module: str
    name: str
    translate: Callable[[dict], Callable | str]

    @property
    def api(self) -> str:
        """The pattern name sites of this function are recorded under."""
        return f"{self.module.removesuffix('.interface').removesuffix('.flash_attn_interface')}.{self.name}"


def _fa2_operands(params: dict) -> tuple:
    """q, k, v of an FA2 call, unpacked from ``qkv`` (…, 3, H, D) or ``kv`` (…, 2, H_kv, D) where given."""
    if "qkv" in params:
        return params["qkv"].unbind(-3)
    if "kv" in params:
        return (params["q"], *params["kv"].unbind(-3))
    return params["q"], params["k"], params["v"]


def _fa2_call(params: dict):
    """An FA2 ``flash_attn_*func`` → the fa4 op (FA2's windows: a negative side is unbounded, as in our ops; causal
    sets the right side to 0), its output alone as FA2 returns it; or a reason."""
    reason = _common_reason(params)
    left, right = params["window_size"]
    window = (max(left, -1), -1 if params["causal"] else max(right, -1))
    varlen = "cu_seqlens_q" in params or "cu_seqlens" in params
    slopes = params["alibi_slopes"]
    if reason is None and slopes is not None:
        heads = (params["qkv"] if "qkv" in params else params["q"]).shape[-2]
        reason = alibi_reason(slopes, params["causal"], varlen, params["softcap"], heads)
    if reason is not None:
        return reason

    def call():
        q, k, v = _fa2_operands(params)
        scale = _scale(params, q)
        if slopes is not None:  # FA2's causal ALiBi is the op's bias (see library_ops.alibi_reason)
            return torch.ops.fa4.flash_attn_alibi_fwd(q, k, v, slopes, scale, True, window[0], -1)[0]
        if not varlen:
            return torch.ops.fa4.flash_attn_fwd(q, k, v, scale, params["causal"], *window, params["softcap"])[0]
        cu_q, cu_k = (params["cu_seqlens"],) * 2 if "cu_seqlens" in params else (params["cu_seqlens_q"],
                                                                                  params["cu_seqlens_k"])
        max_q, max_k = (params["max_seqlen"],) * 2 if "max_seqlen" in params else (params["max_seqlen_q"],
                                                                                   params["max_seqlen_k"])
        return torch.ops.fa4.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, params["causal"], *window,
                                                   params["softcap"])[0]

    return call


_KV_CACHE_UNSERVED = ("k", "v", "rotary_cos", "cache_batch_idx", "cache_leftpad", "block_table", "alibi_slopes")


def _kv_cache_call(params: dict):
    """FA2's ``flash_attn_with_kvcache`` reading a contiguous cache (B, S_cache, H_kv, D), each row's first
    ``cache_seqlens[b]`` keys → ``fa4.flash_attn_fwd`` with them as ``seqused_k``; or a reason. FA2 aligns a causal
    or windowed mask to each row's cache length, our op to the whole cache: those agree only for one query per row
    under causal and no window."""
    given = next((name for name in _KV_CACHE_UNSERVED if params.get(name) is not None), None)
    if given is not None:
        return (f"{given} is set: flash_attn_with_kvcache then writes into the cache in place, rotates, gathers or "
                "biases; not served, the library's own call is kept")
    reason = _common_reason(params)
    if reason is not None:
        return reason
    q, k_cache = params["q"], params["k_cache"]
    if tuple(params["window_size"]) != (-1, -1) or (params["causal"] and q.shape[1] != 1):
        return ("a causal mask over several queries or a window, aligned to each row's cache length: not served; the "
                "library's own call is kept")
    lengths = params["cache_seqlens"]

    def call():
        used = lengths
        if isinstance(used, int):
            used = torch.full((q.shape[0],), used, dtype=torch.int32, device=q.device)
        elif used is not None:
            used = used.to(torch.int32)
        out, lse = torch.ops.fa4.flash_attn_fwd(q, k_cache, params["v_cache"], _scale(params, q), False, -1, -1,
                                                params["softcap"], used)
        return (out, lse) if params.get("return_softmax_lse") else out

    return call


_FA2 = "flash_attn.flash_attn_interface"
FUNCTIONS = (
    LibraryFunction("flash_attn.cute.interface", "flash_attn_func", _dense_call),
    LibraryFunction("flash_attn.cute.interface", "flash_attn_varlen_func", _varlen_call),
    *(LibraryFunction(_FA2, name, _fa2_call) for name in (
        "flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
        "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func")),
    LibraryFunction(_FA2, "flash_attn_with_kvcache", _kv_cache_call),
)


def _substitute(function: LibraryFunction, original: Callable) -> Callable:
    """What Dynamo traces in place of ``original``: the fa4 op call, or ``original`` itself (not traced: a graph
    break) once the reason is recorded."""
    signature = inspect.signature(original)
    names = list(signature.parameters)
    defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}
    own_call = torch.compiler.disable(original)
    api, translate = function.api, function.translate  # what Dynamo reads while tracing: plain values

    def substitute(*args, **kwargs):
        if not _switch.on:
            return own_call(*args, **kwargs)
        params = dict(defaults)
        params.update(zip(names, args))
        params.update(kwargs)
        translated = translate(params)
        if isinstance(translated, str):
            call_while_tracing(_LEFT, api, translated)
            return own_call(*args, **kwargs)
        with fx_traceback.annotate({ANNOTATION: api}):
            return translated()

    return substitute


_installed: set[LibraryFunction] = set()
_install_lock = threading.Lock()


def _install_once() -> None:
    """Register with Dynamo the substitutes of the library functions importable now and not registered before (a
    registration can't be undone, so each consults the switch)."""
    with _install_lock:
        for function in FUNCTIONS:
            if function in _installed:
                continue
            try:
                original = getattr(importlib.import_module(function.module), function.name)
            except (ImportError, AttributeError) as exc:
                log.debug("fa4_inductor: %s not importable (%s): its calls are not translated", function.api, exc)
                continue
            try:
                torch.compiler.substitute_in_graph(original, skip_signature_check=True)(_substitute(function, original))
            except ValueError as exc:  # Dynamo already has a rule for it (another library's substitute)
                log.warning("fa4_inductor: %s keeps Dynamo's existing rule (%s): its calls are not translated",
                            function.api, exc)
            _installed.add(function)


_TRANSLATED_OPS = ("flash_attn_fwd", "flash_attn_varlen_fwd", "flash_attn_alibi_fwd")


def _op(node: torch.fx.Node) -> str | None:
    """The fa4 op a call node makes (the op or one of its overloads), else None."""
    target = node.target if node.op == "call_function" else None
    packet = getattr(target, "overloadpacket", target)
    return getattr(packet, "__name__", None) if getattr(packet, "_qualified_op_name", "").startswith("fa4::") else None


def records(graph: torch.fx.Graph, graph_name: str, location_of) -> list[stats.SiteRecord]:
    """A record of every library call in ``graph`` that became an fa4 op; ``location_of(node)`` gives (file:line,
    module path)."""
    found = []
    for node in graph.nodes:
        api = (node.meta.get("custom") or {}).get(ANNOTATION)
        if api and _op(node) in _TRANSLATED_OPS:
            location, module_path = location_of(node)
            found.append(stats.SiteRecord(graph=graph_name, node=node.name, target=api, pattern=api, decision="fa4",
                                          reason=None, location=location, module_path=module_path,
                                          features=_features(node)))
    return found


_LEFT = "fa4_inductor.library_call_left"
_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parents[1]) + os.sep
_left_sinks: list[Callable[[stats.SiteRecord], None]] = []


@contextlib.contextmanager
def reporting_left_calls_to(sink: Callable[[stats.SiteRecord], None]) -> Iterator[None]:
    """Send the records of library calls kept as written to ``sink`` during the block (``explain``), not to
    :func:`stats.record_site`."""
    _left_sinks.append(sink)
    try:
        yield
    finally:
        _left_sinks.remove(sink)


def _record_left(backtrace: str, api: str, reason: str) -> None:
    """Record a library call that keeps its own implementation (called while Dynamo traces it)."""
    record = stats.SiteRecord(graph="dynamo", node=api.rpartition(".")[2], target=api, pattern=api,
                              decision="fallback", reason=reason, location=user_location(backtrace, (_PACKAGE_DIR,)),
                              module_path=None, features={})
    (_left_sinks[-1] if _left_sinks else stats.record_site)(record)


on_trace(_LEFT, _record_left)


def _features(node: torch.fx.Node) -> dict:
    """What the fa4 op of a library call computes, for the record."""
    return call_features(node.target, schema_arguments(node))
