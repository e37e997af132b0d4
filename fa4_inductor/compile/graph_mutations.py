"""In-place writes in a Dynamo graph, and whether a rewrite reads a value they change.

A rewrite replaces the nodes between an attention site and its operands
(the scores chain of hand-written attention, a GQA repeat, the mask code)
by one FA4 call at the site, which reads the operands there. That computes
what the program computed only if no tensor those nodes stand for is
written in place between where the program read it and the site: the mask
analysis and the patterns model nodes as the pure functions their ops are.
Dynamo's graph keeps in-place ops as they were written (``x.masked_fill_``,
``x += y``, ``x[i] = y``, ``out=``), and a later reader of ``x`` reads the
node that made ``x``, not the in-place op. timm's ``Attention`` with a mask
builds ``bias = zeros_like(mask); bias.masked_fill_(~mask, -inf)`` and adds
``bias``: read as a pure ``zeros_like`` it is "no mask".

:class:`Mutations` indexes a graph's in-place writes by the storage they
write (a node seen through the views and maybe-aliasing casts that lead to
it); :meth:`Mutations.unsafe_read` names the first write a site's rewrite
would miss. Two kinds of writes are modeled, so allowed: an in-place op in
the chain the pattern reads as its out-of-place twin (``scores += mask``,
``full(-inf).triu_(1)``) whose input no one else reads, and a write the mask
analysis applied in order for every reader of the tensor it writes
(:class:`Modeled`: timm's ``masked_fill_`` of its bias).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable

import torch
from torch.fx import Graph, Node

from fa4_inductor.compile import modeled_ops
from fa4_inductor.compile.fx_utils import example_value, op_name

# Ops whose result may share its first tensor argument's memory: views, and conversions that return their input
# when there is nothing to convert (``contiguous``, ``to``, ``float``, ...), and dropout (an identity in eval mode).
_ALIASING = modeled_ops.DTYPE_CASTS | modeled_ops.BROADCASTS | {
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "mT", "mH", "T", "H", "adjoint",
    "squeeze", "unsqueeze", "flatten", "unflatten", "narrow", "select", "split", "chunk", "unbind", "tensor_split",
    "split_with_sizes", "diagonal", "as_strided", "detach", "alias", "real", "imag", "view_as_real",
    "view_as_complex", "unfold", "movedim", "moveaxis", "swapaxes", "swapdims", "contiguous", "short", "char",
    "byte", "getitem", "__getitem__", "dropout", "identity", "rearrange",
}
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "__setitem__"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul, operator.setitem}
# Methods ending in "_" that change a tensor's metadata, not its values.
_NOT_WRITES = {"requires_grad_", "share_memory_", "retain_grad_"}


def written(node: Node) -> list[Node]:
    """The tensors ``node`` writes in place (nodes of the graph), none for a pure op."""
    targets: list = []
    name = op_name(node) or ""
    trailing_underscore = name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES
    if node.op == "call_method":
        inplace = trailing_underscore or name in _INPLACE_DUNDERS
    elif node.op != "call_function":
        inplace = False
    elif isinstance(node.target, torch._ops.OpOverload):  # its schema says what it writes
        inplace = False
        for index, argument in enumerate(node.target._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                targets.append(node.args[index] if index < len(node.args) else node.kwargs.get(argument.name))
    elif getattr(node.target, "__module__", None) in ("_operator", "operator"):  # and_, or_: Python's names
        inplace = node.target in _INPLACE_OPERATORS
    else:
        inplace = trailing_underscore  # torch.relu_, torch.Tensor.masked_fill_
    if inplace or node.kwargs.get("inplace") is True:
        targets.append(node.args[0] if node.args else None)
    out = node.kwargs.get("out")
    targets.extend(out if isinstance(out, (tuple, list)) else [out])
    return [t for t in targets if isinstance(t, Node) and isinstance(example_value(t), torch.Tensor)]


def storage_root(node: Node) -> Node:
    """The node whose memory ``node`` may be (a view or a conversion that can return its input, recursively)."""
    while isinstance(node, Node) and op_name(node) in _ALIASING and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


@dataclasses.dataclass
class Modeled:
    """The writes an analysis applied, and which nodes it read each tensor for (each read seeing the writes before
    it): a write is modeled for the tensor it writes when every later reader the rewrite stands for is one of them."""

    writes: set[Node] = dataclasses.field(default_factory=set)
    readers: dict[Node, set[Node]] = dataclasses.field(default_factory=dict)

    def covers(self, write: Node, target: Node, covered: set[Node], position: dict[Node, int]) -> bool:
        """Did the analysis see ``write`` of ``target`` wherever a node in ``covered`` reads ``target`` after it?"""
        return write in self.writes and target in written(write) and all(
            user in self.readers.get(target, ()) for user in target.users
            if user in covered and position.get(user, -1) > position[write])


class Mutations:
    """The in-place writes of one graph, by the storage root they write and by the node they write, with each node's
    position."""

    def __init__(self, graph: Graph):
        self.position = {node: index for index, node in enumerate(graph.nodes)}
        self.writes: dict[Node, list[Node]] = {}
        self.direct: dict[Node, list[Node]] = {}
        for node in graph.nodes:
            for target in written(node):
                self.writes.setdefault(storage_root(target), []).append(node)
                self.direct.setdefault(target, []).append(node)

    def last_write(self, node: Node, before: Node) -> Node | None:
        """The last write of ``node`` itself (not through a view) that comes before ``before``, or None."""
        end = self.position.get(before)
        earlier = [w for w in self.direct.get(node, ()) if end is not None and self.position[w] < end]
        return earlier[-1] if earlier else None

    def unsafe_read(self, site: Node, operands: Iterable[Node], modeled: Modeled | None = None,
                    inputs: Iterable[Node] | None = None) -> str | None:
        """Why rewriting ``site`` (the node the FA4 call replaces, reading ``operands`` there) would miss an in-place
        write, or None. The nodes the rewrite stands for are the site's tensor ancestors through its ``inputs``
        (default: all; FlexAttention's block lists are not read) up to the operands; each must hold, from where the
        program made it (an operand: from its first use among them) up to the site, what it held then, unless the
        write is modeled (see the module docstring)."""
        if not self.writes or site not in self.position:
            return None
        operands = {node for node in operands if isinstance(node, Node)}
        covered = _tensor_ancestors(site, site.all_input_nodes if inputs is None else inputs, operands)
        first_use = {operand: min((self.position[user] for user in operand.users
                                   if user in covered and user in self.position), default=self.position[site])
                     for operand in operands}
        starts = {**{node: self.position[node] for node in covered if node in self.position}, **first_use}
        end = self.position[site]
        for node, start in starts.items():
            for write in self.writes.get(storage_root(node), ()):
                if not start < self.position[write] < end or (write in covered and unobservable_write(write)):
                    continue
                if modeled is not None and modeled.covers(write, node, covered, self.position):
                    continue
                target = next(t for t in written(write) if storage_root(t) is storage_root(node))
                return (f"'{target.name}' is written in place ({op_name(write) or write.target} at "
                        f"'{write.name}') between its use and the attention; the rewrite would not see it")
        return None


def unobservable_write(node: Node) -> bool:
    """Does ``node`` write only fresh tensors that nothing else reads (so reading it as its out-of-place twin, or
    dropping it once unused, changes nothing)?"""
    targets = written(node)
    return bool(targets) and all(storage_root(t) is t and set(t.users) == {node} for t in targets)


def _tensor_ancestors(site: Node, inputs: Iterable[Node], operands: set[Node]) -> set[Node]:
    """``site`` and its ancestors through tensor-valued ``inputs`` and their ancestors, not past ``operands`` (which
    are left out)."""
    seen, stack = {site}, [node for node in inputs if isinstance(node, Node)]
    while stack:
        node = stack.pop()
        if node in seen or node in operands:
            continue
        seen.add(node)
        for parent in node.all_input_nodes:
            if isinstance(example_value(parent), (torch.Tensor, tuple, list)):
                stack.append(parent)
    return seen
