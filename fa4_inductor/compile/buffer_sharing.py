"""One masking buffer for all the calls of a graph that mask by the same data.

Every FA4 call masked by data makes its masking buffer with the
``fa4.masking_buffer`` op (:mod:`.masking_buffer`), and a model's layers all
mask by one padding mask. A training graph gets one buffer per step from
AOTAutograd's CSE; an inference graph gets no CSE, so each layer would make its
own (one Triton launch and ~50 µs of host time each). This post-grad pass
merges the buffer ops whose arguments compute the same values: the same
inputs through the same pure ops (each call's ``ne(mask, 0)`` of one mask).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch.fx import Graph, Node

import fa4_inductor.runtime.ops  # noqa: F401  (defines torch.ops.fa4)

from fa4_inductor._torch_private import is_pure_op


def _value_key(arg: Any, memo: dict[Node, Hashable]) -> Hashable:
    """What ``arg`` computes, as a hashable: a pure call by its target and its arguments' keys, any other node by
    itself."""
    if isinstance(arg, Node):
        if arg not in memo:
            pure = arg.op == "call_function" and is_pure_op(arg.target)
            memo[arg] = (arg.target, _value_key(arg.args, memo), _value_key(arg.kwargs, memo)) if pure else arg
        return memo[arg]
    if isinstance(arg, (list, tuple)):
        return tuple(_value_key(a, memo) for a in arg)
    if isinstance(arg, dict):
        return tuple(sorted((name, _value_key(value, memo)) for name, value in arg.items()))
    return arg


def share_masking_buffers(graph: Graph) -> int:
    """Let every ``fa4.masking_buffer`` call computing what an earlier one computes use the earlier one's result;
    return how many calls were merged."""
    first: dict[Hashable, Node] = {}
    memo: dict[Node, Hashable] = {}
    merged = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.fa4.masking_buffer.default:
            try:
                kept = first.setdefault(_value_key(node, memo), node)
            except TypeError:  # an argument that can't be hashed (a symbolic scalar): left alone
                continue
            if kept is not node:
                node.replace_all_uses_with(kept)
                merged.append(node)
    for node in merged:
        graph.erase_node(node)
    if merged:
        graph.eliminate_dead_code()
    return len(merged)
