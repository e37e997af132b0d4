"""FX helpers every compile-time module reads graphs with; imports nothing from the package."""

from __future__ import annotations

import operator
import os
from typing import Any

import torch
from torch.fx import Node


def example_value(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (or the constant itself)."""
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def op_name(node: Any) -> str | None:
    """The method or function name a call node invokes (``"transpose"``, ``"le"``; an aten overload by its op's
    name, ``aten.mul.Scalar`` as ``"mul"``), else None."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._opname
        return getattr(node.target, "__name__", None)
    return None


def tuple_reads(node: Node) -> tuple[frozenset[int], bool]:
    """The indices of ``node``'s tuple result the graph reads through ``getitem``, and whether it uses the tuple
    any other way."""
    indices, whole = set(), False
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            indices.add(user.args[1])
        else:
            whole = True
    return frozenset(indices), whole


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def user_location(stack_trace: str | None, skip: tuple[str, ...] = ()) -> str | None:
    """'file:line' of the innermost frame of a Python stack trace (as Dynamo records it in ``node.meta``) outside
    torch itself and the directories in ``skip`` (``flex_attention`` calls its op from torch's own code), else of
    the innermost frame."""
    frames = []
    for line in (stack_trace or "").splitlines():
        line = line.strip()
        if line.startswith('File "'):
            path, _, rest = line[len('File "'):].partition('", line ')
            frames.append((path, f"{path}:{rest.split(',')[0]}"))
    outside = [location for path, location in frames if not path.startswith((_TORCH_DIR, *skip))]
    return (outside or [location for _, location in frames] or [None])[-1]
