"""FlexAttention: the ``flex_attention`` higher-order op in a Dynamo graph.

Matches: ``torch.ops.higher_order.flex_attention(q, k, v, score_mod,
block_mask, scale, kernel_options, score_buffers, mask_buffers)``, whatever
backend its kernel options ask for. Emits: ``fa4.flash_attn_fwd`` with the
parameters the mods prove, replacing the op's output and logsumexp; the block
mask the graph built for it (``create_block_mask`` inside the compiled
region) becomes dead and is removed. Extra check: the ``mask_mod`` graph is a
band, key padding, documents or an and of these
(:func:`fa4_inductor.compile.mask_analysis.analyze_mask_mod`), the ``score_mod`` graph
the identity, a scale or a tanh softcap
(:mod:`fa4_inductor.compile.score_mod_analysis`), the caller does not read the
running maxima, plus the SDPA rules.

The block mask is taken as what ``create_block_mask`` makes of the mask_mod:
the lists only skip blocks where the mask_mod is false. The exception is a
no-op mask_mod with real block lists (``BlockMask.from_kv_blocks`` without a
mask_mod), where the lists are the mask: that site stays with FlexAttention.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.nn.attention.flex_attention import _LARGE_SPARSE_BLOCK_SIZE

from fa4_inductor.compile.fx_utils import example_value, tuple_reads

from fa4_inductor.compile.emit import call_with_meta, emit_fa4, erase_if_unused, replace_tuple_outputs
from fa4_inductor.compile.mask_analysis import MaskStructure, NotAnalyzable, analyze_mask_mod
from fa4_inductor.compile.sites import (Alibi, AttentionPattern, GraphScale, RelativeBias, RewriteContext, SiteDecision,
                                        register)
from fa4_inductor.compile.score_mod_analysis import ScoreTransform, analyze_score_mod

from .common import decide

FLEX_ATTENTION = torch.ops.higher_order.flex_attention
_OUTPUT, _LOGSUMEXP, _MAX = range(3)


def _submodule(node: Node) -> torch.fx.GraphModule:
    return getattr(node.graph.owning_module, node.target)


def _lists_from_outside(block_mask: tuple) -> bool:
    """Were the block lists made outside this graph (a graph input)? Not the no-op mask flex_attention makes
    without a block mask (one huge block), nor lists the graph computed with ``create_block_mask``."""
    if tuple(block_mask[-3:-1]) == (_LARGE_SPARSE_BLOCK_SIZE, _LARGE_SPARSE_BLOCK_SIZE):
        return False
    return not _built_in_graph(block_mask[2])


def _built_in_graph(node: Node) -> bool:
    """Was ``node`` computed here from a mask_mod, by ``create_mask``'s vmap over (b, h, q_idx, kv_idx)?"""
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        if current in seen or not isinstance(current, Node):
            continue
        seen.add(current)
        if current.op == "call_function" and getattr(current.target, "__name__", "") == "_remove_batch_dim":
            return True
        pending.extend(current.all_input_nodes)
    return False


def _analyze_mods(score_mod: Node, block_mask: tuple, score_buffers, mask_buffers, q_len,
                  kv_len) -> tuple[MaskStructure | None, ScoreTransform, str | None]:
    try:
        transform = analyze_score_mod(_submodule(score_mod), tuple(score_buffers))
    except NotAnalyzable as exc:
        return None, ScoreTransform(), f"score_mod not expressible in FA4: {exc}"
    try:
        structure = analyze_mask_mod(_submodule(block_mask[-1]), tuple(mask_buffers), q_len, kv_len)
    except NotAnalyzable as exc:
        return None, transform, f"mask_mod not expressible in FA4: {exc}"
    if structure.is_full and _lists_from_outside(block_mask):
        return None, transform, ("the block mask lists blocks for a no-op mask_mod (BlockMask.from_kv_blocks): "
                                 "its block lists are the mask")
    return structure, transform, None


def _logsumexp_base(node: Node) -> str | None:
    """How the graph reads the op's logsumexp: ``"log2"`` when every use scales it by ln 2 (torch's flex_attention
    does for its kernels' base-2 statistics: in torch 2.11 for every backend, since for all but FLASH),
    ``"natural"`` when none does, ``"mixed"``, or None when it isn't read."""
    uses = [use for user in node.users if user.target is operator.getitem and user.args[1] == _LOGSUMEXP
            for use in user.users]
    scaled = [_scales_by_ln2(use) for use in uses]
    if not scaled:
        return None
    return "log2" if all(scaled) else "natural" if not any(scaled) else "mixed"


def _scales_by_ln2(node: Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.mul, torch.mul)
            and any(isinstance(a, float) and math.isclose(a, math.log(2.0)) for a in node.args))


def _reads_batch(structure: MaskStructure) -> bool:
    """Does the mask differ between batch rows (padding, per-row documents)? Ids shared by every row don't."""
    per_row_documents = isinstance(structure.segment_ids, Node) and example_value(structure.segment_ids).dim() == 2
    return structure.key_padding is not None or structure.key_lengths is not None or per_row_documents


def _block_rows(block_mask: tuple):
    """The batch size the block mask was built for."""
    return example_value(block_mask[2]).shape[0]


def _arguments(node: Node) -> tuple:
    args = list(node.args) + [()] * (9 - len(node.args))
    for index, name in ((7, "score_mod_other_buffers"), (8, "mask_mod_other_buffers")):
        args[index] = node.kwargs.get(name, args[index])
    return tuple(args)


def _scale(scale, factor: float):
    if isinstance(scale, Node):
        return GraphScale(number=factor, factors=(scale,))
    return float(scale) * factor


def _table_blocker(table, start: int, heads, q_len, kv_len) -> str | None:
    """Why a score_mod's relative-position table can't be FA4's table: a head count other than the query's, or
    offsets ``-(S_q - 1) .. S_kv - 1`` it does not cover (FlexAttention would read outside it)."""
    if not statically_known_true(table.shape[0] == heads):
        return f"a relative-position table for {table.shape[0]} heads, {heads} query heads"
    if not (statically_known_true(start - (q_len - 1) >= 0)
            and statically_known_true(start + kv_len <= table.shape[1])):
        return (f"the score_mod reads its table at kv_idx - q_idx + {start}, outside its {table.shape[1]} entries for "
                "some offsets")
    return None


def analyze(match: Match, context: RewriteContext) -> SiteDecision:
    """Decide a flex_attention site."""
    node = match.output_node()
    query, key, value, score_mod, block_mask, scale, kernel_options, score_buffers, mask_buffers = _arguments(node)
    q, k = example_value(query), example_value(key)
    structure, transform, blocker = _analyze_mods(score_mod, block_mask, score_buffers, mask_buffers,
                                                  q.shape[-2], k.shape[-2])
    read, whole = tuple_reads(node)
    if _MAX in read:
        blocker = blocker or "the caller reads the running maxima (AuxRequest(max_scores=True)), which FA4 doesn't return"
    if whole:
        blocker = blocker or "the op's result tuple is used as a whole"
    elif _logsumexp_base(node) == "mixed":
        blocker = blocker or "the op's logsumexp is read both in base 2 and in natural log"
    if q.shape[0] != k.shape[0]:
        blocker = blocker or "query and key/value have different batch sizes (a broadcast block mask)"
    if structure is not None and _reads_batch(structure) and _block_rows(block_mask) == 1 != q.shape[0]:
        blocker = blocker or ("the block mask was built for one batch row (B=None) but the mask_mod reads per-row "
                              "tensors: FlexAttention applies row 0's blocks to every row")
    alibi = None
    if transform.alibi is not None:
        slopes = None if transform.alibi.buffer is None else score_buffers[transform.alibi.buffer]
        alibi = Alibi(transform.alibi.expression, slopes)
        if slopes is not None and example_value(slopes).shape[0] != q.shape[1]:
            blocker = blocker or f"ALiBi slopes for {example_value(slopes).shape[0]} heads, {q.shape[1]} query heads"
    if transform.table is not None:
        table = score_buffers[transform.table.buffer]
        alibi, blocker = RelativeBias(table, table_start=transform.table.start), blocker or _table_blocker(
            example_value(table), transform.table.start, q.shape[1], q.shape[-2], k.shape[-2])
    decision = decide(
        node, context, query, key, value, scale=_scale(scale, transform.scale), softcap=transform.softcap,
        enable_gqa=bool(q.shape[1] != k.shape[1]), blocker=blocker, mask_structure=structure,
        read_inputs=[query, key, value, *score_buffers, *mask_buffers],  # not the block lists: FA4 needs none
        position_bias=alibi,
    )
    features = dict(decision.features, flex_backend=kernel_options.get("BACKEND", "AUTO"),
                    block_mask="graph input" if _lists_from_outside(block_mask) else "built in graph")
    operands = dataclasses.replace(decision.operands, dead=tuple(t for t in block_mask[2:-3] if isinstance(t, Node)))
    return dataclasses.replace(decision, features=features, operands=operands)


def rewrite(match: Match, decision: SiteDecision) -> None:
    """Replace the op's output and logsumexp (in the base the graph reads it in, :func:`_logsumexp_base`) by an FA4
    call's."""
    node = decision.node
    graph = node.graph
    out, lse = emit_fa4(decision, node)
    if _logsumexp_base(node) == "log2":
        with graph.inserting_before(node):
            lse = call_with_meta(graph, torch.mul, (lse, 1.0 / math.log(2.0)))
    _, _, _, score_mod, block_mask, _, _, _, _ = _arguments(node)
    replace_tuple_outputs(node, {_OUTPUT: out, _LOGSUMEXP: lse})
    for submodule in (score_mod, block_mask[-1]):
        if not submodule.users:
            graph.erase_node(submodule)
    erase_if_unused(list(decision.operands.dead))


FLEX = register(AttentionPattern(
    name="flex_attention",
    matches="torch.ops.higher_order.flex_attention (FlexAttention) with band/padding/document mask_mods and "
            "identity/scale/softcap/ALiBi score_mods",
    emits="fa4.flash_attn_fwd (+ fa4.flash_attn_bwd via autograd)",
    pattern=CallFunctionVarArgs(FLEX_ATTENTION),
    analyze=analyze,
    rewrite=rewrite,
))
