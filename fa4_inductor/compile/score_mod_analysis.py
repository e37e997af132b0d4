"""Prove what a FlexAttention ``score_mod`` is: the identity, a scale, or a tanh softcap.

FlexAttention calls ``score_mod(score, b, h, q_idx, kv_idx, *buffers)`` on
every scaled score ``q·k * scale``. The graph Dynamo traced for it is
evaluated symbolically, with ``score`` a sympy symbol. FA4 computes the same
thing when the result is ``a * score`` (a scale: FA4's softmax scale times
``a``) or ``a * tanh(c * score)`` with ``a, c > 0`` (FA4's ``softcap = a``
with the softmax scale times ``a * c``: Gemma 2's ``cap * tanh(score / cap)``
is ``a = cap, c = 1 / cap``). A score_mod that reads the batch, head or
position indices (a relative bias, ALiBi) or a tensor is not expressible,
and the reason says which.
"""

from __future__ import annotations

import dataclasses
import operator

import sympy
import torch

from fa4_inductor.compile import modeled_ops
from fa4_inductor.compile.fx_utils import op_name
from fa4_inductor.compile.mask_analysis import NotAnalyzable

_SCORE = sympy.Symbol("score", real=True)
_INDICES = sympy.symbols("batch head q_idx kv_idx", integer=True)

_BINARY = {"mul": operator.mul, "__mul__": operator.mul, "__rmul__": operator.mul,
           "truediv": operator.truediv, "div": operator.truediv, "__truediv__": operator.truediv,
           "add": operator.add, "__add__": operator.add, "__radd__": operator.add,
           "sub": operator.sub, "__sub__": operator.sub}
# Casts and copies keep a score and its gradient; a cast to a type narrower than float32 is refused where read.
_CASTS = modeled_ops.DTYPE_CASTS | modeled_ops.COPIES


@dataclasses.dataclass(frozen=True)
class ScoreTransform:
    """FA4's view of a score_mod: multiply the softmax scale by ``scale``; ``softcap`` 0 for none."""

    scale: float = 1.0
    softcap: float = 0.0


def analyze_score_mod(score_mod: torch.fx.GraphModule, buffers: tuple) -> ScoreTransform:
    """The FA4 equivalent of a score_mod graph, or :class:`NotAnalyzable` with the reason."""
    values: dict[torch.fx.Node, object] = {}
    placeholders = [n for n in score_mod.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 5 + len(buffers):
        raise NotAnalyzable(f"score_mod takes {len(placeholders)} inputs for {len(buffers)} captured buffers")
    for node, symbol in zip(placeholders, (_SCORE, *_INDICES)):
        values[node] = symbol
    for node in placeholders[5:]:
        example = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(example, torch.Tensor):
            raise NotAnalyzable(f"score_mod reads the tensor '{node.name}'")
        values[node] = example.node.expr if isinstance(example, (torch.SymInt, torch.SymFloat)) else example
    for node in score_mod.graph.nodes:
        if node.op in ("call_function", "call_method"):
            values[node] = _apply(node, [values.get(a, a) for a in node.args])
    return _transform(sympy.sympify(values[score_mod.graph.output_node().args[0]]))


def _apply(node: torch.fx.Node, args: list):
    name = op_name(node)
    unmodeled = modeled_ops.unmodeled_argument(node)
    if unmodeled is not None:
        raise NotAnalyzable(f"score_mod uses {unmodeled}")
    if name in _CASTS and node.meta.get("example_value", node.meta.get("val")) is not None:
        result = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(result, torch.Tensor) and result.dtype not in (torch.float32, torch.float64):
            raise NotAnalyzable(f"score_mod converts the score to {result.dtype}, which FA4 does not round to")
    if name in _BINARY and len(args) == 2:
        return _BINARY[name](*args)
    if name in ("neg", "__neg__"):
        return -args[0]
    if name == "tanh":
        return sympy.tanh(args[0])
    if name in _CASTS:
        return args[0]
    raise NotAnalyzable(f"score_mod uses {name or node.target}, which FA4 has no equivalent for")


def _positive_number(value) -> float | None:
    return float(value) if value.is_number and value.is_positive else None


def _transform(expr) -> ScoreTransform:
    if expr.free_symbols - {_SCORE}:
        names = ", ".join(sorted(str(s) for s in expr.free_symbols - {_SCORE}))
        raise NotAnalyzable(f"score_mod depends on {names} (a bias FA4 has no parameter for)")
    factor, rest = expr.as_coeff_Mul()
    if rest == _SCORE and _positive_number(factor) is not None:
        return ScoreTransform(scale=float(factor))
    if isinstance(rest, sympy.tanh) and _positive_number(factor) is not None:
        inner_factor, inner = rest.args[0].as_coeff_Mul()
        if inner == _SCORE and _positive_number(inner_factor) is not None:
            return ScoreTransform(scale=float(factor) * float(inner_factor), softcap=float(factor))
    raise NotAnalyzable(f"score_mod computes {expr}, not a scale or a tanh softcap of the score")
