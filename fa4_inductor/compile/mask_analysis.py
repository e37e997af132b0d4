"""Prove what an attention mask built inside the graph is: full, causal, a window.

Real model code (Hugging Face ``transformers`` under ``torch.compile``)
materializes its mask from index arithmetic: ``arange`` vectors, broadcast
by indexing with ``None``, compared (``kv_idx <= q_idx``), combined with
``&``/``|``/``~``, expanded to (B, 1, S_q, S_kv), sometimes turned into an
additive 0/-inf float mask with ``where``/``masked_fill``. This module
evaluates that subgraph symbolically: every tensor becomes a sympy
expression of its own axis indices, so the mask at the attention site is a
boolean formula in (b, h, i, j). If the formula is a conjunction of bounds
``L <= j - i <= U`` it is FA4's ``causal``/``window_size_left/right``
(bottom-right aligned): ``right = U - (S_kv - S_q)``,
``left = (S_kv - S_q) - L``. A key-padding lookup ``pad[b, j]`` into a
(B, S_kv) tensor input, and-ed with such bounds, is kept as FA4's
``key_padding`` operand; so is a (B, 1, 1, S_kv) mask input, what a
decoding step with a static KV cache receives. A document mask
``seg[b, i] == seg[b, j]`` over (B, S) integer segment ids (a packing
collator's input, or computed in the graph, as Hugging Face derives them from
restarting ``position_ids``), or ``doc[i] == doc[j]`` over (S,) ids shared by
every row, and-ed with the rest, becomes FA4's ``segment_ids`` operand; key
lengths ``j < lengths[b]`` over a (B,) tensor become key padding. The same
analysis reads a FlexAttention ``mask_mod`` graph, whose inputs are the
indices themselves (:func:`analyze_mask_mod`). Anything else (another tensor lookup, a bound on
``i`` or ``j`` alone, a dependence on batch or head) is reported with the
reason, and the mask stays.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import sympy
import torch
from sympy.logic.boolalg import BooleanFunction
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

from fa4_inductor.compile import graph_mutations, modeled_ops
from fa4_inductor._torch_private import is_tensor_property_symbol, symbol_hint
from fa4_inductor.compile.fx_utils import op_name
from fa4_inductor.compile.sites import AddedMasks, FixedBlocks

_I, _J, _B, _H = sympy.symbols("q_idx kv_idx batch head", integer=True, nonnegative=True)
INDICES = (_B, _H, _I, _J)  # the attention's axes, as the formulas name them


class NotAnalyzable(Exception):
    """The mask uses something this analysis does not model (message says what)."""


class ReadsData(NotAnalyzable):
    """The mask depends on the values of a tensor in a way compile time can't decide (a dense mask given as an
    input, a buffer, a lookup at other indices than [batch, kv_idx]): its values can be read at run time."""


class _Rounded(NotAnalyzable):
    """A formula modeled for a tensor whose dtype rounds it (``value``): its values are not the formula's."""

    def __init__(self, message: str, value: "IndexTensor"):
        super().__init__(message)
        self.value = value


class IsAMask(NotAnalyzable):
    """Values read as a bias are a mask (0/-inf or boolean)."""


@dataclasses.dataclass(frozen=True)
class IndexTensor:
    """A tensor given by a formula of its axis indices ``x0, x1, ...``.

    Three kinds of value, told apart by ``additive`` and ``expr``: an additive mask (``additive``: the entry is 0,
    a kept key, where ``expr`` holds, else -inf), an indicator (``expr`` a truth value: the entry is True or 1 where
    it holds, else False or 0, in whatever dtype the tensor has) or a number per entry (index arithmetic, an integer
    tensor's values). ``shape`` is the tensor's (from the graph), so that an axis of size 1 broadcast to more is
    read at index 0 (:func:`_aligned`); None only for values made inside one op's model.
    """

    expr: Any
    ndim: int
    additive: bool = False
    shape: tuple | None = None


class TensorLookup(BooleanFunction):
    """``source[i0, i1]`` of a 2-D boolean tensor, as a boolean: ``TensorLookup(name, i0, i1)``.

    A function (not a symbol) so that axis renames reach its index arguments.
    """

    nargs = 3


class ValueLookup(sympy.Function):
    """``source[i0, i1]`` of a 2-D integer tensor, as an integer (segment ids, a 0/1 mask before ``.bool()``)."""

    nargs = 3
    is_integer = True


class VectorLookup(sympy.Function):
    """``source[i]`` of a 1-D integer tensor: per-row key lengths (``kv_idx < lengths[b]``), or document ids shared
    by every row (``doc[q_idx] == doc[kv_idx]``)."""

    nargs = 2
    is_integer = True


class Elementwise(sympy.Function):
    """An entry of a tensor computed elementwise by an op the analysis does not model, from its inputs' entries at
    the same index: ``Elementwise(name, input formulas...)`` (T5's ``log`` of relative positions). Only
    :func:`evaluate_values` makes them: the formula says what the entry depends on, not its value."""


class Opaque(sympy.Function):
    """An entry of a float tensor whose values the analysis does not model, read at its own axis indices:
    ``Opaque(name, i0, i1, ...)`` (ALiBi's slopes computed with ``pow``, a buffer). Only :func:`evaluate_values`
    makes them: a formula holding one says nothing about the values, only where they are read."""

    is_real = True


@dataclasses.dataclass(frozen=True)
class Values:
    """A tensor's values as a formula in (batch, head, q_idx, kv_idx) (:data:`INDICES`); ``opaque`` the graph nodes
    its :class:`Opaque` reads name, ``why_opaque`` why each was not modeled."""

    expr: Any
    opaque: dict[str, Node]
    why_opaque: dict[str, str]
    definitions: dict[str, Any]  # an opaque read's formula in its tensor's own axes, where known
    formulas: dict[Node, Any]  # each node evaluated: its :class:`IndexTensor` (own axes)

    def expanded(self, expr: Any) -> Any:
        """``expr`` with every opaque read that has a definition replaced by it, at the read's indices."""
        for _ in range(len(self.definitions) + 1):
            reads = [r for r in expr.atoms(Opaque) if r.args[0].name in self.definitions]
            if not reads:
                return expr
            expr = expr.xreplace({r: self.definitions[r.args[0].name].xreplace(
                {_axis(k): index for k, index in enumerate(r.args[1:])}) for r in reads})
        raise NotAnalyzable("opaque definitions that refer to each other")


@dataclasses.dataclass(frozen=True)
class MaskStructure:
    """FA4 parameters equivalent to a mask (windows: -1 = unbounded).

    ``key_padding`` is the graph node of a (B, S_kv) or (B, 1, 1, S_kv)
    tensor whose nonzero entries mark the keys each batch row may attend
    to, or None; ``key_lengths`` the node of a (B,) integer tensor, row b
    attending to keys below ``key_lengths[b]``, or None; ``segment_ids`` the
    node of a (B, S) integer tensor of document ids, or of an (S,) one shared
    by every row (query and key must share one), or fixed blocks of
    positions, or None.
    """

    causal: bool
    window_left: int
    window_right: int
    key_padding: Node | None = None
    segment_ids: Node | FixedBlocks | None = None
    key_lengths: Node | None = None
    # ``key_padding``'s nonzero entries mark the hidden keys instead (PyTorch's ``key_padding_mask``).
    key_padding_hides: bool = False

    @property
    def is_full(self) -> bool:
        return (not self.causal and self.window_left < 0 and self.window_right < 0
                and self.key_padding is None and self.segment_ids is None and self.key_lengths is None)


def _is_boolean(expr: Any) -> bool:
    """Is ``expr`` a truth value (a comparison, a logical combination, a boolean lookup, true/false)? Not a plain
    symbol, which sympy also counts as ``Boolean``."""
    return isinstance(expr, (BooleanFunction, sympy.core.relational.Relational, sympy.logic.boolalg.BooleanAtom))


def _axis(k: int) -> sympy.Symbol:
    return sympy.Symbol(f"x{k}", integer=True)


def _sym(value: Any) -> Any:
    """A Python/Sym int or float as a sympy number/expression (a sympy expression as it is)."""
    if isinstance(value, sympy.Basic):
        return value
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.expr
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, (int, float)):
        if value == -math.inf:
            return sympy.S.NegativeInfinity
        return sympy.Integer(value) if isinstance(value, int) else sympy.Float(value)
    raise NotAnalyzable(f"unsupported constant {value!r}")


def _is_one(size: Any) -> bool:
    """Is this size 1, with no guard?"""
    return statically_known_true(size == 1)


def _aligned(value: IndexTensor, shape: tuple) -> Any:
    """``value``'s formula read at the indices of a tensor of ``shape`` that it broadcasts to: axes right-aligned,
    and an axis of size 1 read at index 0 where ``shape`` has more (its only entry; a symbol is kept only while it
    stands for an axis of size 1 in the result too)."""
    if not isinstance(value.expr, sympy.Basic) or value.ndim == 0:
        return value.expr
    if value.shape is None:
        raise NotAnalyzable("a mask value of unknown shape is broadcast")
    offset = len(shape) - value.ndim
    if offset < 0:
        raise NotAnalyzable(f"a mask of {value.ndim} axes is read as one of {len(shape)}")
    return value.expr.xreplace({
        _axis(k): sympy.Integer(0) if _is_one(size) and not _is_one(shape[k + offset]) else _axis(k + offset)
        for k, size in enumerate(value.shape)})


def _nonnegative_at_every_index(value: IndexTensor) -> bool:
    """Is ``value`` >= 0 wherever it is read (its axis indices are >= 0)?"""
    expr = sympy.sympify(value.expr)
    indices = {_axis(k): sympy.Dummy(integer=True, nonnegative=True) for k in range(value.ndim)}
    return expr.xreplace(indices).is_nonnegative is True


def _broadcast_shape(*shapes: tuple) -> tuple:
    """The shape tensors of ``shapes`` broadcast to (a size 1 where every one has size 1)."""
    ndim = max((len(s) for s in shapes), default=0)
    result = []
    for axis in range(ndim):
        sizes = [s[axis - ndim + len(s)] for s in shapes if axis - ndim + len(s) >= 0]
        wider = [size for size in sizes if not _is_one(size)]
        result.append(wider[0] if wider else 1)
    return tuple(result)


def _broadcast(*values: Any) -> tuple[list[Any], int]:
    """The formulas of ``values`` (index tensors or numbers) read at the indices of their broadcast shape, and its
    number of axes."""
    tensors = [v for v in values if isinstance(v, IndexTensor)]
    if any(v.shape is None and v.ndim for v in tensors):
        raise NotAnalyzable("a mask value of unknown shape is broadcast")
    shape = _broadcast_shape(*(v.shape if v.shape is not None else () for v in tensors))
    exprs = [_aligned(v, shape) if isinstance(v, IndexTensor) else _sym(v) for v in values]
    return exprs, len(shape)


def _truth(value: Any) -> Any:
    """Where a value is nonzero (what ``bool`` conversion and ``logical_*`` read), as a formula."""
    if isinstance(value, IndexTensor):
        return _converted(value, torch.bool).expr
    return _sym(bool(value))


def _converted(value: IndexTensor, dtype: torch.dtype) -> IndexTensor:
    """``value`` as a tensor of ``dtype`` holds it (a cast, ``copy_`` into such a tensor): -inf and every nonzero
    become True in bool; index values stay exact in float32 and wider (up to 2**24, beyond any mask FA4 is given),
    and a 0/1 integer mask's in any float."""
    if value.additive:
        if dtype == torch.bool:  # 0 (kept) -> False, -inf (hidden) -> True
            return IndexTensor(sympy.Not(value.expr), value.ndim, shape=value.shape)
        if not dtype.is_floating_point:
            raise NotAnalyzable(f"a 0/-inf mask converted to {dtype}")
        return value
    if _is_boolean(value.expr):
        return value  # an indicator: True/1 where the formula holds, in every dtype
    if dtype == torch.bool:
        expr = TensorLookup(*value.expr.args) if isinstance(value.expr, ValueLookup) else sympy.Ne(value.expr, 0)
        return IndexTensor(expr, value.ndim, shape=value.shape)
    if dtype.is_floating_point and dtype.itemsize < 4:
        if isinstance(value.expr, ValueLookup):  # an integer 0/1 mask (as tokenizers make them) rounds to itself
            return IndexTensor(TensorLookup(*value.expr.args), value.ndim, shape=value.shape)
        raise NotAnalyzable(f"index values converted to {dtype}, which rounds integers above 256")
    if not dtype.is_floating_point and not dtype.is_complex and sympy.sympify(value.expr).is_integer is not True:
        raise NotAnalyzable(f"values that may not be integers converted to {dtype}")
    return value


def _with_shape(value: Any, example: Any, node: Node) -> Any:
    """``value``, the model of ``node``, with the shape of ``node``'s tensor; checks that the model has its number
    of axes and, for a bool or integer tensor, is no 0/-inf mask (an op whose model missed a conversion falls back
    here rather than being read wrong)."""
    if not isinstance(value, IndexTensor) or not isinstance(example, torch.Tensor):
        return value
    if value.ndim != example.dim():
        raise NotAnalyzable(f"the model of '{node.name}' has {value.ndim} axes where the tensor has {example.dim()}")
    if value.additive and not example.is_floating_point():
        raise NotAnalyzable(f"'{node.name}' is a {example.dtype} tensor modeled as a 0/-inf mask")
    if example.dtype == torch.bool and not _is_boolean(value.expr):
        raise NotAnalyzable(f"'{node.name}' is a bool tensor modeled as numbers")
    return dataclasses.replace(value, shape=tuple(example.shape))


def _as_dtype_number(value: int | float | bool, dtype: torch.dtype) -> int | float | bool:
    """A Python number as a 0-d tensor of ``dtype`` holds it."""
    if dtype == torch.bool:
        return bool(value)
    if dtype.is_floating_point:  # rounding keeps the values masks are read by: 0, and huge negatives or -inf
        return float(value)
    if isinstance(value, float) and not value.is_integer():
        raise NotAnalyzable(f"{value!r} converted to {dtype}")
    return int(value)


def _example(node: Any) -> Any:
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


_COMPARE = {"le": sympy.Le, "lt": sympy.Lt, "ge": sympy.Ge, "gt": sympy.Gt, "eq": sympy.Eq, "ne": sympy.Ne,
            "__le__": sympy.Le, "__lt__": sympy.Lt, "__ge__": sympy.Ge, "__gt__": sympy.Gt, "__eq__": sympy.Eq,
            "__ne__": sympy.Ne}
_ARITH = {"add": operator.add, "sub": operator.sub, "__add__": operator.add, "__sub__": operator.sub,
          "mul": operator.mul, "__mul__": operator.mul, "__radd__": operator.add}
# Bitwise ops are logical only on 0/1 values (bool tensors, indicators); logical ops read every nonzero as True.
_BITWISE = {"and_": sympy.And, "__and__": sympy.And, "bitwise_and": sympy.And,
            "or_": sympy.Or, "__or__": sympy.Or, "bitwise_or": sympy.Or}
_LOGICAL = {"logical_and": sympy.And, "logical_or": sympy.Or}
_LOGIC = _BITWISE | _LOGICAL
_NOT = {"invert", "__invert__", "bitwise_not"}
_FLOOR_DIVIDE = {"floordiv", "__floordiv__", "floor_divide"}
_DIVIDE = {"div", "truediv", "__truediv__"}
# Ops that change neither values nor the index formula (broadcast/cast/copy).
_PASSTHROUGH = modeled_ops.BROADCASTS | modeled_ops.DTYPE_CASTS | modeled_ops.COPIES | {"detach"}
# What a tensor the model can't follow may be, where values are read (:func:`evaluate_values`): each entry a function
# of its inputs' entries at the same (broadcast) index.
ELEMENTWISE = modeled_ops.DTYPE_CASTS | {
    "abs", "neg", "log", "log1p", "log2", "exp", "exp2", "sqrt", "rsqrt", "floor", "ceil", "round", "trunc", "tanh",
    "sigmoid", "sign", "reciprocal", "clamp", "clamp_min", "clamp_max", "minimum", "maximum", "min", "max", "where",
    "add", "sub", "mul", "div", "truediv", "floordiv", "floor_divide", "pow", "rsub", "lt", "le", "gt", "ge", "eq",
    "ne", "logical_not", "logical_and", "logical_or", "full_like", "masked_fill"} | {
    f"__{name}__" for name in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "floordiv", "pow",
                               "neg", "abs", "lt", "le", "gt", "ge", "eq", "ne")}
_LAYOUT_KWARGS = {"dtype", "device", "layout", "memory_format", "copy", "non_blocking", "pin_memory"}
_NEW_TRUE = {"ones", "ones_like", "new_ones"}
# New float tensors of zeros: an additive mask that keeps every key.
_NEW_ZEROS = {"zeros", "zeros_like", "new_zeros"}


class _Evaluator:
    def __init__(self, mutations: graph_mutations.Mutations | None = None, opaque_values: bool = False):
        self.cache: dict[Node, Any] = {}
        self.visited: list[Node] = []
        self.lookup_sources: dict[str, Node] = {}
        self.mutations = mutations
        self.modeled = graph_mutations.Modeled()
        # With ``opaque_values``, a tensor the model can't follow is a function of its inputs or a read of itself.
        self.opaque_values = opaque_values
        self.opaque: dict[str, Node] = {}
        self.why_opaque: dict[str, str] = {}
        self.definitions: dict[str, Any] = {}

    def value(self, arg: Any, reader: Node | None = None) -> Any:
        """The index formula of ``arg`` as ``reader`` reads it: after the in-place writes of it that come before."""
        if isinstance(arg, Node):
            if reader is not None and self.mutations is not None:
                self.modeled.readers.setdefault(arg, set()).add(reader)
                write = self.mutations.last_write(arg, before=reader)
                if write is not None:
                    self.modeled.writes.add(write)
                    arg = write
            if arg not in self.cache:
                try:
                    self.cache[arg] = self._modeled(arg)
                except _Rounded as exc:
                    self.cache[arg] = self._opaque(arg, exc, exc.value)
                except NotAnalyzable as exc:
                    self.cache[arg] = self._opaque(arg, exc)
                self.visited.append(arg)
            return self.cache[arg]
        if isinstance(arg, (int, float, bool, torch.SymInt, torch.SymFloat)):
            return arg
        if arg is None or isinstance(arg, (torch.dtype, torch.device, str)):
            return arg
        raise NotAnalyzable(f"unsupported argument {arg!r}")

    def _modeled(self, node: Node) -> Any:
        try:
            value = _with_shape(self._node(node), _example(node), node)
        except NotAnalyzable:
            raise
        except Exception as exc:  # e.g. sympy refusing arithmetic on a boolean lookup
            raise NotAnalyzable(f"the mask's '{node.name}' ({op_name(node) or node.op}) combines values the "
                                "analysis can't model") from exc
        example = _example(node)
        if self.opaque_values and isinstance(value, IndexTensor) and example.is_floating_point() \
                and example.dtype.itemsize < 4 and not (value.additive or _is_boolean(value.expr)) \
                and not sympy.sympify(value.expr).is_number:
            raise _Rounded(f"'{node.name}' is computed in {example.dtype}, which rounds its values", value)
        return value

    def _opaque(self, node: Node, why: NotAnalyzable, modeled: IndexTensor | None = None) -> IndexTensor:
        """With ``opaque_values``, ``node`` where the model can't follow it: an :class:`Opaque` read of itself (a
        tensor nothing writes in place), defined (``definitions``) as an :class:`Elementwise` function of its
        inputs' formulas where it is an elementwise op, as a read of the weight where it is an embedding lookup, or
        as ``modeled`` (its formula, in a dtype that rounds it); ``why`` raised again otherwise."""
        example = _example(node)
        if not self.opaque_values or not isinstance(example, torch.Tensor) or graph_mutations.written(node):
            raise why
        self.opaque[node.name], self.why_opaque[node.name] = node, str(why)
        for model in (lambda *_: modeled, self._elementwise, self._embedding):
            try:
                definition = model(node, example)
            except NotAnalyzable:
                definition = None
            if definition is not None:
                self.definitions[node.name] = definition.expr
                break
        indices = (_axis(k) for k in range(example.dim()))
        return IndexTensor(Opaque(sympy.Symbol(node.name), *indices), example.dim(), shape=tuple(example.shape))

    def _elementwise(self, node: Node, example: torch.Tensor) -> IndexTensor | None:
        """An elementwise op (:data:`ELEMENTWISE`) as the function of its inputs' formulas at each entry."""
        name = op_name(node)
        name = modeled_ops.IN_PLACE.get(name, name)
        tensors = [a for a in node.args if isinstance(a, Node)]
        if name not in ELEMENTWISE or set(node.kwargs) - _LAYOUT_KWARGS or not tensors \
                or (name in ("min", "max") and len(node.args) != 2) \
                or not all(isinstance(a, (Node, int, float, bool, torch.dtype, torch.device)) for a in node.args):
            return None
        values = [self.value(a, node) if isinstance(a, Node) else a for a in node.args
                  if not isinstance(a, (torch.dtype, torch.device))]
        if any(isinstance(v, IndexTensor) and v.additive for v in values):
            return None
        exprs, ndim = _broadcast(*values)
        if ndim != example.dim():
            return None
        result = Elementwise(sympy.Symbol(node.name), *exprs)
        if example.dtype == torch.bool:
            result = sympy.Eq(result, 1)  # a truth value, for what reads it as one
        return IndexTensor(result, ndim, shape=tuple(example.shape))

    def _embedding(self, node: Node, example: torch.Tensor) -> IndexTensor | None:
        """``embedding(indices, weight)``: ``weight[indices[...], c]``, an :class:`Opaque` read of the weight at the
        indices' formula (``max_norm``, which rewrites the weight, is not modeled)."""
        max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
        if op_name(node) != "embedding" or len(node.args) < 2 or max_norm is not None:
            return None
        indices, weight = node.args[:2]
        value = self.value(indices, node)
        if not isinstance(value, IndexTensor) or value.additive or _is_boolean(value.expr) \
                or not isinstance(weight, Node) or graph_mutations.written(weight):
            return None
        self.opaque[weight.name] = weight
        self.why_opaque.setdefault(weight.name, "an embedding's weight")
        read = Opaque(sympy.Symbol(weight.name), value.expr, _axis(value.ndim))
        return IndexTensor(read, example.dim(), shape=tuple(example.shape))

    def _node(self, node: Node) -> Any:
        example = _example(node)
        if node.op in ("placeholder", "get_attr"):
            if isinstance(example, (torch.SymInt, int)):
                return example
            if isinstance(example, torch.Tensor) and example.dim() >= 1:
                return self._input_lookup(node, example)
            raise ReadsData(f"the mask reads the tensor input '{node.name}' of shape {tuple(example.shape)}")
        if node.op not in ("call_function", "call_method"):
            raise NotAnalyzable(f"unsupported node {node.op} {node.target}")
        if isinstance(example, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float)):
            return example  # a size computation: its value is known symbolically
        name = op_name(node) or str(node.target)
        name = modeled_ops.IN_PLACE.get(name, name)  # an in-place op read as the value it leaves in its tensor
        if name not in modeled_ops.IN_PLACE.values() and graph_mutations.written(node):
            raise NotAnalyzable(f"the mask is written in place by {name}, which the analysis does not model")
        rounding = node.kwargs.get("rounding_mode") if name == "div" else None
        if rounding in ("floor", "trunc"):
            name = "floor_divide"  # truncation too, on values the model proves nonnegative (_floor_divide)
        unmodeled = modeled_ops.unmodeled_argument(node, name)
        if unmodeled is not None:
            raise NotAnalyzable(f"the mask uses {unmodeled}")
        if name == "copy_":  # the tensor now holds the source, broadcast to its shape
            return self._passthrough(self.value(node.args[1], node), example)
        if node.target is operator.getitem:
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if any(isinstance(i, Node) for i in index):
                return self._gather(self.lookup_source(node.args[0], node), [self.value(i, node) for i in index])
            index = tuple(slice(*(_example(p) for p in (i.start, i.stop, i.step))) if isinstance(i, slice) else i
                          for i in index)  # a slice from a graph size: its (symbolic) value
            return self._getitem(self.value(node.args[0], node), index, _example(node.args[0]))
        if name in ("tensor", "scalar_tensor") and len(node.args) == 1 and isinstance(node.args[0], (int, float, bool)):
            return _as_dtype_number(node.args[0], example.dtype)  # torch.tensor(0.0): a scalar
        if name in _NEW_TRUE:
            return IndexTensor(sympy.true, len(example.shape))
        if name in _NEW_ZEROS:  # float zeros: an additive mask keeping every key (an indicator that is 0 elsewhere)
            return IndexTensor(sympy.true, example.dim(), additive=True) if example.is_floating_point() \
                else IndexTensor(sympy.false, example.dim())
        if name in ("full", "new_full") and isinstance(example, torch.Tensor):
            return self._full(node, example)
        if name in _PASSTHROUGH:  # the other arguments give only a shape or dtype (``type_as(q)``)
            return self._passthrough(self.value(node.args[0], node), example)
        if name in ("cat", "concat", "concatenate", "hstack") and isinstance(example, torch.Tensor):
            return self._concatenation(node, name, example)
        if name == "pad" and isinstance(example, torch.Tensor):
            return self._pad(node, example)
        if name == "unflatten" and isinstance(example, torch.Tensor):
            raise NotAnalyzable(f"the mask's axis {node.args[1]} is split into {node.args[2]}: heads folded into the "
                                "batch, as a 3-D (B * heads, L, S) attn_mask has them, a mask per batch row and head "
                                "that FA4 can't take")
        if name in ("view", "reshape", "_unsafe_view", "squeeze") and isinstance(example, torch.Tensor):
            # The target shape is read from the result (its arguments may be a tuple, -1 or size nodes).
            return self._unit_reshape(self.value(node.args[0], node), _example(node.args[0]), example)
        if name == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            return self._permute(self.value(node.args[0], node), dims)
        args = [self.value(a, node) for a in node.args]
        kwargs = {k: self.value(v, node) for k, v in node.kwargs.items()}
        if name == "arange":
            return self._arange(node, example)
        if name in ("ne", "__ne__") and args[1:] == [0] and isinstance(args[0], IndexTensor) \
                and isinstance(args[0].expr, ValueLookup):
            return self._passthrough(args[0], example)  # ``mask != 0`` of a 0/1 mask: the mask as a boolean
        if name in _COMPARE or name in _ARITH:
            return self._binary(name, args)
        if name in _DIVIDE and rounding is None:
            return self._divide(args)
        if name in _FLOOR_DIVIDE:
            return self._floor_divide(args[:2], truncates=rounding == "trunc")
        if name in _LOGIC:
            return self._logic(name, args)
        if name == "logical_not" and isinstance(args[0], IndexTensor):
            return IndexTensor(sympy.Not(_truth(args[0])), args[0].ndim)
        if name in _NOT:
            if not (isinstance(args[0], IndexTensor) and not args[0].additive and _is_boolean(args[0].expr)):
                raise NotAnalyzable(f"{name} of values that are not 0/1 (a bitwise, not a logical, negation)")
            return IndexTensor(sympy.Not(args[0].expr), args[0].ndim)
        if name in ("abs", "__abs__") and isinstance(args[0], IndexTensor):
            return IndexTensor(sympy.Abs(args[0].expr), args[0].ndim)
        if name == "unsqueeze":
            return self._unsqueeze(args[0], args[1] if len(args) > 1 else kwargs["dim"])
        if name in ("tril", "triu"):
            return self._triangle(name, args[0], args[1] if len(args) > 1 else kwargs.get("diagonal", 0))
        if name in ("where",) and len(args) == 3:
            return self._where(*args, example)
        if name == "masked_fill":
            return self._masked_fill(*args, example)
        raise NotAnalyzable(f"the mask uses {name}, which the analysis does not model")

    def _input_lookup(self, node: Node, example: torch.Tensor) -> IndexTensor:
        """A tensor read as ``source[first axis, last axis]``: (B, S_kv), or (B, 1, 1, S_kv) as
        a decoding step's mask is, where every middle axis has size 1; a 1-D integer tensor as ``source[axis]``."""
        if example.dim() == 1:
            if example.is_floating_point() or example.is_complex() or example.dtype == torch.bool:
                raise ReadsData(f"the mask reads the 1-D {example.dtype} tensor '{node.name}'")
            self.lookup_sources[node.name] = node
            return IndexTensor(VectorLookup(sympy.Symbol(node.name), _axis(0)), 1, shape=tuple(example.shape))
        middle = example.shape[1:-1]
        if not all(statically_known_true(size == 1) for size in middle):
            raise ReadsData(f"the mask reads the tensor input '{node.name}' of shape {tuple(example.shape)}, "
                                "a dense mask (FA4 takes masks that vary along batch and keys only)")
        if example.is_floating_point() or example.is_complex():
            raise ReadsData(f"the mask reads the {example.dtype} tensor '{node.name}'")
        self.lookup_sources[node.name] = node
        ndim = example.dim()
        kind = TensorLookup if example.dtype == torch.bool else ValueLookup
        return IndexTensor(kind(sympy.Symbol(node.name), _axis(0), _axis(ndim - 1)), ndim, shape=tuple(example.shape))

    def lookup_source(self, source: Any, reader: Node | None = None) -> Any:
        """What a gather reads from: index arithmetic, or else a 2-D tensor taken as it is (segment ids the graph
        computes, e.g. from ``position_ids``, are looked up, not analyzed)."""
        try:
            return self.value(source, reader)
        except NotAnalyzable:
            example = _example(source)
            if isinstance(source, Node) and isinstance(example, torch.Tensor) and example.dim() in (1, 2):
                self.cache[source] = self._input_lookup(source, example)
                return self.cache[source]
            raise

    def _arange(self, node: Node, example: torch.Tensor) -> IndexTensor:
        """``arange([start,] end[, step])``: ``start + x0`` for step 1, in an integer dtype or float32 and wider."""
        positional = [self.value(a, node) for a in node.args]
        bounds = dict(zip(("end",) if len(positional) == 1 else ("start", "end", "step"), positional))
        bounds.update({k: self.value(v, node) for k, v in node.kwargs.items() if k in ("start", "end", "step")})
        if bounds.get("step", 1) != 1:
            raise NotAnalyzable(f"arange with step {bounds['step']!r}")
        start = bounds.get("start", 0)
        if isinstance(start, IndexTensor) or isinstance(start, bool) or start is None:
            raise NotAnalyzable(f"arange from {start!r}")
        if example.dtype.is_floating_point and example.dtype.itemsize < 4:
            raise NotAnalyzable(f"arange in {example.dtype}, which rounds integers above 256")
        if not (isinstance(start, (torch.SymInt, int)) or (isinstance(start, float) and start.is_integer())):
            raise NotAnalyzable(f"arange from {start!r}, not an integer")
        return IndexTensor(_sym(start) + _axis(0), 1)

    def _full(self, node: Node, example: torch.Tensor) -> IndexTensor:
        """``full(size, value)``: every key kept (a boolean True, or an additive 0) or none (False, -inf)."""
        value = node.args[-1] if len(node.args) > 1 else node.kwargs.get("fill_value")
        if example.dtype == torch.bool and isinstance(value, (bool, int, float)):
            return IndexTensor(sympy.true if value else sympy.false, example.dim())  # nonzero (-inf too) is True
        if example.is_floating_point() and isinstance(value, (int, float)):
            if self._additive(value, -math.inf):
                return IndexTensor(sympy.true, example.dim(), additive=True)
            if self._additive(0, value):
                return IndexTensor(sympy.false, example.dim(), additive=True)
        raise self._not_a_mask(f"full({value!r})", 0, value)

    @staticmethod
    def _binary(name, args):
        if len(args) != 2:
            raise NotAnalyzable(f"{name} with {len(args)} arguments")
        indicator = _Evaluator._indicator_arithmetic(name, args)
        if indicator is not None:
            return indicator
        masks = [isinstance(x, IndexTensor) and (x.additive or _is_boolean(x.expr)) for x in args]
        if name in _COMPARE and any(masks):
            return _Evaluator._compare_mask(name, args, masks)
        (a, b), ndim = _broadcast(*args)
        if name in _COMPARE:
            return IndexTensor(_COMPARE[name](a, b), ndim)
        return IndexTensor(_ARITH[name](a, b), ndim)

    @staticmethod
    def _divide(args) -> IndexTensor:
        """``values / c`` of numbers per entry (a bias, not a mask) by a nonzero constant."""
        value, divisor = args
        if not isinstance(value, IndexTensor) or value.additive or _is_boolean(value.expr):
            raise NotAnalyzable("division of values that are not numbers per entry")
        if not isinstance(divisor, (int, float)) or isinstance(divisor, bool) or divisor == 0:
            raise NotAnalyzable(f"division by {divisor!r}, not a nonzero constant")
        return IndexTensor(value.expr / _sym(divisor), value.ndim, shape=value.shape)

    @staticmethod
    def _floor_divide(args, truncates: bool = False) -> IndexTensor:
        """``index // c`` of index arithmetic by a positive integer constant (fixed blocks of positions); a division
        that ``truncates`` is the same where the values are nonnegative (indices are)."""
        value, divisor = args
        if not isinstance(value, IndexTensor) or value.additive or _is_boolean(value.expr) or \
                sympy.sympify(value.expr).is_integer is not True:
            raise NotAnalyzable("floor division of values that are not integer index arithmetic")
        if not isinstance(divisor, int) or isinstance(divisor, bool) or divisor <= 0:
            raise NotAnalyzable(f"floor division by {divisor!r}, not a positive integer constant")
        if truncates and not _nonnegative_at_every_index(value):
            raise NotAnalyzable("a truncating division of values that may be negative")
        return IndexTensor(sympy.floor(value.expr / divisor), value.ndim, shape=value.shape)

    @staticmethod
    def _compare_mask(name, args, masks) -> IndexTensor:
        """A mask compared with a number (``tril(ones) == 0``, ``additive_mask < 0``): each entry holds one of two
        values (an indicator 1 or 0, an additive mask 0 or -inf), so the result is the comparison of each, chosen
        by the mask's formula."""
        if all(masks):
            raise NotAnalyzable(f"{name} of two masks")
        mask, other = (args[0], args[1]) if masks[0] else (args[1], args[0])
        if isinstance(other, bool):
            other = int(other)  # ``mask == True`` compares with 1, as torch does
        if not isinstance(other, (int, float)):
            raise NotAnalyzable(f"{name} of a mask with a value that is not a number")
        where_true, where_false = (0.0, -math.inf) if mask.additive else (1, 0)

        def compared(entry):
            left, right = (entry, other) if masks[0] else (other, entry)
            return _COMPARE[name](_sym(left), _sym(right))
        return IndexTensor(sympy.Or(sympy.And(mask.expr, compared(where_true)),
                                    sympy.And(sympy.Not(mask.expr), compared(where_false))), mask.ndim)

    @staticmethod
    def _logic(name, args) -> IndexTensor:
        """``&``/``|`` of 0/1 values (bool tensors, indicators: bitwise is logical there) or ``logical_and/or`` of
        any values (nonzero is True)."""
        if len(args) != 2:
            raise NotAnalyzable(f"{name} with {len(args)} arguments")
        if name in _BITWISE and not all(isinstance(x, bool) or (isinstance(x, IndexTensor) and not x.additive and
                                                                _is_boolean(x.expr)) for x in args):
            raise NotAnalyzable(f"{name} of values that are not 0/1 (bitwise, not logical)")
        truths = [IndexTensor(_truth(x), x.ndim, shape=x.shape) if isinstance(x, IndexTensor) else bool(x)
                  for x in args]
        (a, b), ndim = _broadcast(*truths)
        return IndexTensor(_LOGIC[name](a, b), ndim)

    @staticmethod
    def _indicator_arithmetic(name, args) -> IndexTensor | None:
        """Arithmetic on masks: ``1 - m`` of a 0/1 mask (a boolean, or a lookup of a 0/1 integer mask as
        tokenizers make them) is the mask negated, ``m * c`` with a huge negative ``c`` an additive mask hiding
        where m is 1 (BERT's ``(1.0 - mask) * finfo.min``), and the sum of two 0/-inf masks keeps what both keep.
        None for anything else."""
        def as_boolean(value):
            if not isinstance(value, IndexTensor) or value.additive:
                return None
            if isinstance(value.expr, ValueLookup):
                return value.expr.func is ValueLookup and TensorLookup(*value.expr.args)
            return value.expr if _is_boolean(value.expr) else None

        a, b = args
        if name in ("add", "__add__", "__radd__") and all(isinstance(x, IndexTensor) and x.additive for x in args):
            (keep_a, keep_b), ndim = _broadcast(a, b)  # two 0/-inf masks added: a key must pass both
            return IndexTensor(sympy.And(keep_a, keep_b), ndim, additive=True)
        if name in ("sub", "__sub__", "rsub", "__rsub__"):
            one, mask = (a, b) if name in ("sub", "__sub__") else (b, a)
            boolean = as_boolean(mask)
            if isinstance(one, (int, float)) and one == 1 and boolean is not None:
                return IndexTensor(sympy.Not(boolean), mask.ndim)
        if name in ("mul", "__mul__", "__rmul__"):
            for mask, factor in ((a, b), (b, a)):
                boolean = as_boolean(mask)
                if boolean is not None and isinstance(factor, (int, float)) and _Evaluator._additive(0, factor):
                    return IndexTensor(sympy.Not(boolean), mask.ndim, additive=True)
        return None

    @staticmethod
    def _passthrough(value, example):
        """``value`` cast, copied or broadcast to ``example``'s dtype and shape."""
        if not isinstance(value, IndexTensor):
            raise NotAnalyzable("cast of a non-index value")
        if not isinstance(example, torch.Tensor):
            raise NotAnalyzable("a cast with no tensor metadata")
        shape = tuple(example.shape)
        return _converted(IndexTensor(_aligned(value, shape), len(shape), value.additive, shape), example.dtype)

    @staticmethod
    def _getitem(value, index, example=None):
        """Basic indexing: ``None`` adds an axis, a slice with step 1 reads ``in[k + start]`` (its stop only sets the
        result's size, which comes from the graph), an integer reads one index and drops the axis."""
        if not isinstance(value, IndexTensor):
            raise NotAnalyzable("indexing of a non-index value")
        index = index if isinstance(index, tuple) else (index,)
        mapping, out_axis, in_axis = {}, 0, 0

        def size():
            if example is None:
                raise NotAnalyzable("negative mask index without shape")
            return example.shape[in_axis]
        for item in index:
            if item is None:
                out_axis += 1
            elif isinstance(item, slice) and item.step in (None, 1):
                start = 0 if item.start is None else item.start
                if isinstance(start, torch.SymInt) and statically_known_true(start >= 0):
                    pass  # a graph size, read as its symbol
                elif not isinstance(start, int) or isinstance(start, bool):
                    raise NotAnalyzable(f"mask slice start {start!r}")
                elif start < 0:  # counted from the end, clamped at 0 as Python slices are
                    start = _sym(size()) + start if guard_or_false(size() + start >= 0) else 0
                mapping[_axis(in_axis)] = _axis(out_axis) + _sym(start)
                in_axis += 1
                out_axis += 1
            elif isinstance(item, int) and not isinstance(item, bool):
                mapping[_axis(in_axis)] = sympy.Integer(item) if item >= 0 else _sym(size()) + item
                in_axis += 1
            elif item is Ellipsis:
                raise NotAnalyzable("Ellipsis in mask indexing")
            else:
                raise NotAnalyzable(f"mask indexing with {item!r}")
        for _ in range(in_axis, value.ndim):  # trailing axes kept
            mapping[_axis(in_axis)] = _axis(out_axis)
            in_axis += 1
            out_axis += 1
        return IndexTensor(value.expr.xreplace(mapping), out_axis, value.additive)

    @staticmethod
    def _gather(value, index):
        """``value[t0, t1, ...]`` with index tensors for the leading axes (advanced indexing): the result's axes are
        the indices' broadcast ones, then ``value``'s axes that were not indexed (a mask_mod's ``pad[b][kv_idx]``
        reads row ``b``, then its entry ``kv_idx``)."""
        if not isinstance(value, IndexTensor) or not 0 < len(index) <= value.ndim:
            raise ReadsData("the mask gathers with an index tensor")
        if not all(isinstance(i, IndexTensor) for i in index):
            raise NotAnalyzable("the mask gathers with something other than index arithmetic")
        if any(i.additive or _is_boolean(i.expr) for i in index):
            raise NotAnalyzable("the mask is indexed by a boolean tensor (a selection, not a gather)")
        exprs, ndim = _broadcast(*index)
        mapping = {_axis(k): e for k, e in enumerate(exprs)}
        kept = range(len(index), value.ndim)
        mapping.update({_axis(axis): _axis(ndim + position) for position, axis in enumerate(kept)})
        return IndexTensor(value.expr.xreplace(mapping), ndim + len(kept), value.additive)

    def _concatenation(self, node: Node, name: str, example: torch.Tensor) -> IndexTensor:
        """``cat``/``hstack`` of masks of one kind (0/-inf, or boolean): along the joined axis, each index reads the
        piece it falls in, shifted by the sizes before it (meta-llama's ``hstack([zeros(S, start_pos), mask])``,
        the cached keys all kept). Empty pieces are dropped."""
        pieces = node.args[0] if node.args else node.kwargs.get("tensors")
        default = (1 if example.dim() > 1 else 0) if name == "hstack" else 0
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", default)
        if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, Node) for p in pieces) or \
                not isinstance(dim, int):
            raise NotAnalyzable(f"{name} of something other than a list of tensors")
        dim = dim if dim >= 0 else dim + example.dim()
        filled = [p for p in pieces if not statically_known_true(_example(p).shape[dim] == 0)]
        if any(_example(p).dtype != example.dtype for p in filled):
            raise NotAnalyzable(f"{name} changes the mask's dtype")
        values = [self._passthrough(self.value(p, node), _example(p)) for p in filled]
        if len(values) == 1:
            return self._passthrough(values[0], example)
        if len({v.additive for v in values}) > 1 or not all(v.additive or _is_boolean(v.expr) for v in values) or \
                any(v.ndim != example.dim() for v in values):
            raise NotAnalyzable(f"{name} joins pieces that are not masks of one kind and rank")
        axis, start, parts = _axis(dim), sympy.Integer(0), []
        for piece, value in zip(filled, values):
            end = start + _sym(_example(piece).shape[dim])
            parts.append(sympy.And(axis >= start, axis < end, value.expr.xreplace({axis: axis - start})))
            start = end
        return IndexTensor(sympy.Or(*parts), example.dim(), values[0].additive)

    def _pad(self, node: Node, example: torch.Tensor) -> IndexTensor:
        """``F.pad(mask, (left, right, ...), value=v)`` in constant mode: inside, each padded axis reads the mask
        shifted by its left padding; outside, ``v`` as a mask entry (True/False, or an additive 0/-inf)."""
        arguments = dict(zip(("input", "pad", "mode", "value"), node.args)) | dict(node.kwargs)
        widths, mode, fill = arguments.get("pad"), arguments.get("mode", "constant"), arguments.get("value")
        before = _example(arguments["input"])
        value = self._passthrough(self.value(arguments["input"], node), before)
        if mode != "constant" or not isinstance(widths, (list, tuple)) or len(widths) % 2 or \
                not all(isinstance(w, int) and w >= 0 for w in widths):
            raise NotAnalyzable(f"pad with mode {mode!r} and widths {widths!r}: constant, nonnegative widths only")
        if not (value.additive or _is_boolean(value.expr)):
            raise NotAnalyzable("pad of values that are not a mask")
        fill = 0 if fill is None else fill
        if value.additive:
            if not isinstance(fill, (int, float)) or not (fill == 0 or self._additive(0, fill)):
                raise self._not_a_mask(f"pad with value {fill!r}", 0, fill)
            outside = sympy.true if fill == 0 else sympy.false
        elif isinstance(fill, (bool, int, float)) and fill in (0, 1):
            outside = sympy.true if fill else sympy.false
        else:
            raise NotAnalyzable(f"pad of an indicator with value {fill!r}")
        inside, mapping = [], {}
        for pair in range(len(widths) // 2):
            axis = _axis(example.dim() - 1 - pair)
            left, size = widths[2 * pair], _sym(before.shape[example.dim() - 1 - pair])
            inside += [axis >= left, axis < left + size]
            mapping[axis] = axis - left
        inside_expr = sympy.And(*inside)
        expr = sympy.Or(sympy.And(inside_expr, value.expr.xreplace(mapping)), sympy.And(sympy.Not(inside_expr),
                                                                                        outside))
        return IndexTensor(expr, example.dim(), value.additive)

    @staticmethod
    def _unit_reshape(value, before, after):
        """A ``view``/``reshape`` that only adds or removes axes of size 1 (``pad.view(b, 1, 1, s)``): each axis of
        size above 1 keeps its index, in order; a removed unit axis reads index 0."""
        if not isinstance(value, IndexTensor) or not isinstance(before, torch.Tensor):
            raise NotAnalyzable("reshape of a non-index value")
        kept_before = [(axis, size) for axis, size in enumerate(before.shape) if not _is_one(size)]
        kept_after = [(axis, size) for axis, size in enumerate(after.shape) if not _is_one(size)]
        if len(kept_before) != len(kept_after) or not all(
                statically_known_true(a == b) for (_, a), (_, b) in zip(kept_before, kept_after)):
            raise NotAnalyzable(f"the mask is reshaped from {tuple(before.shape)} to {tuple(after.shape)}: only "
                                "adding or removing axes of size 1 is modeled")
        mapping = {_axis(axis): sympy.Integer(0) for axis in range(before.dim())}
        mapping.update({_axis(a): _axis(b) for (a, _), (b, _) in zip(kept_before, kept_after)})
        return IndexTensor(value.expr.xreplace(mapping), after.dim(), value.additive)

    @staticmethod
    def _permute(value, dims):
        """``permute(dims)``: axis ``k`` of the result is axis ``dims[k]`` of the input."""
        if not isinstance(value, IndexTensor) or sorted(d % value.ndim for d in dims) != list(range(value.ndim)):
            raise NotAnalyzable(f"permute of something other than an index tensor by {dims!r}")
        return IndexTensor(value.expr.xreplace({_axis(d % value.ndim): _axis(k) for k, d in enumerate(dims)}),
                           value.ndim, value.additive)

    @staticmethod
    def _unsqueeze(value, dim):
        if not isinstance(value, IndexTensor) or not isinstance(dim, int):
            raise NotAnalyzable("unsqueeze of a non-index value")
        dim = dim if dim >= 0 else dim + value.ndim + 1
        return _Evaluator._getitem(value, tuple([slice(None)] * dim + [None]))

    @staticmethod
    def _triangle(name, value, diagonal):
        """``tril``/``triu`` (entries with ``col - row <= d`` / ``>= d`` stay, the others become 0): and-ed with
        that band for a boolean mask; for an additive one the zeroed entries are kept keys. ``d`` may be a graph
        size (``S_kv - S_q`` under dynamic shapes)."""
        if not isinstance(value, IndexTensor) or value.ndim < 2 or not isinstance(diagonal, (int, torch.SymInt)) \
                or isinstance(diagonal, bool):
            raise NotAnalyzable(f"{name} of something other than an index tensor")
        offset = _axis(value.ndim - 1) - _axis(value.ndim - 2)
        stays = offset <= _sym(diagonal) if name == "tril" else offset >= _sym(diagonal)
        if value.additive:
            return IndexTensor(sympy.Or(value.expr, sympy.Not(stays)), value.ndim, additive=True)
        return IndexTensor(sympy.And(value.expr, stays), value.ndim)

    @staticmethod
    def _additive(keep_value, drop_value) -> bool:
        keep, drop = _sym(keep_value), _sym(drop_value)
        # Masked entries: -inf or a huge negative (Hugging Face uses torch.finfo(dtype).min).
        return bool(keep.is_zero) and (drop == sympy.S.NegativeInfinity or (drop.is_number and float(drop) <= -1e30))

    @staticmethod
    def _not_a_mask(what: str, keep_value, drop_value) -> NotAnalyzable:
        """Why ``keep_value``/``drop_value`` make no 0/-inf mask; a finite negative fill (-1e4, -1e9) says why it
        is not taken as -inf."""
        if _sym(keep_value).is_zero and isinstance(drop_value, (int, float)) and -1e30 < drop_value < 0:
            return NotAnalyzable(f"{what}: {finite_fill_reason(drop_value)}")
        return NotAnalyzable(f"{what} is not a 0/-inf mask")

    @staticmethod
    def _number(value):
        """A 0-d constant tensor (``torch.zeros(())``, ``torch.full((), -inf)``, as transformers >= 5.23 passes to
        ``where``) as the number it holds, in mask terms (an additive mask's kept 0 or hiding -inf); else ``value``."""
        if isinstance(value, IndexTensor) and value.ndim == 0 and value.expr in (sympy.true, sympy.false):
            if value.additive:
                return 0.0 if value.expr is sympy.true else -math.inf
            return value.expr is sympy.true
        return value

    def _where(self, cond, a, b, example):
        if not isinstance(cond, IndexTensor) or cond.additive or not _is_boolean(cond.expr):
            raise NotAnalyzable("where with a condition that is not a boolean mask")
        a, b = self._number(a), self._number(b)
        if example.dtype == torch.bool:  # where(c, x, y) of booleans: x where c, else y
            (c, x, y), ndim = _broadcast(cond, a, b)
            if not all(_is_boolean(v) for v in (x, y)):
                raise NotAnalyzable("where selecting between values that are not booleans")
            return IndexTensor(sympy.Or(sympy.And(c, x), sympy.And(sympy.Not(c), y)), ndim)
        if not example.is_floating_point():
            raise NotAnalyzable(f"where into {example.dtype}")
        if isinstance(a, IndexTensor) or isinstance(b, IndexTensor):
            return self._where_over_mask(cond, a, b)
        if self._additive(a, b):
            return IndexTensor(cond.expr, cond.ndim, additive=True)
        if self._additive(b, a):
            return IndexTensor(sympy.Not(cond.expr), cond.ndim, additive=True)
        raise self._not_a_mask(f"where({a!r}, {b!r})", *((b, a) if isinstance(a, (int, float)) and a < 0 else (a, b)))

    def _where_over_mask(self, cond, a, b):
        """``where(cond, mask, -inf)`` (or ``where(cond, -inf, mask)``) of a 0/-inf mask, as Hugging Face's SDPA path
        lays a boolean mask over a position bias (T5's cross-attention bias is zeros): the keys both keep."""
        for mask, hide, kept in ((a, b, cond.expr), (b, a, sympy.Not(cond.expr))):
            if isinstance(mask, IndexTensor) and mask.additive and not isinstance(hide, IndexTensor) \
                    and self._additive(0, hide):
                (keep, mask_keeps), ndim = _broadcast(IndexTensor(kept, cond.ndim, shape=cond.shape), mask)
                return IndexTensor(sympy.And(keep, mask_keeps), ndim, additive=True)
        raise NotAnalyzable("where selecting between tensors that are not a 0/-inf mask and -inf")

    def _masked_fill(self, base, cond, fill, example):
        fill = self._number(fill)
        if not isinstance(base, IndexTensor) or not isinstance(cond, IndexTensor):
            raise NotAnalyzable("masked_fill of non-index values")
        if cond.additive or not _is_boolean(cond.expr):
            raise NotAnalyzable("masked_fill with a condition that is not a boolean mask")
        if example.dtype == torch.bool:  # the fill converted to bool: nonzero (-inf too) is True
            if not isinstance(fill, (bool, int, float)) or base.additive or not _is_boolean(base.expr):
                raise NotAnalyzable("masked_fill of a bool tensor with a value that is not a number")
            (c, keep), ndim = _broadcast(cond, base)
            return IndexTensor(sympy.Or(c, keep) if fill else sympy.And(sympy.Not(c), keep), ndim)
        if not example.is_floating_point():
            raise NotAnalyzable(f"masked_fill of a {example.dtype} tensor")
        if not (base.expr is sympy.true or base.additive):
            raise NotAnalyzable("masked_fill of a value that is not a 0/-inf mask")
        if isinstance(fill, (int, float)) and fill == 0 and base.additive:
            # Zeros written into a 0/-inf mask keep those keys too (Hugging Face's older causal mask: a
            # finfo.min matrix with its lower triangle filled with 0).
            (c, keep), ndim = _broadcast(cond, base)
            return IndexTensor(sympy.Or(keep, c), max(ndim, base.ndim), additive=True)
        if not self._additive(0, fill):
            raise self._not_a_mask(f"masked_fill with {fill!r}", 0, fill)
        (c, keep), ndim = _broadcast(cond, base)
        return IndexTensor(sympy.And(keep, sympy.Not(c)), max(ndim, base.ndim), additive=True)


def finite_fill_reason(fill: float) -> str:
    """Why a finite negative fill of hidden scores is not FA4's masking."""
    return (f"the finite fill {fill:g} leaves each hidden key a weight of exp({fill:g} - the row's largest score), "
            "which FA4 drops; that is exact only under a bound on the scores the graph does not give, and a row "
            "that hides every key averages all values where FA4 gives zeros")


def _without_abs(expr):
    """``|x| <= w`` (``<``, or ``w >= |x|``) as ``-w <= x <= w``: symmetric windows written with ``.abs()``."""
    def split(relation):
        bound, inner = (relation.rhs, relation.lhs.args[0]) if isinstance(relation.lhs, sympy.Abs) \
            else (relation.lhs, relation.rhs.args[0])
        strict = isinstance(relation, (sympy.Lt, sympy.Gt))
        return sympy.And(sympy.Lt(inner, bound) if strict else sympy.Le(inner, bound),
                         sympy.Gt(inner, -bound) if strict else sympy.Ge(inner, -bound))

    def is_abs_bound(e):
        return ((isinstance(e, (sympy.Le, sympy.Lt)) and isinstance(e.lhs, sympy.Abs))
                or (isinstance(e, (sympy.Ge, sympy.Gt)) and isinstance(e.rhs, sympy.Abs)))

    return expr.replace(is_abs_bound, split)


def _linear(atom) -> tuple[Any, Any, Any] | None:
    """``(cj, ci, rest)`` with ``atom`` == ``cj * kv_idx + ci * q_idx + rest <= 0`` for an integer relation (a strict
    one is tightened by 1), or None for anything else."""
    if not isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
        return None
    poly = sympy.expand(atom.lhs - atom.rhs if isinstance(atom, (sympy.Le, sympy.Lt)) else atom.rhs - atom.lhs)
    cj, ci = poly.coeff(_J), poly.coeff(_I)
    rest = sympy.expand(poly - cj * _J - ci * _I)
    if rest.has(_I, _J, _B, _H) or not all(sympy.sympify(c).is_integer for c in (cj, ci, rest)):
        return None
    return cj, ci, rest + 1 if isinstance(atom, (sympy.Lt, sympy.Gt)) else rest


def _nonnegative(value) -> bool:
    return sympy.expand(value).is_nonnegative is True


def _within_index_ranges(expr, q_len, kv_len):
    """``expr`` simplified by what every index satisfies, ``0 <= q_idx < S_q`` and ``0 <= kv_idx < S_kv``: a bound on
    one index that its whole range meets is true (one it never meets false), and in an ``or`` a bound ``kv_idx <= c``
    next to the diagonal bound ``kv_idx - q_idx <= u`` with ``c <= u`` is implied by it (as ``q_idx >= 0``). Joined
    masks need both: meta-llama's cached keys, all kept, beside the causal part, ``kv_idx < p | (kv_idx < p + S &
    kv_idx - q_idx <= p)`` is ``kv_idx - q_idx <= p``."""
    last = {_J: _sym(kv_len) - 1, _I: _sym(q_len) - 1}

    def always(atom) -> bool:
        found = _linear(atom)
        if found is None or (found[0] != 0) == (found[1] != 0):
            return False
        coefficient, index = (found[0], _J) if found[0] != 0 else (found[1], _I)
        bound = -found[2] / coefficient  # index <= bound (coefficient > 0) or index >= bound
        return _nonnegative(bound - last[index]) if coefficient > 0 else _nonnegative(-bound)

    def diagonal_bound(atom):  # u of ``kv_idx - q_idx <= u``, or None
        found = _linear(atom)
        return -found[2] / found[0] if found and found[0] > 0 and found[0] == -found[1] else None

    def key_bound(atom):  # c of ``kv_idx <= c``, or None
        found = _linear(atom)
        return -found[2] / found[0] if found and found[0] > 0 and found[1] == 0 else None

    def absorbed(either):
        diagonals = [a for a in either.args if diagonal_bound(a) is not None]
        if len(diagonals) != 1:
            return either
        upper = diagonal_bound(diagonals[0])
        others = [key_bound(a) for a in either.args if a is not diagonals[0]]
        if all(c is not None and _nonnegative(upper - c) for c in others):
            return diagonals[0]
        return either

    known = {atom: sympy.true for atom in expr.atoms(sympy.Rel) if always(atom)}
    known.update({atom: sympy.false for atom in expr.atoms(sympy.Rel) if always(sympy.Not(atom))})
    expr = expr.xreplace(known)
    return expr.replace(lambda e: isinstance(e, sympy.Or), absorbed)


def _bounds(expr) -> tuple[Any, Any]:
    """(L, U) with expr == (L <= j - i <= U); None for a missing side."""
    lower, upper = None, None
    expr = _without_abs(expr)
    atoms = expr.args if isinstance(expr, sympy.And) else (expr,)
    for atom in atoms:
        if atom is sympy.true:
            continue
        if not isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
            raise NotAnalyzable(f"mask condition {atom} is not a bound on kv_idx - q_idx")
        # Normalize to ``poly <= 0`` / ``poly < 0``.
        poly = sympy.expand(atom.lhs - atom.rhs if isinstance(atom, (sympy.Le, sympy.Lt)) else atom.rhs - atom.lhs)
        strict = isinstance(atom, (sympy.Lt, sympy.Gt))
        cj, ci = poly.coeff(_J), poly.coeff(_I)
        rest = sympy.expand(poly - cj * _J - ci * _I)
        if cj == 0 or cj != -ci or rest.has(_I, _J, _B, _H):
            raise NotAnalyzable(f"mask condition {atom} is not a bound on kv_idx - q_idx")
        # cj * (j - i) + rest <= 0  (or < 0)
        bound = -rest / cj
        if strict:
            bound = bound - 1 if cj > 0 else bound + 1
        if cj > 0:
            upper = bound if upper is None else sympy.Min(upper, bound)
        else:
            lower = bound if lower is None else sympy.Max(lower, bound)
    return lower, upper


def _static_window(value, name: str) -> int:
    value = sympy.simplify(value)
    if not value.is_Integer:
        raise NotAnalyzable(f"window {name} = {value} is not a constant")
    if int(value) < 0:
        raise NotAnalyzable(f"window {name} = {int(value)} is negative")
    return int(value)


def analyze_mask(mask: Node | AddedMasks, q_len, kv_len, *, hides_where_true: bool = False,
                 reader: Node | None = None, mutations: graph_mutations.Mutations | None = None, batch=None, heads=None,
                 one_head: bool = False) -> tuple[MaskStructure, list[Node], graph_mutations.Modeled]:
    """Prove the structure of ``mask`` (a node broadcastable to (B, H, S_q, S_kv), or 0/-inf masks added one after
    another, each read by its own addition) as ``reader`` reads it (after the in-place writes of ``mutations`` that
    come before); a boolean mask keeps the keys where it is true, or hides
    them with ``hides_where_true`` (the condition of ``scores.masked_fill(c, -inf)``). ``batch`` and ``heads`` are
    the attention's B and H (None: unknown, so a mask axis of size 1 there is read at index 0). With ``one_head``
    the attention is a (B * H, S, D) ``bmm`` read as (B * H, 1, S, D), and a 3-D mask's first axis is its B * H.

    Returns the FA4 parameters, the nodes the analysis read (candidates
    for removal once the mask is no longer used) and the writes it applied
    (for :meth:`.graph_mutations.Mutations.unsafe_read`). Raises
    :class:`NotAnalyzable` with the reason otherwise.
    """
    nodes, readers = (mask.masks, mask.readers) if isinstance(mask, AddedMasks) else ((mask,), (reader,))
    evaluator = _Evaluator(mutations)
    values = []
    for node, node_reader in zip(nodes, readers):
        example = _example(node)
        if not isinstance(example, torch.Tensor):
            raise NotAnalyzable("the mask has no tensor metadata")
        if example.dtype != torch.bool and not example.is_floating_point():
            raise NotAnalyzable(f"mask dtype {example.dtype}")
        values.append(_evaluate(evaluator, node, node_reader))
        if example.is_floating_point() and not values[-1].additive:
            raise NotAnalyzable("float mask that is not a 0/-inf mask")
    value = values[0]
    if len(values) > 1:
        if not all(v.additive for v in values):
            raise NotAnalyzable("masks added to the scores that are not 0/-inf masks")
        exprs, ndim = _broadcast(*values)  # the sum keeps a key where every mask keeps it
        value = IndexTensor(sympy.And(*exprs), ndim, additive=True,
                            shape=_broadcast_shape(*(v.shape for v in values)))
    if hides_where_true:
        if value.additive or len(values) > 1 or _example(nodes[0]).dtype != torch.bool:
            raise NotAnalyzable("masked_fill with a condition that is not boolean")
        value = IndexTensor(sympy.Not(value.expr), value.ndim, shape=value.shape)
    if one_head and value.ndim == 3:
        shape = value.shape
        value = _Evaluator._unsqueeze(value, 1)
        value = dataclasses.replace(value, shape=(shape[0], 1, *shape[1:]))
    if value.ndim > 4:
        raise NotAnalyzable("mask has more than 4 dims")
    expr = _aligned(value, tuple(2 if size is None else size for size in (batch, heads, q_len, kv_len)))
    expr = sympy.sympify(expr).xreplace({_axis(k): s for k, s in enumerate((_B, _H, _I, _J))})
    structure = _structure(expr, evaluator.lookup_sources, q_len, kv_len)
    visited = [n for n in evaluator.visited if n not in (structure.key_padding, structure.segment_ids,
                                                         structure.key_lengths)]
    return structure, visited, evaluator.modeled


def evaluate_values(node: Node, shape: tuple, *, reader: Node | None = None,
                    mutations: graph_mutations.Mutations | None = None, folded: bool = False) -> Values:
    """The values of ``node``, a float tensor that broadcasts to ``shape`` (the scores' (B, H, S_q, S_kv); None for an
    unknown size), as ``reader`` reads it: index arithmetic modeled as masks are, and every float tensor the model
    can't follow an :class:`Opaque` read. With ``folded``, ``node`` broadcasts to (B * H, S_q, S_kv) instead, the
    heads folded into its first axis (Bloom's ``baddbmm`` input): its entry ``[b * H + h, i, j]`` is the scores'
    ``[b, h, i, j]``. Raises :class:`NotAnalyzable` for a mask (0/-inf or boolean) or what can't be read so."""
    example = _example(node)
    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        raise IsAMask("a bool or integer tensor: a mask, not a bias (SDPA adds only float masks)")
    if example.requires_grad:
        raise NotAnalyzable(f"'{node.name}' needs a gradient (a learned bias, slopes or table), which the attention "
                            "kernels do not give")
    evaluator = _Evaluator(mutations, opaque_values=True)
    value = _evaluate(evaluator, node, reader)
    if value.additive or _is_boolean(value.expr):
        raise IsAMask("a mask, not a bias")
    sizes = tuple(2 if size is None else size for size in shape)
    indices = INDICES
    if folded:  # (B * H, S_q, S_kv): its first axis read at b * H + h
        sizes, indices = (sizes[0] * sizes[1], *sizes[2:]), (_B * _sym(sizes[1]) + _H, *INDICES[2:])
    if value.ndim > len(sizes):
        raise NotAnalyzable(f"a bias of {value.ndim} axes on scores of {len(sizes)}")
    expr = sympy.sympify(_aligned(value, sizes)).xreplace({_axis(k): s for k, s in enumerate(indices)})
    values = Values(expr, evaluator.opaque, evaluator.why_opaque, evaluator.definitions, dict(evaluator.cache))
    if _is_given_as_data(values.expanded(expr), evaluator.opaque, indices):
        raise IsAMask("a tensor given as data (a mask read at run time), not a bias the graph computes")
    return values


def _is_given_as_data(expr, opaque: dict[str, Node], indices: tuple) -> bool:
    """Is ``expr`` a graph input or attribute read as it is (at the attention's ``indices`` or fixed ones, not at
    computed ones as an embedding reads its weight), through casts at most: a mask passed in?"""
    while isinstance(expr, Elementwise) and len(expr.args) == 2 \
            and op_name(opaque[expr.args[0].name]) in modeled_ops.DTYPE_CASTS:
        expr = expr.args[1]
    return (isinstance(expr, Opaque) and opaque[expr.args[0].name].op in ("placeholder", "get_attr")
            and all(index in indices or index.is_Integer for index in expr.args[1:]))


def analyze_mask_mod(mask_mod: torch.fx.GraphModule, buffers: tuple, q_len, kv_len) -> MaskStructure:
    """Prove the structure of a FlexAttention ``mask_mod`` graph (``(b, h, q_idx, kv_idx, *buffers) -> bool``).

    ``buffers`` are the outer graph's nodes (or sizes) bound to the graph's placeholders after the four indices;
    a padding or segment-id tensor in the result is one of them. Raises :class:`NotAnalyzable` otherwise.
    """
    placeholders = [n for n in mask_mod.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 4 + len(buffers):
        raise NotAnalyzable(f"mask_mod takes {len(placeholders)} inputs for {len(buffers)} captured buffers")
    evaluator = _Evaluator()
    for placeholder, symbol in zip(placeholders, (_B, _H, _I, _J)):
        evaluator.cache[placeholder] = IndexTensor(symbol, 0)
    for placeholder, outer in zip(placeholders[4:], buffers):
        evaluator.cache[placeholder] = evaluator.lookup_source(outer)
    value = _evaluate(evaluator, mask_mod.graph.output_node().args[0])
    if value.additive or value.ndim != 0 or not _is_boolean(value.expr):
        raise NotAnalyzable("mask_mod does not return a boolean")
    return _structure(value.expr, evaluator.lookup_sources, q_len, kv_len)


def _evaluate(evaluator: "_Evaluator", node: Node, reader: Node | None = None) -> IndexTensor:
    value = evaluator.value(node, reader)
    if not isinstance(value, IndexTensor):
        raise NotAnalyzable("the mask is not a tensor")
    return value


def _structure(expr, lookup_sources: dict[str, Node], q_len, kv_len) -> MaskStructure:
    """FA4's parameters for a boolean formula in (batch, head, q_idx, kv_idx) and tensor lookups."""
    try:
        return _structure_of(expr, lookup_sources, q_len, kv_len)
    except NotAnalyzable:
        raise
    except Exception as exc:  # sympy refusing a relation it can't order (e.g. of a boolean lookup)
        raise NotAnalyzable(f"the mask's formula {expr} is beyond the analysis") from exc


def _structure_of(expr, lookup_sources: dict[str, Node], q_len, kv_len) -> MaskStructure:
    shape_env = _shape_env(lookup_sources, q_len, kv_len)
    expr = _without_zero_offsets(expr, shape_env)
    expr, segment_ids = _documents(expr, lookup_sources, q_len, kv_len)
    expr = _positions_within_documents(expr, segment_ids, lookup_sources)
    expr, key_lengths = _key_lengths(expr, lookup_sources)
    expr, key_padding = _key_padding(expr, lookup_sources, kv_len)
    if key_lengths is not None and key_padding is not None:
        raise NotAnalyzable("the mask bounds the keys both by lengths and by a padding lookup")
    if expr.atoms(ValueLookup, VectorLookup):
        raise ReadsData("the mask uses the values of a tensor in a way FA4 can't express "
                            "(only seg[batch, q_idx] == seg[batch, kv_idx] document masks and "
                            "kv_idx < lengths[batch])")
    expr = sympy.simplify_logic(expr) if expr.has(sympy.Or, sympy.Not) else expr
    expr = _within_index_ranges(expr, q_len, kv_len)
    if expr.has(_B) or expr.has(_H):
        raise NotAnalyzable("the mask depends on the batch or head index")
    if expr is sympy.false:
        raise NotAnalyzable("the mask hides every key")
    padding_hides = False
    for found, symbol, what in ((key_padding or key_lengths, _KEEP, "padding lookup"),
                                (segment_ids, _SAME_DOCUMENT, "document mask")):
        if found is None:
            continue
        atoms = expr.args if isinstance(expr, sympy.And) else (expr,)
        atom = symbol
        if symbol is _KEEP and key_padding is not None and symbol not in atoms and sympy.Not(symbol) in atoms:
            padding_hides, atom = True, sympy.Not(symbol)  # keys kept where the lookup is false
        if atom not in atoms:
            raise NotAnalyzable(f"the {what} is not and-ed with the rest of the mask")
        expr = sympy.And(*(a for a in atoms if a != atom))
        if expr.has(symbol):
            raise NotAnalyzable(f"the {what} appears more than once")
    lower, upper = _bounds(expr)
    # Under dynamic shapes query and key lengths may be separate symbols, equal whenever the model runs (self
    # attention); a guard makes the compiled graph conditional on that.
    offset = 0 if guard_or_false(kv_len == q_len) else sympy.simplify(_sym(kv_len) - _sym(q_len))
    # S_kv >= S_q is guarded where it holds now (a cache longer than the chunk: a recompile if that ever changes).
    if offset != 0 and (offset >= 0) is not sympy.true and not guard_or_false(kv_len >= q_len):
        raise NotAnalyzable("S_kv may be shorter than S_q (rows without keys)")
    right = -1 if upper is None else _static_window(_constant_part(upper - offset, shape_env), "right")
    left = -1 if lower is None else _static_window(_constant_part(offset - lower, shape_env), "left")
    causal = right == 0 and left < 0
    return MaskStructure(causal=causal, window_left=left, window_right=-1 if causal else right,
                         key_padding=key_padding, segment_ids=segment_ids, key_lengths=key_lengths,
                         key_padding_hides=padding_hides)


def _shape_env(lookup_sources: dict[str, Node], *sizes):
    """The ShapeEnv of a dynamic-shape graph (from a symbolic size or a lookup source), or None."""
    for size in sizes:
        if isinstance(size, torch.SymInt):
            return size.node.shape_env
    return next((_example(n).fake_mode.shape_env for n in lookup_sources.values()
                 if getattr(_example(n), "fake_mode", None) is not None), None)


def _zero_under_guard(expr, shape_env) -> bool:
    """Is ``expr``, a formula of graph sizes, 0 now? If so, a guard keeps the compiled graph to when it is.

    Hugging Face adds the cache positions ``q_offset``/``kv_offset`` to the indices of its mask functions; with
    ``dynamic=True`` they become symbols, 0 in training and prefill.
    """
    return bool(expr.free_symbols) and shape_env is not None and not (expr.free_symbols & {_B, _H, _I, _J}) \
        and guard_or_false(shape_env.create_symboolnode(sympy.Eq(expr, 0)))


def _without_zero_offsets(expr, shape_env):
    """Tensor lookups at ``index + offset``, the offset a graph size that is 0 now, read at ``index``."""
    def reindexed(lookup):
        args = list(lookup.args)
        for position, index in enumerate(args[1:], start=1):
            for symbol in {_B, _H, _I, _J} & index.free_symbols:
                if _zero_under_guard(sympy.expand(index - symbol), shape_env):
                    args[position] = symbol
        return lookup.func(*args)

    return expr.xreplace({lookup: reindexed(lookup) for lookup in expr.atoms(TensorLookup, ValueLookup, VectorLookup)})


def _constant_part(value, shape_env):
    """``value`` without its symbolic part when that part is 0 now (under a guard), after
    :func:`_captured_scalars_at_their_values`."""
    value = _captured_scalars_at_their_values(sympy.expand(value), shape_env)
    constant, symbolic = value.as_coeff_Add()
    return constant if _zero_under_guard(symbolic, shape_env) else value


def _captured_scalars_at_their_values(value, shape_env):
    """``value`` with the captured scalar that makes its symbolic part nonzero at its value (under a guard).

    With ``dynamic=True`` Dynamo makes the Python ints a mask function captures symbols: Hugging Face's sliding
    window size (a config constant) as much as its cache offsets. The offsets' part is what a guard may keep
    at 0 (:func:`_zero_under_guard`; in decoding it changes every step, so their values must never be guarded).
    The window size is the one scalar (no tensor size) whose term alone makes up the part's value now; when no
    single scalar does, or several do, nothing is taken at its value.
    """
    symbolic = value.as_coeff_Add()[1]
    if shape_env is None or symbolic.free_symbols & {_B, _H, _I, _J}:
        return value
    hints = {s: symbol_hint(shape_env, s) for s in symbolic.free_symbols}
    if None in hints.values():
        return value
    total = symbolic.xreplace(hints)
    if total == 0:
        return value
    coefficients = symbolic.as_coefficients_dict()
    candidates = [s for s in hints if coefficients.get(s, 0) * hints[s] == total
                  and not is_tensor_property_symbol(s, shape_env)]
    if len(candidates) != 1:
        return value
    (scalar,) = candidates
    if not guard_or_false(shape_env.create_symboolnode(sympy.Eq(scalar, hints[scalar]))):
        return value
    return value.xreplace({scalar: hints[scalar]})


_KEEP = sympy.Symbol("key_kept")
_SAME_DOCUMENT = sympy.Symbol("same_document")


def _documents(expr, sources: dict[str, Node], q_len, kv_len) -> tuple[Any, Node | FixedBlocks | None]:
    """Replace ``seg[batch, q_idx] == seg[batch, kv_idx]`` (or ``seg[q_idx] == seg[kv_idx]`` of ids shared by every
    row, or fixed blocks ``q_idx // c == kv_idx // c``) by a plain boolean symbol; return the (B, S) or (S,) source,
    or the blocks."""
    def is_document_test(eq):
        kinds = {type(side) for side in eq.args}
        if len(kinds) != 1 or not kinds <= {ValueLookup, VectorLookup} or eq.args[0].args[0] != eq.args[1].args[0]:
            return False
        rows = (_B,) if kinds == {ValueLookup} else ()
        return {tuple(side.args[1:]) for side in eq.args} == {(*rows, _I), (*rows, _J)}

    blocks = _fixed_blocks(expr, q_len, kv_len)
    if blocks is not None:
        return blocks
    matches = [eq for eq in expr.atoms(sympy.Eq) if is_document_test(eq)]
    if not matches:
        return expr, None
    if len({eq.args[0].args[0] for eq in matches}) > 1:
        raise NotAnalyzable("the mask compares more than one segment-id tensor")
    name = str(matches[0].args[0].args[0])
    source = sources[name]
    if isinstance(matches[0].args[0], ValueLookup) and _example(source).dim() != 2:
        raise NotAnalyzable(f"segment ids '{name}' are not a (batch, sequence) tensor")
    if not statically_known_true(q_len == kv_len):
        raise NotAnalyzable(f"document mask '{name}' with S_q != S_kv")
    if not guard_or_false(_example(source).shape[-1] == kv_len):
        raise NotAnalyzable(f"segment ids '{name}' have {_example(source).shape[-1]} columns for {kv_len} keys")
    return expr.xreplace({eq: _SAME_DOCUMENT for eq in matches}), source


def _fixed_blocks(expr, q_len, kv_len) -> tuple[Any, FixedBlocks] | None:
    """``q_idx // c == kv_idx // c`` (or ``!=``, one ``c``) replaced by the document symbol, with its
    :class:`FixedBlocks`; None where the mask has no such test."""
    def block(side):
        if isinstance(side, sympy.floor):
            numerator, denominator = side.args[0].as_numer_denom()
            if numerator in (_I, _J) and denominator.is_Integer and denominator > 0:
                return numerator, int(denominator)
        return None

    tests = {eq: (block(eq.lhs), block(eq.rhs)) for eq in expr.atoms(sympy.Eq, sympy.Ne)}
    matches = {eq: sides for eq, sides in tests.items()
               if None not in sides and {sides[0][0], sides[1][0]} == {_I, _J} and sides[0][1] == sides[1][1]}
    if not matches:
        return None
    sizes = {sides[0][1] for sides in matches.values()}
    if len(sizes) > 1:
        raise NotAnalyzable(f"the mask compares blocks of sizes {sorted(sizes)}")
    if not statically_known_true(q_len == kv_len):
        raise NotAnalyzable("a fixed-block mask with S_q != S_kv")
    return expr.xreplace({eq: _SAME_DOCUMENT if isinstance(eq, sympy.Eq) else sympy.Not(_SAME_DOCUMENT)
                          for eq in matches}), FixedBlocks(sizes.pop())


_DOCUMENT_OFFSET = sympy.Symbol("document_offset", integer=True)


def _positions_within_documents(expr, segment_ids: Node | None, sources: dict[str, Node]):
    """Lookups ``pos[batch, q_idx]`` / ``pos[batch, kv_idx]`` as ``q_idx + d`` / ``kv_idx + d`` (``d`` one offset),
    where the document mask is and-ed with everything and its segments restart wherever ``pos`` doesn't step by
    one (:func:`_restart_positions`): within a document positions then differ exactly as indices do. Hugging Face
    >= 5.23 evaluates a packed batch's causal or window part on its ``position_ids`` this way; a bound left
    depending on ``d`` (one position alone) is rejected later."""
    positions = _restart_positions(segment_ids) if isinstance(segment_ids, Node) else None
    if positions is None or not (isinstance(expr, sympy.And) and _SAME_DOCUMENT in expr.args):
        return expr
    mapping = {}
    for lookup in expr.atoms(ValueLookup):
        name, row, index = lookup.args
        if _root(sources[str(name)]) is positions and row == _B and index in (_I, _J):
            mapping[lookup] = index + _DOCUMENT_OFFSET
    return expr.xreplace(mapping)


def _root(node: Node) -> Node:
    """``node`` seen through ops that keep its values and their indices (casts, copies, an expand of equal rank)."""
    while op_name(node) in _PASSTHROUGH and isinstance(node.args[0], Node) and _keeps_values(node) \
            and getattr(_example(node.args[0]), "dim", lambda: -1)() == getattr(_example(node), "dim", lambda: -2)():
        node = node.args[0]
    return node


def _keeps_values(cast: Node) -> bool:
    """Does ``cast`` keep every value of its input (same dtype, or integers to a wider integer type)?"""
    before, after = _example(cast.args[0]), _example(cast)
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
        return False
    widened = not (before.dtype.is_floating_point or after.dtype.is_floating_point or torch.bool in (
        before.dtype, after.dtype)) and after.dtype.itemsize >= before.dtype.itemsize
    return before.dtype == after.dtype or widened


def _restart_positions(segments: Node) -> Node | None:
    """The (B, S) ``pos`` when ``segments`` is ``cumsum(diff(pos, prepend=<one column>, dim=-1) != 1, -1)`` (Hugging
    Face's ``find_packed_sequence_indices``): a new segment wherever a position doesn't follow the one before; else
    None. Then ``seg[b, i] == seg[b, j]`` implies ``pos[b, j] - pos[b, i] == j - i``."""
    def last_axis(value, node):
        return value == -1 or value == _example(node).dim() - 1

    segments = _root(segments)
    if op_name(segments) != "cumsum" or _example(segments) is None or _example(segments).dim() != 2:
        return None
    dim = segments.args[1] if len(segments.args) > 1 else segments.kwargs.get("dim")
    steps = segments.args[0]
    if not last_axis(dim, segments) or op_name(steps) not in ("ne", "__ne__") or steps.args[1:] != (1,):
        return None
    difference = _root(steps.args[0])
    if op_name(difference) != "diff" or len(difference.args) != 1 or set(difference.kwargs) - {"dim", "prepend", "n"}:
        return None
    prepend, positions = difference.kwargs.get("prepend"), difference.args[0]
    if (difference.kwargs.get("n", 1) != 1 or not last_axis(difference.kwargs.get("dim", -1), difference)
            or not isinstance(prepend, Node) or not isinstance(positions, Node)
            or not statically_known_true(_example(prepend).shape[-1] == 1)):
        return None
    return _root(positions)


def _key_lengths(expr, sources: dict[str, Node]) -> tuple[Any, Node | None]:
    """Replace ``kv_idx < lengths[batch]`` by a plain boolean symbol; return the (B,) source."""
    bounds = [atom for atom in expr.atoms(sympy.Lt, sympy.Gt)
              if atom.lts == _J and isinstance(atom.gts, VectorLookup)
              and atom.gts.args[1] == _B]
    if not bounds:
        return expr, None
    if len(bounds) > 1:
        raise NotAnalyzable("the mask bounds kv_idx by more than one length lookup")
    return expr.xreplace({bounds[0]: _KEEP}), sources[str(bounds[0].gts.args[0])]


def _zero_tests_as_lookups(expr):
    """``v[i0, i1] != 0`` (or ``== 0``) of an integer lookup, a 0/1 mask compared with 0 (DistilBERT's ``mask == 0``),
    as the boolean lookup ``v[i0, i1]`` (or its negation): FA4's key padding reads its source as ``!= 0``."""
    def is_zero_test(e):
        return isinstance(e, (sympy.Eq, sympy.Ne)) and sympy.S.Zero in e.args \
            and any(isinstance(a, ValueLookup) for a in e.args)

    def as_lookup(e):
        lookup = TensorLookup(*next(a for a in e.args if isinstance(a, ValueLookup)).args)
        return lookup if isinstance(e, sympy.Ne) else sympy.Not(lookup)

    return expr.replace(is_zero_test, as_lookup)


def _key_padding(expr, sources: dict[str, Node], kv_len) -> tuple[Any, Node | None]:
    """Replace a ``pad[batch, kv_idx]`` lookup by a plain boolean symbol; return the (B, S_kv) source."""
    expr = _zero_tests_as_lookups(expr)
    lookups = expr.atoms(TensorLookup)
    if not lookups:
        return expr, None
    if len(lookups) > 1:
        raise ReadsData("the mask reads more than one tensor lookup")
    (lookup,) = lookups
    name, first, second = lookup.args
    source = sources[str(name)]
    if first == 0 and second == _J and not _is_one(kv_len):
        raise ReadsData(f"the padding mask '{name}' has one row, broadcast to every batch row (FA4's key padding "
                            "takes a row per batch row)")
    if first != _B or second != _J:
        raise ReadsData(f"the mask reads '{name}' at [{first}, {second}], not [batch, kv_idx]")
    columns = _example(source).shape[-1]
    # Under dynamic shapes the mask's width and the keys' length are separate symbols, equal
    # whenever the model runs; a guard makes the compiled graph conditional on that.
    if not guard_or_false(columns == kv_len):
        raise NotAnalyzable(f"padding mask '{name}' has {columns} columns for {kv_len} keys")
    return expr.xreplace({lookup: _KEEP}), source
