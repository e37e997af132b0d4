"""Prove what a FlexAttention ``score_mod`` is: the identity, a scale, or a tanh softcap.

FlexAttention calls ``score_mod(score, b, h, q_idx, kv_idx, *buffers)`` on
every scaled score ``q·k * scale``. The graph Dynamo traced for it is
evaluated symbolically, with ``score`` a sympy symbol. FA4 computes the same
thing when the result is ``a * score`` (a scale: FA4's softmax scale times
``a``) or ``a * tanh(c * score)`` with ``a, c > 0`` (FA4's ``softcap = a``
with the softmax scale times ``a * c``: Gemma 2's ``cap * tanh(score / cap)``
is ``a = cap, c = 1 / cap``). ALiBi, ``a * score + f * slopes[head] * kv_idx``
plus any term without ``kv_idx`` (``slopes[head] * (kv_idx - q_idx)``: a
constant per row, which softmax ignores), with ``slopes`` a captured 1-D
tensor, is FA4's ALiBi score_mod (``fa4.flash_attn_alibi_fwd``) with slopes
``f * slopes``. A score_mod that reads the indices otherwise (a relative bias
table, a bias not linear in ``kv_idx``) or a tensor otherwise is not
expressible, and the reason says which.
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
    """FA4's view of a score_mod: multiply the softmax scale by ``scale``; ``softcap`` 0 for none; ``alibi`` (the
    index of the captured slopes tensor among the score_mod's buffers, the factor on it) for ALiBi."""

    scale: float = 1.0
    softcap: float = 0.0
    alibi: tuple[int, float] | None = None


def _slope(index: int) -> sympy.Symbol:
    """The symbol of ``buffers[index][head]``: a slope per head."""
    return sympy.Symbol(f"slope{index}", real=True)


def analyze_score_mod(score_mod: torch.fx.GraphModule, buffers: tuple) -> ScoreTransform:
    """The FA4 equivalent of a score_mod graph, or :class:`NotAnalyzable` with the reason."""
    values: dict[torch.fx.Node, object] = {}
    placeholders = [n for n in score_mod.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 5 + len(buffers):
        raise NotAnalyzable(f"score_mod takes {len(placeholders)} inputs for {len(buffers)} captured buffers")
    for node, symbol in zip(placeholders, (_SCORE, *_INDICES)):
        values[node] = symbol
    tensors = {}
    for index, node in enumerate(placeholders[5:]):
        example = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(example, torch.Tensor):
            tensors[node] = index
            continue
        values[node] = example.node.expr if isinstance(example, (torch.SymInt, torch.SymFloat)) else example
    for node in score_mod.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if node.target is operator.getitem and node.args[0] in tensors:
            values[node] = _slope_read(node, tensors[node.args[0]], values)
            continue
        read = next((a for a in node.args if a in tensors), None)
        if read is not None:
            raise NotAnalyzable(f"score_mod reads the tensor '{read.name}' other than one entry per head")
        values[node] = _apply(node, [values.get(a, a) for a in node.args])
    return _transform(sympy.sympify(values[score_mod.graph.output_node().args[0]]))


def _slope_read(node: torch.fx.Node, index: int, values: dict) -> sympy.Symbol:
    """``buffer[head]`` of a 1-D float32 buffer: the head's slope."""
    buffer = node.args[0].meta.get("example_value", node.args[0].meta.get("val"))
    if values.get(node.args[1], node.args[1]) != _INDICES[1] or buffer.dim() != 1 or buffer.dtype != torch.float32:
        raise NotAnalyzable(f"score_mod reads the tensor '{node.args[0].name}' other than a float32 slope per head")
    return _slope(index)


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


def _alibi(expr) -> ScoreTransform | None:
    """``a * score + f * slope * kv_idx + (terms without kv_idx)`` as a scale and ALiBi, or None when ``expr`` is
    not that."""
    slopes = sorted((s for s in expr.free_symbols if s.name.startswith("slope")), key=str)
    expr = sympy.expand(expr)
    scale, bias = expr.coeff(_SCORE), expr - expr.coeff(_SCORE) * _SCORE
    kv_idx = _INDICES[3]
    slope_term = sympy.expand(sympy.diff(bias, kv_idx))
    if len(slopes) != 1 or _SCORE in bias.free_symbols or _positive_number(sympy.sympify(scale)) is None:
        return None
    factor = sympy.simplify(slope_term / slopes[0])
    if not factor.is_number or factor == 0 or kv_idx in sympy.expand(bias - slope_term * kv_idx).free_symbols:
        return None
    return ScoreTransform(scale=float(scale), alibi=(int(slopes[0].name.removeprefix("slope")), float(factor)))


def _transform(expr) -> ScoreTransform:
    if any(s.name.startswith("slope") for s in expr.free_symbols):
        alibi = _alibi(expr)
        if alibi is None:
            raise NotAnalyzable(f"score_mod computes {expr}: a slope per head not times kv_idx (plus a constant per "
                                "row) beside a scaled score, which is all FA4's ALiBi adds")
        return alibi
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
