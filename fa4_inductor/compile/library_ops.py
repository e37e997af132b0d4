"""FA2's and FA3's custom ops found in a graph become the ``fa4`` ops, when FA4 computes the same thing.

FlashAttention-2 registers its kernels as ``torch.library`` custom ops (``flashattn::_flash_attn_forward``,
``flashattn::_flash_attn_varlen_forward``) called from ``autograd.Function``\\ s; Dynamo inlines those where no
gradient is needed (inference), so the op is a node of the graph, and traces them whole in training (an
``autograd_function_apply`` whose forward subgraph calls the op): a function that only calls the op on its inputs
and returns its output is replaced as a whole by the fa4 op, which is differentiable itself. FlashAttention-3
(``hopper/``) registers ``flash_attn_3::_flash_attn_forward`` with its autograd, so its node is in training graphs
too. A node whose arguments FA4 serves (no dropout, ALiBi slopes only under causal masking, no paged or appended KV,
no FP8 descales; FA2's windows, where -1 is unbounded as in our ops; softcap; GQA; varlen with ``cu_seqlens``) and
whose extra outputs (FA2's softmax sample and RNG state, FA3's split accumulators) nothing reads is decided here
(:func:`decide`, which writes nothing); :func:`fa4_inductor.compile.emit.replace_library_op` writes the fa4 op in
its place. The others stay, with a reason. These ops exist only where the libraries are installed (CUDA builds), so
the nodes are found by their qualified names.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable

import torch
from torch.fx import Node

from fa4_inductor.compile.fx_utils import example_value, tuple_reads
from fa4_inductor.compile.sites import RewriteContext
from fa4_inductor.runtime.support import AttentionCall, unsupported_reason


@dataclasses.dataclass(frozen=True)
class LibraryOpDecision:
    """What a library op node becomes: ``op`` (an fa4 op) called with ``arguments`` (its schema's names), whose
    (out, lse) replace the node's outputs 0 and 1; or the ``reason`` it stays."""

    node: Node
    api: str
    op: Callable | None = None
    arguments: dict | None = None
    reason: str | None = None

    @property
    def features(self) -> dict:
        """What the fa4 op computes, for the site's record."""
        return call_features(self.op, self.arguments) if self.reason is None else {}


def call_features(op, arguments: dict) -> dict:
    """The features of an fa4 attention op call (``arguments`` by its schema's names) a site record shows."""
    features = {"op": op.overloadpacket.__name__ if hasattr(op, "overloadpacket") else op.__name__,
                "causal": arguments["causal"], "window": (arguments["window_left"], arguments["window_right"]),
                "softcap": arguments.get("softcap") or None, "packed": "cu_seqlens_q" in arguments,
                "alibi": "slopes" in arguments}
    q = example_value(arguments["q"])
    if isinstance(q, torch.Tensor):
        features["dtype"] = str(q.dtype).removeprefix("torch.")
    return features


def _schema(target) -> torch.FunctionSchema | None:
    """The schema of an op overload, or of a packet's default overload (Dynamo records calls by packet)."""
    return getattr(target, "_schema", None) or getattr(getattr(target, "default", None), "_schema", None)


def schema_arguments(node: Node) -> dict:
    """An op node's arguments by schema name, defaults filled in."""
    schema = _schema(node.target)
    given = dict(zip((a.name for a in schema.arguments), node.args)) | dict(node.kwargs)
    return {a.name: given[a.name] if a.name in given else a.default_value for a in schema.arguments}


def _scale(scale, q: Node) -> float:
    return 1.0 / math.sqrt(example_value(q).shape[-1]) if scale is None else scale


def _set(arguments: dict, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` given a value (not None), or None."""
    return next((name for name in names if arguments.get(name) is not None), None)


def alibi_reason(slopes, causal: bool, varlen: bool, softcap, heads: int) -> str | None:
    """Why FA2's ``alibi_slopes`` (a bias ``-slope[h] * |i + S_k - S_q - j|``) can't go to ``fa4.flash_attn_alibi_fwd``,
    or None. Under causal masking the visible keys have ``j <= i + S_k - S_q``, where the bias is the op's linear
    ``slope[h] * (j - i - (S_k - S_q))``; without it the absolute value is no linear bias."""
    if not causal:
        return "alibi_slopes without causal: FA2's bias -slope·|i - j| is not linear in j, which FA4's ALiBi is"
    if varlen:
        return "alibi_slopes on packed sequences (varlen): not served"
    if slopes.dim() != 1 or slopes.dtype != torch.float32 or slopes.shape[0] != heads:
        return (f"alibi_slopes of shape {tuple(slopes.shape)} ({slopes.dtype}) for {heads} heads: served as one "
                "float32 slope per head")
    if softcap:
        return "alibi_slopes with softcap: FA4 takes one score_mod"
    return None


def _fa4_call(arguments: dict, causal: bool, varlen: bool) -> tuple[Callable, dict]:
    """The fa4 op and its arguments for a call with FA2's argument names and window semantics."""
    if arguments.get("alibi_slopes") is not None:
        return torch.ops.fa4.flash_attn_alibi_fwd.default, dict(
            q=arguments["q"], k=arguments["k"], v=arguments["v"], slopes=arguments["alibi_slopes"],
            softmax_scale=_scale(arguments["softmax_scale"], arguments["q"]), causal=causal,
            window_left=max(arguments["window_size_left"], -1), window_right=-1)
    common = dict(softmax_scale=_scale(arguments["softmax_scale"], arguments["q"]), causal=causal,
                  window_left=max(arguments["window_size_left"], -1),
                  window_right=max(arguments["window_size_right"], -1),
                  softcap=arguments["softcap"] or 0.0, seqused_k=arguments.get("seqused_k"))
    qkv = {name: arguments[name] for name in ("q", "k", "v")}
    if not varlen:
        return torch.ops.fa4.flash_attn_fwd.default, qkv | common
    lengths = {name: arguments[name] for name in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")}
    return torch.ops.fa4.flash_attn_varlen_fwd.default, qkv | lengths | common


def _fa2_reason(arguments: dict, varlen: bool) -> str | None:
    if arguments["dropout_p"] != 0.0:
        return f"dropout_p={arguments['dropout_p']}: FA4 has no dropout"
    slopes = arguments["alibi_slopes"]
    reason = alibi_reason(example_value(slopes), arguments["causal"], varlen, arguments["softcap"],
                          example_value(arguments["q"]).shape[-2]) if slopes is not None else None
    if reason:
        return reason
    if arguments["return_softmax"]:
        return "return_softmax=True: FA4 returns no attention probabilities"
    unserved = _set(arguments, ("block_table", "leftpad_k"))
    return f"{unserved} is set: paged or left-padded KV is not served" if unserved else None


def _fa2_forward(arguments: dict):
    return _fa2_reason(arguments, varlen=False) or _fa4_call(arguments, arguments["causal"], varlen=False)


def _fa2_varlen_forward(arguments: dict):
    return _fa2_reason(arguments, varlen=True) or _fa4_call(arguments, arguments["causal"], varlen=True)


_FA3_UNSERVED = ("k_new", "v_new", "qv", "out_", "cu_seqlens_k_new", "seqused_q", "page_table", "kv_batch_idx",
                 "leftpad_k", "rotary_cos", "rotary_sin", "seqlens_rotary", "q_descale", "k_descale", "v_descale",
                 "scheduler_metadata")


def _fa3_forward(arguments: dict):
    unserved = _set(arguments, _FA3_UNSERVED)
    if unserved:
        return f"{unserved} is set: the fa4 ops don't take it"
    if arguments["attention_chunk"]:
        return f"attention_chunk={arguments['attention_chunk']}: chunked attention is not served"
    varlen = arguments["cu_seqlens_q"] is not None
    if varlen != (arguments["cu_seqlens_k"] is not None):
        return "only one of cu_seqlens_q and cu_seqlens_k is set"
    if not varlen and arguments["seqused_k"] is not None:
        return "seqused_k without cu_seqlens: FA4 aligns a causal or windowed mask to it, ours to the whole cache"
    return _fa4_call(arguments, arguments["causal"], varlen=varlen)


@dataclasses.dataclass(frozen=True)
class LibraryOp:
    """A library's attention op: its qualified name, the pattern name its sites are recorded under, and how a call
    becomes an fa4 op call (``translate(arguments)`` returns (op, arguments) or a reason)."""

    qualified_name: str
    api: str
    translate: Callable[[dict], tuple | str]


OPS = (
    LibraryOp("flashattn::_flash_attn_forward", "flash_attn (FA2) _flash_attn_forward", _fa2_forward),
    LibraryOp("flashattn::_flash_attn_varlen_forward", "flash_attn (FA2) _flash_attn_varlen_forward",
              _fa2_varlen_forward),
    LibraryOp("flash_attn_3::_flash_attn_forward", "flash_attn_3 (FA3) _flash_attn_forward", _fa3_forward),
)
_BY_NAME = {op.qualified_name: op for op in OPS}


def schema_name(node: Node) -> str | None:
    """The qualified name of the op a call node makes (``flashattn::_flash_attn_forward``), else None."""
    schema = _schema(node.target) if node.op == "call_function" else None
    return schema.name if schema is not None else None


def library_op(node: Node) -> LibraryOp | None:
    """The library op a call node makes, else None."""
    return _BY_NAME.get(schema_name(node))


def _support_reason(arguments: dict, context: RewriteContext) -> str | None:
    """:func:`unsupported_reason` for the call's q, k, v (B,S,H,D, or packed T,H,D as one row), read as SDPA's."""
    q, k, v = (example_value(arguments[name]) for name in ("q", "k", "v"))
    rows = [t[None] if t.dim() == 3 else t for t in (q, k, v)]
    call = AttentionCall.from_tensors(*(t.transpose(1, 2) for t in rows), enable_gqa=True)
    if context.assume_cuda:
        call = dataclasses.replace(call, device=torch.device("cuda"))
    return unsupported_reason(call, context.devices, arch_major=context.arch_major)


def inside_autograd_function(node: Node) -> tuple[LibraryOp, Node] | None:
    """(the library op, its node) inside an ``autograd.Function`` Dynamo traced whole (a training graph's
    ``autograd_function_apply``, its forward a subgraph), else None."""
    if node.op != "call_function" or node.target is not torch.ops.higher_order.autograd_function_apply:
        return None
    forward = getattr(node.graph.owning_module, node.args[0].target, None)
    inner = [n for n in forward.graph.nodes if library_op(n)] if isinstance(forward, torch.fx.GraphModule) else []
    return (library_op(inner[0]), inner[0]) if len(inner) == 1 else None


def in_function_body(node: Node) -> bool:
    """Is this library op node in the forward body of an ``autograd.Function`` (the graph returns (outputs, saved for
    backward), the op's results among the saved)? The function's own node in the outer graph decides it."""
    (result,) = [n.args[0] for n in node.graph.nodes if n.op == "output"]
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(part, tuple) for part in result)):
        return False
    return any(isinstance(saved, Node) and saved.args[:1] == (node,) for saved in result[1])


def _is_whole_output(value, op_node: Node, head_dim) -> bool:
    """Is ``value`` the op's output 0, or that sliced to its full head dim (FA2's ``out_padded[..., :d]``)?"""
    if not isinstance(value, Node) or value.op != "call_function" or value.target is not operator.getitem:
        return False
    source, index = value.args
    if source is op_node:
        return index == 0
    return (index == (Ellipsis, slice(None, head_dim, None)) and _is_whole_output(source, op_node, head_dim))


def _autograd_function_reason(node: Node, op_node: Node) -> str | dict:
    """The op's arguments in the outer graph (the function's inputs in place of the subgraph's placeholders), or why
    the function does more than call the op on its inputs and return the op's output."""
    forward = op_node.graph
    placeholders = [n for n in forward.nodes if n.op == "placeholder"]
    operands = dict(zip(placeholders, node.args[2:]))
    arguments = schema_arguments(op_node)
    for name, value in arguments.items():
        if isinstance(value, Node) and value not in operands:
            return (f"its op's {name} is computed inside the function (a head dim padded to 8, ...): "
                    + IN_AUTOGRAD_FUNCTION)
    (outputs, _saved), = [n.args[0] for n in forward.nodes if n.op == "output"]
    head_dim = example_value(arguments["q"]).shape[-1]
    if len(outputs) != 1 or not _is_whole_output(outputs[0], op_node, head_dim):
        return "the function returns more than its op's output: " + IN_AUTOGRAD_FUNCTION
    return {name: operands.get(value, value) for name, value in arguments.items()}


# Why a library op inside an autograd.Function stays.
IN_AUTOGRAD_FUNCTION = ("inside an autograd.Function Dynamo traced whole, which does more than call the op on its "
                        "inputs: not rewritten (the library's flash_attn_*func API calls are)")


def decide_autograd_function(node: Node, context: RewriteContext) -> LibraryOpDecision:
    """Decide an ``autograd_function_apply`` whose forward calls a library op (FA2's ``FlashAttnFunc``): the fa4 op
    (differentiable itself) in place of the whole function when the function only calls the op on its inputs and
    returns the op's output, or why it stays (writes nothing)."""
    library, op_node = inside_autograd_function(node)
    indices, whole = tuple_reads(node)
    if whole or not indices <= {0}:
        return LibraryOpDecision(node, library.api, reason="more than the function's output is read: "
                                 + IN_AUTOGRAD_FUNCTION)
    arguments = _autograd_function_reason(node, op_node)
    if isinstance(arguments, str):
        return LibraryOpDecision(node, library.api, reason=arguments)
    return _decided(node, library, arguments, context)


def decide(node: Node, context: RewriteContext) -> LibraryOpDecision:
    """Decide a library op node: the fa4 op call it becomes, or why it stays (writes nothing)."""
    library = library_op(node)
    indices, whole = tuple_reads(node)
    if whole:
        return LibraryOpDecision(node, library.api, reason="its result tuple is used whole, not read item by item")
    if not indices <= {0, 1}:
        return LibraryOpDecision(node, library.api, reason=f"outputs {sorted(indices - {0, 1})} are read (the "
                                 "softmax sample, RNG state or split accumulators): FA4 returns only out and lse")
    return _decided(node, library, schema_arguments(node), context)


def _decided(node: Node, library: LibraryOp, arguments: dict, context: RewriteContext) -> LibraryOpDecision:
    translated = library.translate(arguments)
    if isinstance(translated, str):
        return LibraryOpDecision(node, library.api, reason=translated)
    reason = _support_reason(arguments, context)
    if reason:
        return LibraryOpDecision(node, library.api, reason=reason)
    op, fa4_arguments = translated
    return LibraryOpDecision(node, library.api, op=op, arguments=fa4_arguments)
