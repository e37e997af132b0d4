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
from typing import Any

import torch
from torch.fx import Graph, Node

import fa4_inductor.runtime.ops  # noqa: F401  (defines torch.ops.fa4)
from fa4_inductor.compile.fx_utils import example_value


def call_with_meta(graph: Graph, target, args: tuple, kwargs: dict | None = None, *, like: Node | None = None) -> Node:
    """Insert ``target(*args, **kwargs)`` and record its fake result as metadata (a factory function with no tensor
    argument runs in the fake mode of ``like``'s value)."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fake_args = [example_value(a) for a in args]
    fake_mode = next((getattr(a, "fake_mode", None) for a in (*fake_args, example_value(like))
                      if getattr(a, "fake_mode", None)), None)
    fake_kwargs = {k: example_value(v) for k, v in kwargs.items()}
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
) -> tuple[Node, Node]:
    """Emit FA4 attention on B,H,S,D nodes; return (out B,H,S,Dv node, lse node).

    ``params`` are the keyword arguments of ``torch.ops.fa4.flash_attn_fwd``
    after q, k, v (softmax_scale, causal, window_left, window_right,
    softcap, seqused_k). Call inside ``graph.inserting_before(...)``.
    """
    q, k, v = (call_with_meta(graph, torch.transpose, (t, 1, 2)) for t in (query, key, value))
    result = call_with_meta(graph, torch.ops.fa4.flash_attn_fwd.default, (q, k, v), params)
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
