"""Prove what a FlexAttention ``score_mod`` is: the identity, a scale, or a tanh softcap.

FlexAttention calls ``score_mod(score, b, h, q_idx, kv_idx, *buffers)`` on
every scaled score ``q·k * scale``. The graph Dynamo traced for it is
evaluated symbolically, with ``score`` a sympy symbol. FA4 computes the same
thing when the result is ``a * score`` (a scale: FA4's softmax scale times
``a``) or ``a * tanh(c * score)`` with ``a, c > 0`` (FA4's ``softcap = a``
with the softmax scale times ``a * c``: Gemma 2's ``cap * tanh(score / cap)``
is ``a = cap, c = 1 / cap``). ALiBi, ``a * score + slope(head) * kv_idx`` plus
any term without ``kv_idx`` (``slope(head) * (kv_idx - q_idx)``: a constant per
row, which softmax ignores), where ``slope(head)`` is arithmetic of the head
index (attention-gym's ``exp2(-(h + 1) * 8 / H)``) and of at most one captured
float32 tensor read at the head (``slopes[h]``), is FA4's ALiBi score_mod
(``fa4.flash_attn_alibi_fwd``) with ``slope`` evaluated per head. A relative-position
table, ``a * score + table[head, kv_idx - q_idx + c]`` of a captured (H, N) float32
tensor, is FA4's relative-bias score_mod (``fa4.flash_attn_relative_bias_fwd``),
the table sliced to the offsets. A score_mod that reads the indices otherwise (a
bias not linear in ``kv_idx``) or a tensor otherwise is not expressible, and the
reason says which.
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
class AlibiSlope:
    """ALiBi's slope per head: ``expression`` in :data:`HEAD` and, where ``buffer`` is given, :data:`SLOPE` (that
    score_mod buffer read at the head)."""

    expression: sympy.Expr
    buffer: int | None = None


@dataclasses.dataclass(frozen=True)
class TableRead:
    """A relative-position table: score_mod buffer ``buffer``, (H, N) float32, read at ``[head, kv_idx - q_idx +
    start]``."""

    buffer: int
    start: int


@dataclasses.dataclass(frozen=True)
class ScoreTransform:
    """FA4's view of a score_mod: multiply the softmax scale by ``scale``; ``softcap`` 0 for none; ``alibi`` the
    slope per head of an ALiBi bias; ``table`` a relative-position table added to the scaled score."""

    scale: float = 1.0
    softcap: float = 0.0
    alibi: AlibiSlope | None = None
    table: TableRead | None = None


HEAD = _INDICES[1]
SLOPE = sympy.Symbol("slope", real=True)  # a captured tensor read at the head


def analyze_score_mod(score_mod: torch.fx.GraphModule, buffers: tuple) -> ScoreTransform:
    """The FA4 equivalent of a score_mod graph, or :class:`NotAnalyzable` with the reason."""
    values: dict[torch.fx.Node, object] = {}
    placeholders = [n for n in score_mod.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 5 + len(buffers):
        raise NotAnalyzable(f"score_mod takes {len(placeholders)} inputs for {len(buffers)} captured buffers")
    for node, symbol in zip(placeholders, (_SCORE, *_INDICES)):
        values[node] = symbol
    tensors, tables = {}, {}
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
            values[node] = _buffer_read(node, tensors[node.args[0]], values, tables)
            continue
        read = next((a for a in node.args if a in tensors), None)
        if read is not None:
            raise NotAnalyzable(f"score_mod reads the tensor '{read.name}' other than one entry per head")
        values[node] = _apply(node, [values.get(a, a) for a in node.args])
    return _transform(sympy.sympify(values[score_mod.graph.output_node().args[0]]), tables)


def _buffer_read(node: torch.fx.Node, index: int, values: dict, tables: dict) -> sympy.Symbol:
    """``buffer[head]`` of a 1-D float32 buffer: the head's slope (a symbol naming the buffer); ``buffer[head,
    kv_idx - q_idx + c]`` of a 2-D one (also read as ``buffer[head][...]``): a relative-position table's entry (a
    symbol, its read kept in ``tables``)."""
    buffer = node.args[0].meta.get("example_value", node.args[0].meta.get("val"))
    where = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    where = tuple(sympy.sympify(values.get(i, i)) for i in where)
    if buffer.dtype == torch.float32 and buffer.dim() == 1 and where == (HEAD,):
        return sympy.Symbol(f"slope{index}", real=True)
    if buffer.dtype == torch.float32 and buffer.dim() == 2 and len(where) == 2 and where[0] == HEAD:
        start = sympy.expand(where[1] - (_INDICES[3] - _INDICES[2]))
        if start.is_Integer:
            symbol = sympy.Symbol(f"table{index}", real=True)
            tables[symbol] = TableRead(index, int(start))
            return symbol
    raise NotAnalyzable(f"score_mod reads the tensor '{node.args[0].name}' other than a float32 slope per head or a "
                        "float32 table at [head, kv_idx - q_idx + c]")


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
    if name == "exp2":
        return sympy.Integer(2) ** args[0]
    if name in ("pow", "__pow__") and len(args) == 2 and not isinstance(args[1], torch.Tensor):
        return sympy.sympify(args[0]) ** args[1]
    if name in _CASTS:
        return args[0]
    raise NotAnalyzable(f"score_mod uses {name or node.target}, which FA4 has no equivalent for")


def _positive_number(value) -> float | None:
    return float(value) if value.is_number and value.is_positive else None


def _table(expr, read: set, tables: dict) -> ScoreTransform:
    """``a * score + table[head, kv_idx - q_idx + c]``: a scale and a relative-position table."""
    expr = sympy.expand(expr)
    (symbol,) = read if len(read) == 1 else (None,)
    scale = expr.coeff(_SCORE)
    if symbol is None or _positive_number(sympy.sympify(scale)) is None \
            or sympy.expand(expr - scale * _SCORE - symbol) != 0:
        raise NotAnalyzable(f"score_mod computes {expr}: not a scaled score plus one entry of a relative-position "
                            "table")
    return ScoreTransform(scale=float(scale), table=tables[symbol])


def _alibi(expr) -> ScoreTransform | None:
    """``a * score + slope(head) * kv_idx + (terms without kv_idx)`` as a scale and ALiBi, or None when ``expr`` is
    not that."""
    expr = sympy.expand(expr)
    scale = expr.coeff(_SCORE)
    bias = sympy.expand(expr - scale * _SCORE)
    batch, _, q_idx, kv_idx = _INDICES
    slope = sympy.expand(sympy.diff(bias, kv_idx))
    buffers = sorted((s for s in slope.free_symbols if s.name.startswith("slope")), key=str)
    if (_SCORE in bias.free_symbols or _positive_number(sympy.sympify(scale)) is None or len(buffers) > 1
            or slope.free_symbols & {_SCORE, batch, q_idx, kv_idx} or slope == 0
            or kv_idx in sympy.expand(bias - slope * kv_idx).free_symbols):
        return None
    buffer = int(buffers[0].name.removeprefix("slope")) if buffers else None
    expression = slope.subs(buffers[0], SLOPE) if buffers else slope
    return ScoreTransform(scale=float(scale), alibi=AlibiSlope(expression, buffer))


def _transform(expr, tables: dict) -> ScoreTransform:
    read = set(tables) & expr.free_symbols
    if read:
        return _table(expr, read, tables)
    if _INDICES[3] in expr.free_symbols:
        alibi = _alibi(expr)
        if alibi is None:
            raise NotAnalyzable(f"score_mod computes {expr}: not a slope per head times kv_idx (plus a constant per "
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
