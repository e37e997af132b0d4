"""The one table of the ops the graph analyses read, each with every parameter of its schema.

An analysis that matched an op by its name and some of its arguments assumed the rest (a slice's stop, a
division's ``rounding_mode``, an ``alpha``); this table says, for each op, which parameters the analysis models
(it reads their values), which only choose a layout, device or dtype (the result's dtype is read from the graph's
metadata and modeled where the analysis converts values), and which are modeled only at their default. A call
with any other argument, an extra positional argument or an op the table does not list makes the site fall back
with a reason naming it (:func:`unmodeled_argument`). Spellings share one entry: the torch function, the Tensor
method, the ``operator`` function, the in-place twin and the aten op (read by its name, ``aten.div.Tensor_mode`` as
``div``: its ``rounding_mode`` is then a keyword that must be None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch.fx import Node

from fa4_inductor.compile.fx_utils import op_name

# The ops that keep a tensor's values, by what they keep; each analysis sees through the classes it models.
# Casts to the result's dtype (what is kept depends on the two dtypes, which the analyses check):
DTYPE_CASTS = frozenset({"to", "type", "type_as", "float", "half", "bfloat16", "double", "int", "long", "bool"})
# Copies that keep values and gradients (``detach`` keeps the values only):
COPIES = frozenset({"clone", "contiguous"})
# Broadcasts: size-1 axes read at index 0.
BROADCASTS = frozenset({"expand", "expand_as"})

_LAYOUT = frozenset({"dtype", "layout", "device", "pin_memory", "requires_grad", "memory_format", "non_blocking",
                     "copy"})


@dataclasses.dataclass(frozen=True)
class ModeledOp:
    """What an analysis reads of one op: ``parameters`` in schema order (``self`` first for methods; a name
    starting with ``*`` takes every positional argument after it), of which ``modeled`` are read for their values
    and ``shape_only`` for a size or dtype (the result's shape and dtype come from the graph); ``defaults`` are
    allowed at that value only; ``semantics`` says what the analyses take the op to compute."""

    parameters: tuple[str, ...]
    semantics: str
    modeled: frozenset[str] = frozenset()
    shape_only: frozenset[str] = frozenset()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def unmodeled(self, name: str, args: tuple, kwargs: Mapping[str, Any]) -> str | None:
        """Why the call ``name(*args, **kwargs)`` has an argument this entry does not model, or None."""
        given: dict[str, Any] = {}
        for position, value in enumerate(args):
            if position >= len(self.parameters):
                if self.parameters and self.parameters[-1].startswith("*"):
                    continue
                return f"{name} with {len(args)} positional arguments, of which the analysis models {len(self.parameters)}"
            given[self.parameters[position].lstrip("*")] = value
        given.update(kwargs)
        for parameter, value in given.items():
            if parameter in self.modeled or parameter in self.shape_only or parameter in _LAYOUT:
                continue
            if parameter in self.defaults and _same(value, self.defaults[parameter]):
                continue
            return f"{name} with {parameter}={value!r}, which the analysis does not model"
        return None


def _same(value: Any, default: Any) -> bool:
    numbers = [isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, default)]
    if all(numbers):
        return value == default
    return value is default or (not any(numbers) and type(value) is type(default) and value == default)


def _op(parameters: str, semantics: str, modeled: str = "", shape_only: str = "", **defaults: Any) -> ModeledOp:
    return ModeledOp(tuple(parameters.split()), semantics, frozenset(modeled.split()), frozenset(shape_only.split()),
                     MappingProxyType(defaults))


_BINARY = _op("self other", "elementwise, operands broadcast", "self other")
_CAST = _op("self memory_format", "the value converted to the named dtype", "self")
_COPY = _op("self memory_format", "the value itself", "self")
_CREATE = _op("*size", "a new tensor of the given size and dtype", shape_only="size")
_CREATE_LIKE = _op("self", "a new tensor of self's size", shape_only="self")
_NEW = _op("self *size", "a new tensor of the given size", shape_only="self size")
_UNARY = _op("self", "elementwise", "self")
_SOFTMAX = _op("self dim", "softmax along dim (an optional dtype casts its input)", "self dim", "_stacklevel")
_VIEW = _op("self *shape", "the same values, the shape read from the result", "self", "shape")

TABLE: Mapping[str, ModeledOp] = MappingProxyType({
    # comparisons and logic
    **{name: _BINARY for name in ("lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or", "bitwise_and",
                                  "bitwise_or", "and_", "or_", "__and__", "__or__", "__lt__", "__le__", "__gt__",
                                  "__ge__", "__eq__", "__ne__")},
    **{name: _UNARY for name in ("invert", "__invert__", "logical_not", "bitwise_not", "abs", "__abs__", "neg",
                                 "__neg__", "tanh", "exp2")},
    **{name: _BINARY for name in ("pow", "__pow__")},
    **{name: _op("self other", "the larger of self and other, entry by entry", "self other")
       for name in ("max", "maximum")},
    # arithmetic
    **{name: _op("self other", "self + alpha * other", "self other", alpha=1) for name in ("add", "__add__",
                                                                                          "__radd__")},
    **{name: _op("self other", "self - alpha * other", "self other", alpha=1) for name in ("sub", "__sub__")},
    "rsub": _op("self other", "other - alpha * self", "self other", alpha=1),
    "__rsub__": _BINARY,
    **{name: _BINARY for name in ("mul", "__mul__", "__rmul__", "truediv", "__truediv__")},
    "div": _op("self other", "true division (no rounding)", "self other", rounding_mode=None),
    # ``div(..., rounding_mode="floor" | "trunc")`` is read as ``floor_divide`` (by the mask analysis only, "trunc"
    # where the values are nonnegative).
    **{name: _op("self other rounding_mode", "division rounded down", "self other rounding_mode")
       for name in ("floordiv", "__floordiv__", "floor_divide")},
    # casts and copies: the result's dtype is read from the graph
    **{name: _CAST for name in DTYPE_CASTS - {"to", "type", "type_as"}},
    "to": _op("self *args", "the value converted to the dtype of the result", "self", "args"),
    "type": _op("self dtype", "the value converted to the dtype of the result", "self", "dtype"),
    "type_as": _op("self other", "the value converted to other's dtype", "self", "other"),
    **{name: _COPY for name in COPIES},
    "detach": _UNARY,
    "copy_": _op("self src", "self now holds src, converted and broadcast to self", "src", "self"),
    # shapes and indexing
    "expand": _op("self *size", "size-1 axes broadcast (read at index 0)", "self", "size"),
    "expand_as": _op("self other", "size-1 axes broadcast to other's shape (read at index 0)", "self", "other"),
    **{name: _VIEW for name in ("view", "reshape", "_unsafe_view")},
    "unflatten": _op("self dim sizes", "axis dim split into sizes", "self dim sizes"),
    "unsqueeze": _op("self dim", "a new axis of size 1 at dim", "self dim"),
    "squeeze": _op("self *dim", "axes of size 1 removed", "self", "dim"),
    "permute": _op("self *dims", "axes reordered: axis k of the result is axis dims[k]", "self", "dims"),
    "getitem": _op("self index", "basic indexing (None, slices with step 1, integers) or a gather", "self index"),
    "tril": _op("self diagonal", "entries with col - row <= diagonal kept, the rest 0", "self diagonal"),
    "triu": _op("self diagonal", "entries with col - row >= diagonal kept, the rest 0", "self diagonal"),
    "transpose": _op("self dim0 dim1", "two axes swapped", "self dim0 dim1"),
    "repeat_interleave": _op("self repeats dim", "each entry repeated along dim", "self repeats dim",
                             "output_size"),
    # selection and fills
    "where": _op("condition self other", "self where condition, else other (dtype of the result)",
                 "condition self other"),
    "masked_fill": _op("self mask value", "value (converted to self's dtype) where mask, else self",
                       "self mask value"),
    # new tensors
    **{name: _CREATE for name in ("ones", "zeros")},
    **{name: _CREATE_LIKE for name in ("ones_like", "zeros_like")},
    **{name: _NEW for name in ("new_ones", "new_zeros")},
    "full": _op("size fill_value", "fill_value converted to the dtype of the result", "fill_value", "size"),
    "new_full": _op("self size fill_value", "fill_value converted to the dtype of the result", "fill_value",
                    "self size"),
    "arange": _op("start end step", "start, start + step, ... below end, in the dtype of the result",
                  "start end step"),
    **{name: _op("data", "a 0-d tensor holding data", "data") for name in ("tensor", "scalar_tensor")},
    **{name: _op("tensors dim", "the tensors joined along dim", "tensors dim") for name in ("cat", "concat",
                                                                                              "concatenate")},
    "hstack": _op("tensors", "the tensors joined along axis 1 (0 for 1-D)", "tensors"),
    "pad": _op("input pad mode value", "the last axes widened by (left, right) entries of value (mode constant)",
               "input pad mode value"),
    # attention
    "softmax": _SOFTMAX,
    "_softmax": _op("self dim half_to_float", "softmax along dim (in float32 with half_to_float)", "self dim",
                    "half_to_float"),
    "_safe_softmax": _op("self dim dtype", "softmax along dim, zeros in rows with no finite score", "self dim",
                         "dtype"),
    **{name: _op("self other", "matrix product", "self other") for name in ("matmul", "bmm")},
    "baddbmm": _op("self batch1 batch2", "beta * self + alpha * batch1 @ batch2", "self batch1 batch2 beta alpha"),
    "einsum": _op("equation *operands", "the product the equation names", "equation operands"),
    "dropout": _op("input p training inplace", "zeros with probability p in training, the rest scaled by 1/(1-p)",
                   "input p training", "inplace"),
})


# In-place spellings share their out-of-place twin's entry: the analyses read the value the op leaves in its tensor
# (``graph_mutations`` checks who else sees the write).
IN_PLACE = MappingProxyType({
    "masked_fill_": "masked_fill", "triu_": "triu", "tril_": "tril", "add_": "add", "sub_": "sub", "mul_": "mul",
    "div_": "div", "iadd": "add", "__iadd__": "add", "isub": "sub", "__isub__": "sub", "imul": "mul",
    "__imul__": "mul", "itruediv": "truediv", "__itruediv__": "truediv", "iand": "and_", "__iand__": "and_",
    "ior": "or_", "__ior__": "or_", "logical_and_": "logical_and", "logical_or_": "logical_or",
    "logical_not_": "logical_not", "bitwise_not_": "bitwise_not", "abs_": "abs", "copy_": "copy_"})


def unmodeled_argument(node: Node, name: str | None = None) -> str | None:
    """Why the call ``node`` (read as the op ``name``, by default its own) has an argument, or is an op, that the
    analyses do not model; None when every argument is modeled."""
    name = name or op_name(node)
    entry = TABLE.get(IN_PLACE.get(name or "", name or ""))
    if entry is None:
        return f"{name or node.target}, which the analysis does not model"
    return entry.unmodeled(name, tuple(node.args), node.kwargs)
