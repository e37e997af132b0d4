"""Build FA4 calls inside an FX graph, with fake-tensor metadata.

Patterns see attention in SDPA's B,H,S,D layout; FA4 takes B,S,H,D. The
emitted code is ``transpose(1, 2)`` views around ``fa4.flash_attn_fwd``:
for the usual ``view(B, S, H, D).transpose(1, 2)`` inputs the transposes
cancel, so FA4 reads the projection output in place, and the caller's
``transpose(1, 2).reshape(B, S, H * D)`` of the result is a view of FA4's
contiguous output. No copies are added around the kernel.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import sympy
import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

import fa4_inductor.runtime.ops  # noqa: F401  (defines torch.ops.fa4)
from fa4_inductor.compile.fx_utils import example_value
from fa4_inductor.compile.sites import (FA4Params, FixedBlocks, GraphScale, KeyBias, OffsetChain, Operand,
                                        RelativeBias, SiteDecision)


def call_with_meta(graph: Graph, target, args: tuple, kwargs: dict | None = None, *, like: Node | None = None) -> Node:
    """Insert ``target(*args, **kwargs)`` and record its fake result as metadata (a factory function with no tensor
    argument runs in the fake mode of ``like``'s value)."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fake_args = [torch.fx.node.map_aggregate(a, example_value) for a in args]
    fake_kwargs = {k: torch.fx.node.map_aggregate(v, example_value) for k, v in kwargs.items()}
    fake_mode = next((getattr(a, "fake_mode", None) for a in (*fake_args, *fake_kwargs.values(), example_value(like))
                      if getattr(a, "fake_mode", None)), None)
    if fake_mode is not None:
        with fake_mode:
            node.meta["example_value"] = target(*fake_args, **fake_kwargs)
    elif not any(isinstance(a, torch.Tensor) for a in (*fake_args, *fake_kwargs.values())):
        node.meta["example_value"] = target(*fake_args, **fake_kwargs)  # scalar (SymFloat) arithmetic
    return node


def fa4_attention(
    graph: Graph,
    query: Node,
    key: Node,
    value: Node,
    params: dict[str, Any],
    *,
    op=None,
    after_qkv: tuple = (),
) -> tuple[Node, Node]:
    """Emit FA4 attention on B,H,S,D nodes; return (out B,H,S,Dv node, lse node).

    ``op`` (default ``torch.ops.fa4.flash_attn_fwd``) is called on the B,S,H,D views of q, k, v, then
    ``after_qkv``, with ``params`` as keyword arguments (softmax_scale, causal, window_left, window_right,
    softcap, seqused_k for the default). Call inside ``graph.inserting_before(...)``.
    """
    q, k, v = (call_with_meta(graph, torch.transpose, (t, 1, 2)) for t in (query, key, value))
    result = call_with_meta(graph, op or torch.ops.fa4.flash_attn_fwd.default, (q, k, v, *after_qkv), params)
    out_bshd = call_with_meta(graph, operator.getitem, (result, 0))
    lse = call_with_meta(graph, operator.getitem, (result, 1))
    return call_with_meta(graph, torch.transpose, (out_bshd, 1, 2)), lse


def fa4_attention_backward(
    graph: Graph,
    args: tuple[Node, ...],
    params: dict[str, Any],
) -> tuple[Node, Node, Node]:
    """Emit FA4 backward from B,H,S,D (dout, q, k, v, out) nodes and lse; return B,H,S,D grads."""
    *bhsd, lse = args
    bshd = [call_with_meta(graph, torch.transpose, (t, 1, 2)) for t in bhsd]
    result = call_with_meta(graph, torch.ops.fa4.flash_attn_bwd.default, (*bshd, lse), params)
    grads = (call_with_meta(graph, operator.getitem, (result, i)) for i in range(3))
    return tuple(call_with_meta(graph, torch.transpose, (g, 1, 2)) for g in grads)


def replace_tuple_outputs(node: Node, outputs: Mapping[int, Node]) -> None:
    """Make every ``node[i]`` the graph reads read ``outputs[i]`` instead, and erase ``node`` and its ``getitem``s
    (every user of ``node`` is one, as :func:`~fa4_inductor.compile.fx_utils.tuple_reads` checked; an index missing
    from ``outputs`` must be unread)."""
    for user in list(node.users):
        index = user.args[1]
        if index in outputs:
            user.replace_all_uses_with(outputs[index])
        elif user.users:
            raise AssertionError(f"{node.name}[{index}] is read and has no replacement")
        node.graph.erase_node(user)
    node.graph.erase_node(node)


def erase_if_unused(nodes: list[Node]) -> None:
    """Erase the given pure nodes, and their inputs in turn, once nothing uses them.

    Used to drop subgraphs a rewrite made dead (a mask the kernel now
    computes itself). Impure calls are kept, and so are in-place writes but
    those of a fresh tensor nothing else reads (``full(-inf).triu_(1)``).
    """
    from fa4_inductor.compile.graph_mutations import unobservable_write, written

    pending, erased = list(nodes), set()
    while pending:
        node = pending.pop()
        if node in erased or node.users or node.op not in ("call_function", "call_method") or node.is_impure():
            continue
        if written(node) and not unobservable_write(node):
            continue
        inputs = [n for n in node.all_input_nodes]
        node.graph.erase_node(node)
        erased.add(node)
        pending.extend(inputs)


# What the patterns decided, written: the only module that adds the FA4 calls and their operands to a graph.

def _emit_scale(graph: Graph, scale: float | Node | GraphScale) -> Any:
    """A scale as the op takes it: a :class:`GraphScale`'s arithmetic written into the graph, else as it is."""
    if not isinstance(scale, GraphScale):
        return scale
    value: Any = scale.number
    for factor in scale.factors:
        value = call_with_meta(graph, operator.mul, (value, factor))
    for divisor in scale.divisors:
        value = call_with_meta(graph, operator.truediv, (value, divisor))
    return value


def _size(graph: Graph, node: Node, dim: int):
    """``node``'s size along ``dim``: an int, or a graph scalar under dynamic shapes."""
    size = example_value(node).shape[dim]
    return size if isinstance(size, int) else call_with_meta(graph, torch.ops.aten.sym_size.int, (node, dim))


def _key_positions(graph: Graph, key: Node) -> Node:
    """``arange(S_kv)`` on the key's device."""
    return call_with_meta(graph, torch.arange, (_size(graph, key, 2),), {"device": example_value(key).device},
                          like=key)


def _padding_from_lengths(graph: Graph, lengths: Node, key: Node) -> Node:
    """The (B, S_kv) bool mask ``arange(S_kv) < lengths[:, None]``."""
    positions = _key_positions(graph, key)
    return call_with_meta(graph, torch.lt, (call_with_meta(graph, torch.unsqueeze, (positions, 0)),
                                            call_with_meta(graph, torch.unsqueeze, (lengths, 1))))


def _operand(graph: Graph, operand: Operand) -> Node:
    node = operand.source
    if operand.transposed:
        node = call_with_meta(graph, torch.transpose, (node, -2, -1))
    if operand.one_head:
        node = call_with_meta(graph, torch.unsqueeze, (node, 1))
    for head_scale in operand.head_scales:
        node = call_with_meta(graph, torch.div if head_scale.divides else torch.mul, (node, head_scale.factor))
    if operand.head_scales:  # a float32 factor promotes the product: FA4 reads q in its own dtype
        node = call_with_meta(graph, torch.Tensor.to, (node, example_value(operand.source).dtype))
    return node


def fa4_arguments(graph: Graph, params: FA4Params, query: Node, key: Node) -> dict[str, Any]:
    """``params`` as the keyword arguments of ``fa4.flash_attn_fwd`` after q, k, v (masks and scales written as the
    nodes FA4 takes). Call inside ``graph.inserting_before(...)``."""
    scale = _emit_scale(graph, params.softmax_scale)
    padding = params.key_padding
    if padding is not None:  # a 0/1 or bool (B, S_kv) or (B, 1, 1, S_kv) input: FA4 takes bool (B, S_kv)
        padding = call_with_meta(graph, torch.eq if params.key_padding_hides else torch.ne, (padding, 0))
        if example_value(padding).dim() > 2:
            padding = call_with_meta(graph, torch.flatten, (padding, 1))
    if params.key_lengths is not None:  # (B,) lengths: keys below them are kept
        padding = _padding_from_lengths(graph, params.key_lengths, key)
    segments = params.segment_ids
    if isinstance(segments, FixedBlocks):
        # Truncation is floor division on positions (>= 0); Inductor's CPU code for ``arange(n) // c`` leaves the
        # entries past its last full vector unwritten (torch 2.13 and 2.15), truncation's is right.
        segments = call_with_meta(graph, torch.div, (_key_positions(graph, key), segments.size),
                                  {"rounding_mode": "trunc"})
    if segments is not None and example_value(segments).dim() == 1:  # ids shared by every row
        segments = call_with_meta(graph, torch.Tensor.expand, (
            call_with_meta(graph, torch.unsqueeze, (segments, 0)), _size(graph, query, 0), -1))
    return dict(softmax_scale=scale, causal=params.causal, window_left=params.window_left,
                window_right=params.window_right, softcap=params.softcap, seqused_k=None, key_padding=padding,
                segment_ids=segments)


def _data_mask_attention(graph: Graph, query: Node, key: Node, value: Node, params: FA4Params) -> tuple[Node, Node]:
    """``fa4.flash_attn_data_mask`` on B,H,S,D nodes: (out B,H,S,Dv, lse)."""
    return fa4_attention(graph, query, key, value, {"softcap": params.softcap, "mask_hides": params.data_mask_hides},
                         op=torch.ops.fa4.flash_attn_data_mask.default,
                         after_qkv=(params.data_mask, _emit_scale(graph, params.softmax_scale)))


def _per_head(graph: Graph, expression, heads: Node, slopes: Node | None):
    """The graph computing a sympy expression of the head index (``heads``: ``arange(H)`` in float32) and the
    ``slope`` symbol (``slopes``, read at every head): a float32 (H,) node."""
    if expression.is_number:
        return call_with_meta(graph, torch.full_like, (heads, float(expression)))
    if isinstance(expression, sympy.Symbol):
        return slopes if expression.name == "slope" else heads
    parts = [_per_head(graph, arg, heads, slopes) if not arg.is_number else float(arg) for arg in expression.args]
    if isinstance(expression, sympy.Add):
        operation = operator.add
    elif isinstance(expression, sympy.Mul):
        operation = operator.mul
    elif isinstance(expression, sympy.Pow):
        operation = operator.pow
    else:
        raise AssertionError(f"ALiBi slope {expression}: the analysis admits sums, products and powers only")
    result = parts[0]
    for part in parts[1:]:
        result = call_with_meta(graph, operation, (result, part), like=heads)
    return result


def _slopes_per_head(graph: Graph, alibi, query: Node) -> Node | None:
    """The analysis's slopes tensor as a float32 (H,) node: read at its ``slopes_index`` where it has one (the
    head's axis taken whole; one entry shared by every head broadcast)."""
    if alibi.slopes is None or alibi.slopes_index is None:
        return alibi.slopes
    index = tuple(slice(None) if i is None else i for i in alibi.slopes_index)
    read = call_with_meta(graph, operator.getitem, (alibi.slopes, index)) if index else alibi.slopes
    read = call_with_meta(graph, torch.reshape, (read, (-1,)))
    read = call_with_meta(graph, torch.Tensor.expand, (read, _size(graph, query, 1)))
    return call_with_meta(graph, torch.Tensor.to, (call_with_meta(graph, torch.Tensor.contiguous, (read,)),
                                                   torch.float32))


def _relative_table(graph: Graph, bias: RelativeBias, query: Node, key: Node) -> Node:
    """The (H, S_q + S_kv - 1) float32 table of a bias that depends on the head and ``kv_idx - q_idx`` only, entry
    ``d + S_q - 1`` for offset ``d``: the bias's own ops run on the row of offsets where the analysis found them
    (O(S) work), else read from the bias where each offset first occurs (row ``max(0, -d)``, column ``max(0, d)``)."""
    sizes = [_size(graph, query, 0), _size(graph, query, 1), _size(graph, query, 2), _size(graph, key, 2)]
    first = 1 - sizes[2] if isinstance(sizes[2], int) else call_with_meta(graph, operator.sub, (1, sizes[2]))
    if bias.table_start is not None:  # the analysis checked that the table covers every offset
        length = call_with_meta(graph, operator.sub, (sizes[3], first)) if not all(
            isinstance(s, int) for s in (first, sizes[3])) else sizes[3] - first
        start = first + bias.table_start if isinstance(first, int) else call_with_meta(
            graph, operator.add, (first, bias.table_start))
        table = call_with_meta(graph, torch.narrow, (bias.values, 1, start, length))
        return call_with_meta(graph, torch.Tensor.contiguous, (table,))
    offsets = call_with_meta(graph, torch.arange, (first, sizes[3]), {"device": example_value(query).device},
                             like=query)
    if bias.chain is not None:
        values = _on_offsets(graph, bias.chain, offsets)
        sizes[2:], query_rows, columns = [1, _size(graph, offsets, 0)], 0, slice(None)
    else:
        values = _unfolded_values(graph, bias, query)
        query_rows = call_with_meta(graph, torch.clamp_min, (call_with_meta(graph, torch.neg, (offsets,)), 0))
        columns = call_with_meta(graph, torch.clamp_min, (offsets, 0))
    if bias.dtype is not None:
        values = call_with_meta(graph, torch.Tensor.to, (values, bias.dtype))
    values = call_with_meta(graph, torch.select, (call_with_meta(graph, torch.Tensor.expand, (values, *sizes)), 0, 0))
    table = call_with_meta(graph, operator.getitem, (values, (slice(None), query_rows, columns)))
    return _scaled(graph, call_with_meta(graph, torch.Tensor.to, (table, torch.float32)), bias.scale)


def _scaled(graph: Graph, table: Node, scale: float) -> Node:
    return table if scale == 1.0 else call_with_meta(graph, operator.mul, (table, scale))


def _key_table(graph: Graph, bias: KeyBias, query: Node, key: Node) -> Node:
    """The (B, H, S_kv) float32 table of a bias that is the same for every query: its first query row (summed with
    the first rows of the biases added with it)."""
    sizes = [_size(graph, query, 0), _size(graph, query, 1), _size(graph, query, 2), _size(graph, key, 2)]
    values = _unfolded_values(graph, bias, query)
    if bias.dtype is not None:
        values = call_with_meta(graph, torch.Tensor.to, (values, bias.dtype))
    values = call_with_meta(graph, torch.select, (call_with_meta(graph, torch.Tensor.expand, (values, *sizes)), 2, 0))
    table = _scaled(graph, call_with_meta(graph, torch.Tensor.to, (values, torch.float32)), bias.scale)
    for part in bias.plus:
        table = call_with_meta(graph, operator.add, (table, _key_table(graph, part, query, key)))
    return call_with_meta(graph, torch.Tensor.contiguous, (table,))


def _unfolded_values(graph: Graph, bias: RelativeBias | KeyBias, query: Node) -> Node:
    """The bias's values broadcasting to (B, H, S_q, S_kv): a (B * H, ...) tensor whose heads are folded into its first
    axis split into (B, H, ...) (one of size 1 given a head axis of size 1)."""
    values, example = bias.values, example_value(bias.values)
    if not bias.folded or example.dim() < 3:  # fewer axes than (B * H, S_q, S_kv): nothing folded
        return values
    if statically_known_true(example.shape[-3] == 1):
        return call_with_meta(graph, torch.unsqueeze, (values, -3))
    return call_with_meta(graph, torch.unflatten, (values, -3, (-1, _size(graph, query, 1))))


def _on_offsets(graph: Graph, chain: OffsetChain, offsets: Node) -> Node:
    """``chain``'s ops run again with its (S_q, S_kv) relative positions replaced by the (1, S_q + S_kv - 1) row
    ``offsets + start``: the bias with a query axis of size 1 and the offsets along the keys."""
    row = call_with_meta(graph, torch.unsqueeze, (offsets, 0))
    if chain.start:
        row = call_with_meta(graph, operator.add, (row, chain.start))
    copies = {chain.positions: call_with_meta(graph, torch.Tensor.to, (row, example_value(chain.positions).dtype))}
    for node in chain.ops:
        target = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
        args, kwargs = (torch.fx.node.map_arg(a, lambda n: copies.get(n, n)) for a in (node.args, node.kwargs))
        copies[node] = call_with_meta(graph, target, args, kwargs)
    return copies[chain.ops[-1]]


def _position_bias_attention(graph: Graph, query: Node, key: Node, value: Node, params: FA4Params
                             ) -> tuple[Node, Node]:
    """``fa4.flash_attn_alibi_fwd`` (its slopes the analysis's ``slope(h)`` per head) or
    ``fa4.flash_attn_relative_bias_fwd`` (its table read from the bias) on B,H,S,D nodes, with the site's masks:
    (out B,H,S,Dv, lse)."""
    bias = params.position_bias
    if isinstance(bias, RelativeBias):
        op, aux = torch.ops.fa4.flash_attn_relative_bias_fwd.default, _relative_table(graph, bias, query, key)
    elif isinstance(bias, KeyBias):
        op, aux = torch.ops.fa4.flash_attn_key_bias_fwd.default, _key_table(graph, bias, query, key)
    else:
        heads = call_with_meta(graph, torch.arange, (_size(graph, query, 1),),
                               {"dtype": torch.float32, "device": example_value(query).device}, like=query)
        op, aux = torch.ops.fa4.flash_attn_alibi_fwd.default, _per_head(graph, bias.slope, heads,
                                                                      _slopes_per_head(graph, bias, query))
    masks = fa4_arguments(graph, params, query, key)  # key padding and segment ids as FA4 takes them
    options = {name: masks[name] for name in ("softmax_scale", "causal", "window_left", "window_right",
                                              "key_padding", "segment_ids")}
    return fa4_attention(graph, query, key, value, options, op=op, after_qkv=(aux,))


def emit_fa4(decision: SiteDecision, before: Node) -> tuple[Node, Node]:
    """Write the decided FA4 call before ``before``; return its (B,H,S,Dv output, logsumexp) nodes."""
    graph, operands = before.graph, decision.operands
    with graph.inserting_before(before):
        query, key, value = (_operand(graph, t) for t in (operands.query, operands.key, operands.value))
        if decision.params.data_mask is not None:
            return _data_mask_attention(graph, query, key, value, decision.params)
        if decision.params.position_bias is not None:
            return _position_bias_attention(graph, query, key, value, decision.params)
        return fa4_attention(graph, query, key, value, fa4_arguments(graph, decision.params, query, key))


def replace_with_fa4(decision: SiteDecision, output: Node) -> None:
    """Write the decided FA4 call before ``output``, route its users there, drop dead nodes."""
    replace_output(decision, output, emit_fa4(decision, output)[0])


def replace_output(decision: SiteDecision, output: Node, new: Node) -> None:
    """Route ``output``'s users to ``new``, erase it and the nodes the decision made dead."""
    output.replace_all_uses_with(new)
    output.graph.erase_node(output)
    erase_if_unused([*decision.operands.dead, *decision.operands.replaced])


def replace_library_op(decision) -> Node:
    """Write ``decision.op`` (an fa4 op, a :class:`~fa4_inductor.compile.library_ops.LibraryOpDecision`'s) in place
    of the library op node, its (out, lse) read where the node's outputs 0 and 1 were; return the op's node."""
    node = decision.node
    with node.graph.inserting_before(node):
        call = call_with_meta(node.graph, decision.op, (), decision.arguments)
        outputs = {i: call_with_meta(node.graph, operator.getitem, (call, i)) for i in (0, 1)}
    call.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack") if key in node.meta})
    bodies = [a for a in node.args if isinstance(a, Node) and a.op == "get_attr"]  # an autograd.Function's
    replace_tuple_outputs(node, outputs)
    for body in bodies:
        if not body.users:
            node.graph.erase_node(body)
    return call
