"""Prove that a tensor added to attention scores in model code is ALiBi, a relative-position bias or a bias per key.

MPT adds ``slopes * arange(1 - S, 1)`` (slopes shaped (1, H, 1, 1), computed with ``pow``) to its scaled scores,
other code ``slopes[h] * (kv - q)`` from ``arange`` differences or a slopes buffer. The term's values are evaluated
as masks are (:func:`.mask_analysis.evaluate_values`: index arithmetic exactly, a float tensor it can't follow as an
opaque read of that tensor). ALiBi is a formula ``slope(h) * kv_idx + (terms without kv_idx)``: the terms without
``kv_idx`` are a constant per row, which softmax ignores, so ``slope(h) * (kv_idx - q_idx)`` and ``slope(h) * kv_idx``
are the same attention as FA4's ALiBi op computes. ``slope(h)`` is arithmetic of the head index and of at most one
opaque tensor read at the head (or at one entry, shared by every head). Anything else (a table read at the
relative position, as T5's bias is; a bias rounded to 16 bits; a slope per batch row; learned slopes, whose gradient
FA4 does not give) is not ALiBi. A bias that depends on the head and ``kv_idx - q_idx`` only, however computed
(T5's buckets: ``log`` of the relative position, ``where``, an embedding lookup), is a relative-position bias, which
FA4 adds from a table of one entry per offset. A bias that is the same for every query (Falcon's ALiBi over positions
counted from the attention mask, rounded to bf16) is a bias per key, which FA4 adds from its first query row. A bias
that depends on anything else is refused, naming it.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
from torch.fx import Node

from fa4_inductor.compile import graph_mutations, mask_analysis, modeled_ops
from fa4_inductor.compile.fx_utils import example_value, op_name
from fa4_inductor.compile.mask_analysis import INDICES, IsAMask, NotAnalyzable, Opaque, evaluate_values
from fa4_inductor.compile.score_mod_analysis import HEAD, SLOPE
from fa4_inductor.compile.sites import Alibi, KeyBias, OffsetChain, PositionBias, RelativeBias


def alibi_bias(term: Node, shape: tuple, *, reader: Node | None = None,
               mutations: graph_mutations.Mutations | None = None, folded: bool = False) -> Alibi:
    """The ALiBi that ``term`` adds to scores of ``shape`` (B, H, S_q, S_kv) as ``reader`` reads it; raises
    :class:`.mask_analysis.NotAnalyzable` saying why it is not ALiBi."""
    values = evaluate_values(term, shape, reader=reader, mutations=mutations, folded=folded)
    batch, head, q_idx, kv_idx = INDICES
    expr = sympy.expand(values.expr)
    for read in expr.atoms(Opaque):
        if any(kv_idx in sympy.sympify(i).free_symbols for i in _indices(read)):
            name = read.args[0].name
            raise NotAnalyzable(f"the bias reads '{name}' at the key position, which the analysis does not model "
                                f"({values.why_opaque[name]}): not ALiBi")
    slope = sympy.expand(sympy.diff(expr, kv_idx))
    if slope == 0:
        raise NotAnalyzable("the bias does not change along the keys")
    if kv_idx in sympy.expand(expr - slope * kv_idx).free_symbols or _index_symbols(slope) - {head}:
        raise NotAnalyzable(f"the bias {expr} is not a slope per head times kv_idx plus a constant per row")
    reads = sorted(slope.atoms(Opaque), key=str)
    if len(reads) > 1:
        raise NotAnalyzable(f"the bias's slope {slope} reads {len(reads)} tensors: one slope tensor only")
    if not reads and not _arithmetic(slope):
        raise NotAnalyzable(f"the bias's slope {slope} is not sums, products and powers of the head index")
    if not reads:
        return Alibi(slope.xreplace({head: HEAD}))
    if not _arithmetic(slope.xreplace({r: SLOPE for r in reads})):
        raise NotAnalyzable(f"the bias's slope {slope} is not sums, products and powers of the head index and of "
                            "one slope tensor")
    read = reads[0]
    index = tuple(None if arg == head else int(arg) if arg.is_Integer else arg for arg in _indices(read))
    if any(isinstance(i, sympy.Basic) for i in index):
        raise NotAnalyzable(f"the bias reads its slopes '{read.args[0].name}' at {index}: at the head or at fixed "
                            "indices only")
    return Alibi(slope.xreplace({read: SLOPE, head: HEAD}), values.opaque[read.args[0].name], index)


def _arithmetic(expr) -> bool:
    """Is ``expr`` numbers and symbols joined by sums, products and powers (what emission writes per head)?"""
    return all(isinstance(e, (sympy.Add, sympy.Mul, sympy.Pow, sympy.Number, sympy.Symbol))
               for e in sympy.preorder_traversal(expr))


def _indices(read: Opaque) -> tuple:
    return read.args[1:]


def _index_symbols(expr) -> set:
    """The attention's indices ``expr`` depends on, inside opaque reads too."""
    return expr.free_symbols & set(INDICES)


def relative_bias(term: Node, shape: tuple, *, reader: Node | None = None,
                  mutations: graph_mutations.Mutations | None = None, folded: bool = False) -> RelativeBias:
    """``term`` as a bias that depends on the head and ``kv_idx - q_idx`` only (T5's buckets: ``log`` of the relative
    position, ``where``, an embedding lookup, ``permute``); raises :class:`.mask_analysis.NotAnalyzable` saying
    what else it depends on."""
    values = evaluate_values(term, shape, reader=reader, mutations=mutations, folded=folded)
    batch, head, q_idx, kv_idx = INDICES
    offset = sympy.Symbol("offset", integer=True)
    shifted = values.expanded(values.expr).xreplace({kv_idx: q_idx + offset})
    others = sorted(str(s) for s in shifted.free_symbols & {batch, q_idx})
    if others:
        raise NotAnalyzable(f"the bias depends on {', '.join(others)} besides the head and kv_idx - q_idx")
    return RelativeBias(term, chain=None if folded else _offset_chain(term, values, shape), folded=folded)


# What the ops between the relative positions and the bias may be for emission to run them on one row of offsets:
# elementwise ops, embedding lookups, and views that only move or add axes.
_ROW_OPS = mask_analysis.ELEMENTWISE | {"zeros_like", "ones_like", "embedding", "permute", "unsqueeze",
                                        "transpose"} | modeled_ops.COPIES


def _offset_chain(term: Node, values, shape: tuple) -> OffsetChain | None:
    """Where ``term`` is computed from one (S_q, S_kv) tensor of relative positions ``kv - q + c`` by
    :data:`_ROW_OPS` alone (other inputs: embedding weights and 0-d tensors), that tensor and the ops in graph order:
    run on a (1, S_q + S_kv - 1) row of offsets, they give the table itself (T5's buckets, O(S) work instead of the
    (S_q, S_kv) grid); else None."""
    x0, x1 = (sympy.Symbol(f"x{k}", integer=True) for k in (0, 1))
    for source, formula in values.formulas.items():
        example = example_value(source)
        if not (isinstance(formula, mask_analysis.IndexTensor) and isinstance(example, torch.Tensor)
                and tuple(example.shape) == tuple(shape[2:]) and not formula.additive
                and isinstance(sympy.sympify(formula.expr), sympy.Expr)):
            continue
        start = sympy.expand(sympy.sympify(formula.expr) - (x1 - x0))
        if not start.is_Integer:
            continue
        chain = _between(source, term)
        if chain is not None and _row_shaped(OffsetChain(source, int(start), chain), shape):
            return OffsetChain(source, int(start), chain)
    return None


def _row_shaped(chain: OffsetChain, shape: tuple) -> bool:
    """Do ``chain``'s ops, run on fake tensors with the positions a (1, S_q + S_kv - 1) row, give a bias that
    broadcasts to (B, H, 1, S_q + S_kv - 1), the offsets along the keys (not moved to another axis)?"""
    positions = example_value(chain.positions)
    row_shape = (*shape[:2], 1, shape[2] + shape[3] - 1)
    try:
        with positions.fake_mode:
            values = {chain.positions: torch.empty((1, row_shape[3]), dtype=positions.dtype, device=positions.device)}
            for node in chain.ops:
                target = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
                args, kwargs = (torch.fx.node.map_arg(a, lambda n: values.get(n, example_value(n)))
                                for a in (node.args, node.kwargs))
                values[node] = target(*args, **kwargs)
            result = values[chain.ops[-1]]
            return tuple(torch.broadcast_shapes(tuple(result.shape), row_shape)) == row_shape
    except Exception:  # an op that does not take the row: emission reads the grid instead
        return False


def _between(source: Node, term: Node) -> tuple[Node, ...] | None:
    """The nodes on paths from ``source`` to ``term`` (``term`` included), in graph order, where each is one of
    :data:`_ROW_OPS` whose other tensor inputs are an embedding's weight or 0-d; else None."""
    chain, pending = set(), [term]
    while pending:
        node = pending.pop()
        if node in chain or node is source:
            continue
        chain.add(node)
        pending.extend(n for n in node.all_input_nodes if _depends_on(n, source))
    for node in chain:
        name = op_name(node)
        if modeled_ops.IN_PLACE.get(name, name) not in _ROW_OPS or node.op not in ("call_function", "call_method"):
            return None
        for argument in node.all_input_nodes:
            example = example_value(argument)
            if argument is source or argument in chain:
                continue
            weight = name == "embedding" and argument is node.args[1]
            if not weight and not (isinstance(example, torch.Tensor) and example.dim() == 0):
                return None
    order = {n: i for i, n in enumerate(term.graph.nodes)}
    return tuple(sorted(chain, key=order.__getitem__))


def _depends_on(node: Node, source: Node) -> bool:
    """Is ``source`` an ancestor of ``node`` (or ``node`` itself)?"""
    seen, pending = set(), [node]
    while pending:
        current = pending.pop()
        if current is source:
            return True
        if current not in seen:
            seen.add(current)
            pending.extend(current.all_input_nodes)
    return False


def key_bias(term: Node, shape: tuple, *, reader: Node | None = None,
             mutations: graph_mutations.Mutations | None = None, folded: bool = False) -> KeyBias:
    """``term`` as a bias that is the same for every query (a function of the batch row, the head and ``kv_idx``);
    raises :class:`.mask_analysis.NotAnalyzable` saying otherwise."""
    values = evaluate_values(term, shape, reader=reader, mutations=mutations, folded=folded)
    if INDICES[2] in values.expanded(values.expr).free_symbols:
        raise NotAnalyzable("the bias differs between queries")
    return KeyBias(term, folded=folded)


def position_bias(term: Node, shape: tuple, *, reader: Node | None = None,
                  mutations: graph_mutations.Mutations | None = None, folded: bool = False) -> PositionBias:
    """``term`` as ALiBi (:func:`alibi_bias`), else as a relative-position bias (:func:`relative_bias`), else as a
    bias per key (:func:`key_bias`); raises :class:`.mask_analysis.NotAnalyzable` saying why it is none of these
    (:class:`.mask_analysis.IsAMask` for a mask)."""
    refusals = []
    for kind, analysis in (("ALiBi", alibi_bias), ("a relative-position bias", relative_bias),
                           ("a bias per key", key_bias)):
        try:
            return analysis(term, shape, reader=reader, mutations=mutations, folded=folded)
        except IsAMask:
            raise
        except NotAnalyzable as exc:
            refusals.append(f"not {kind} ({exc})")
    raise NotAnalyzable("; ".join(refusals))


@dataclasses.dataclass(frozen=True)
class MaskWithBias:
    """An attention mask that carries a position bias: ``bias`` (held by ``term``) and the mask left when it is taken
    out (None: no mask), read by ``mask_reader``, hiding where true with ``hides_where_true``."""

    bias: PositionBias
    term: Node  # the tensor holding the bias
    mask: Node | None
    hides_where_true: bool = False
    mask_reader: Node | None = None


def bias_in_mask(mask: Node, shape: tuple, *, reader: Node | None = None,
                 mutations: graph_mutations.Mutations | None = None, folded: bool = False) -> MaskWithBias | None:
    """``mask`` as a position bias (:func:`position_bias`) and a mask where it is one of ``bias``, ``bias + mask``,
    ``masked_fill(bias, hidden, -inf)`` or ``where(kept, bias, -inf)`` (Falcon lays its causal mask over its ALiBi so,
    T5 adds its padding mask to its bias; -inf or a fill below -1e30); None where no part of it is a bias. Raises
    :class:`.mask_analysis.NotAnalyzable` where a part is a bias FA4 does not add."""
    if op_name(mask) in modeled_ops.COPIES and isinstance(mask.args[0], Node):  # Hugging Face's .contiguous()
        return bias_in_mask(mask.args[0], shape, reader=mask, mutations=mutations, folded=folded)
    if op_name(mask) in modeled_ops.DTYPE_CASTS and isinstance(mask.args[0], Node) and _rounds(mask):
        return _rounded(bias_in_mask(mask.args[0], shape, reader=mask, mutations=mutations, folded=folded), mask,
                        shape, mutations, folded)
    fill_index = {"masked_fill": 2, "masked_fill_": 2, "where": 2}.get(op_name(mask))
    if fill_index is not None and len(mask.args) > fill_index and _hides(mask.args[fill_index]):
        bias, condition = (mask.args[0], mask.args[1]) if op_name(mask) != "where" else (mask.args[1], mask.args[0])
        if isinstance(bias, Node) and isinstance(condition, Node):
            found = _bias_or_none(bias, shape, mask, mutations, folded)
            return found and MaskWithBias(found, bias, condition, op_name(mask) != "where", mask)
    if op_name(mask) in ("add", "__add__") and all(isinstance(a, Node) for a in mask.args[:2]) \
            and not modeled_ops.unmodeled_argument(mask):
        refused = None
        for bias, rest in ((mask.args[0], mask.args[1]), (mask.args[1], mask.args[0])):
            try:
                return MaskWithBias(position_bias(bias, shape, reader=mask, mutations=mutations, folded=folded),
                                    bias, rest, mask_reader=mask)
            except IsAMask:
                continue
            except NotAnalyzable as exc:
                refused = refused or exc
        if refused is not None:
            raise refused
        return None
    found = _bias_or_none(mask, shape, reader, mutations, folded)
    return found and MaskWithBias(found, mask, None)


def _rounds(cast: Node) -> bool:
    """Does ``cast`` round float values to a narrower float type (SDPA's mask in q's dtype)?"""
    before, after = example_value(cast.args[0]), example_value(cast)
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.is_floating_point()
            and after.is_floating_point() and after.dtype.itemsize < before.dtype.itemsize)


def _rounded(carried: MaskWithBias | None, cast: Node, shape: tuple, mutations, folded: bool) -> MaskWithBias | None:
    """``carried`` as read through ``cast``: a table bias rounded to its dtype (0 and -inf, the mask's values, round to
    themselves, and a bias plus 0 to the bias rounded); ALiBi, which FA4 computes in float32, as the relative-position
    bias or the bias per key of its rounded values."""
    if carried is None:
        return None
    bias = carried.bias
    if isinstance(bias, Alibi):
        reader = carried.mask_reader or cast
        try:
            bias = relative_bias(carried.term, shape, reader=reader, mutations=mutations, folded=folded)
        except NotAnalyzable:
            bias = key_bias(carried.term, shape, reader=reader, mutations=mutations, folded=folded)
    return dataclasses.replace(carried, bias=dataclasses.replace(bias, dtype=example_value(cast).dtype))


def _bias_or_none(bias: Node, shape: tuple, reader: Node | None, mutations, folded: bool) -> PositionBias | None:
    try:
        return position_bias(bias, shape, reader=reader, mutations=mutations, folded=folded)
    except IsAMask:
        return None


def _hides(fill) -> bool:
    return isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill <= -1e30
