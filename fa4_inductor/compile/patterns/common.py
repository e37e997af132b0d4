"""Analysis shared by the patterns: from an SDPA-style call to an FA4 decision (reading the graph, writing nothing;
:mod:`fa4_inductor.compile.emit` writes what was decided)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true
from torch.fx.operator_schemas import normalize_function

from fa4_inductor.compile.bias_analysis import bias_in_mask
from fa4_inductor.compile.fx_utils import example_value, op_name

from fa4_inductor.compile.mask_analysis import MaskStructure, NotAnalyzable, ReadsData, analyze_mask
from fa4_inductor.compile.sites import (AddedMasks, Alibi, FA4Params, GraphScale, KeyBias, Operand, PositionBias,
                                        RelativeBias, RewriteContext, SiteDecision, SiteOperands)
from fa4_inductor.runtime.support import AttentionCall, is_dtensor, unsupported_reason


def normalized_kwargs(node: Node) -> dict[str, Any]:
    """All arguments of an SDPA-like call node by parameter name."""
    normalized = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    if normalized is None:
        raise ValueError(f"cannot normalize the arguments of {node.target}")
    return dict(normalized.kwargs)


def strip_kv_repeat(node: Node) -> tuple[Node, int]:
    """See through a GQA repeat of K or V; return (un-repeated node, repeat factor).

    Recognizes ``repeat_kv`` (``x[:, :, None].expand(B, Hkv, r, S, D).reshape(B, Hkv * r, S, D)``, also written
    with ``unsqueeze(2)``, ``view``, a ``contiguous()`` before it, or ``flatten(1, 2)``) and
    ``repeat_interleave(r, dim=1)`` (``r`` a graph scalar too, under dynamic shapes). Each puts copy ``i`` of head
    ``j`` at ``j * r + i``, which is FA4's GQA mapping. Returns ``(node, 1)`` for anything else.
    """
    if op_name(node) == "repeat_interleave":
        source, repeats = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(repeats, Node) and isinstance(example_value(repeats), torch.SymInt):
            # A count the graph computes (``q.shape[1] // k.shape[1]``): FA4's mapping holds for any count, so its
            # current value serves for the report, unguarded.
            repeats = example_value(repeats).node.hint
        source_value = example_value(source) if isinstance(source, Node) else None
        if isinstance(repeats, int) and dim in (1, -3) and isinstance(source_value, torch.Tensor) \
                and source_value.dim() == 4:
            return source, repeats
        return node, 1
    if op_name(node) == "flatten" and tuple(node.args[1:3]) == (1, 2) and not node.kwargs:
        expanded = node.args[0]
    elif op_name(node) in ("reshape", "view"):
        expanded = node.args[0]
    else:
        return node, 1
    if op_name(expanded) == "contiguous" and len(expanded.args) == 1 and not expanded.kwargs:
        expanded = expanded.args[0]
    if op_name(expanded) != "expand":
        return node, 1
    inserted = expanded.args[0]
    if op_name(inserted) == "unsqueeze" and inserted.args[1:] in ((2,), (-3,)):
        source = inserted.args[0]
    elif op_name(inserted) == "getitem" and inserted.args[1] in (
            (slice(None), slice(None), None), (slice(None), slice(None), None, slice(None), slice(None))):
        source = inserted.args[0]
    else:
        return node, 1
    base, out, mid = example_value(source), example_value(node), example_value(expanded)
    if not all(isinstance(t, torch.Tensor) for t in (base, out, mid)) or base.dim() != 4 or mid.dim() != 5:
        return node, 1
    b, hkv, s, d = base.shape
    repeats = mid.shape[2]
    if tuple(mid.shape) != (b, hkv, repeats, s, d) or tuple(out.shape) != (b, hkv * repeats, s, d):
        return node, 1
    return source, int(repeats)


def guarded_value(node: Node) -> float:
    """The value of a graph scalar (a dynamic float attribute), guarded so the graph is reused only while it holds."""
    value = example_value(node)
    return 0.0 if guard_or_false(value == 0) else float(value.node.hint)


def _constant(name: str, value: Any, kinds: tuple[type, ...], graph_scalar_ok: bool = False,
              guard_ok: bool = False) -> tuple[Any, str | None]:
    if graph_scalar_ok and isinstance(value, GraphScale):
        return value, None
    if isinstance(value, Node):
        scalar = isinstance(example_value(value), (torch.SymFloat, torch.SymInt))
        if graph_scalar_ok and scalar:
            return value, None  # a graph scalar (dynamic float): passed to the op as is
        if guard_ok and scalar:
            return guarded_value(value), None  # decided on its value, e.g. dropout_p of 0.0
        return None, f"{name} is computed in the graph, not a constant"
    if value is not None and not isinstance(value, kinds):
        return None, f"{name}={value!r} has unexpected type {type(value).__name__}"
    return value, None


def _as_float(value: Any) -> Any:
    """Python numbers become floats; graph scalars and deferred scales stay as they are."""
    return float(value) if isinstance(value, (int, float)) else value


def _shape_text(sizes) -> str:
    return "(" + ", ".join(str(s) for s in sizes) + ")"


def _operand(value: Node | Operand) -> Operand:
    return value if isinstance(value, Operand) else Operand(value)


def decide(
    node: Node,
    context: RewriteContext,
    query: Node | Operand,
    key: Node | Operand,
    value: Node | Operand,
    *,
    dropout_p: Any = 0.0,
    is_causal: Any = False,
    scale: Any = None,
    enable_gqa: Any = False,
    attn_mask: Node | AddedMasks | None = None,
    softcap: float = 0.0,
    blocker: str | None = None,
    mask_hides_where_true: bool = False,
    mask_structure: MaskStructure | None = None,
    mask_reader: Node | None = None,
    read_inputs: list | None = None,
    replaced: tuple[Node, ...] = (),
    position_bias: PositionBias | None = None,
) -> SiteDecision:
    """Decide one SDPA-style site (B,H,S,D operands) for FA4; reads the graph, writes nothing.

    GQA repeats of ``key``/``value`` are seen through; ``attn_mask`` is
    analyzed into causal/window parameters, or ``mask_structure`` gives them already analyzed (a FlexAttention
    mask_mod); ``blocker`` is a reason found
    by the caller that rules the site out; ``mask_hides_where_true`` says ``attn_mask`` marks the hidden keys
    (``scores.masked_fill(mask, -inf)``), not the kept ones, and ``mask_reader`` is the node that reads it (default
    ``node``). A site whose rewrite would miss an in-place write falls back (:mod:`fa4_inductor.compile.graph_mutations`);
    ``read_inputs`` are the inputs of ``node`` whose values the rewrite reads (default: all); ``replaced`` are nodes
    the rewrite may leave dead; ``position_bias`` ALiBi or a relative-position bias on the scores (FA4's score_mod for
    it takes no softcap and no mask given as data beside it); a bias ``attn_mask`` carries is found here.
    """
    query, key, value = (_operand(t) for t in (query, key, value))
    key, k_repeats = _strip_repeat(key)
    value, v_repeats = _strip_repeat(value)
    q, k, v = (t.example for t in (query, key, value))
    features: dict[str, Any] = {}
    operands = SiteOperands(query, key, value, replaced=tuple(replaced))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return SiteDecision(node, "query/key/value have no tensor metadata", features, operands=operands)
    if any(is_dtensor(t) for t in (q, k, v)):
        # An fa4 op on DTensors has no sharding rule. Left as SDPA, context parallelism's ring attention shards
        # it into per-shard aten flash calls, which the eager override runs on FA4.
        return SiteDecision(node, "query/key/value are DTensors (context or tensor parallel): left to DTensor's "
                            "SDPA handling; its per-shard flash calls run FA4 through the eager override",
                            features, operands=operands)
    d, hq, hk = q.shape[-1], q.shape[1], k.shape[1]
    features.update(
        dtype=str(q.dtype).replace("torch.", ""), head_dim=int(d) if isinstance(d, int) else str(d),
        q_shape=_shape_text(q.shape), k_shape=_shape_text(k.shape), v_shape=_shape_text(v.shape),
        gqa_ratio=(hq // hk) if isinstance(hq, int) and isinstance(hk, int) and hk else None,
        gqa_repeat_removed=k_repeats > 1, causal=False, window=None,
        softcap=(softcap or None) if isinstance(softcap, (int, float)) else "dynamic", padding=False,
        documents=False,
    )
    reason = blocker
    if k_repeats != v_repeats:
        reason = reason or "key and value are repeated differently"
    constants = {}
    for name, val, kinds in (("dropout_p", dropout_p, (int, float)), ("is_causal", is_causal, (bool,)),
                             ("scale", scale, (int, float)), ("enable_gqa", enable_gqa, (bool,)),
                             ("softcap", softcap, (int, float))):
        constants[name], bad = _constant(name, val, kinds, graph_scalar_ok=name in ("scale", "softcap"),
                                         guard_ok=name == "dropout_p")
        reason = reason or bad
    causal, window = bool(constants["is_causal"]), (-1, -1)
    modeled, data_mask = None, {}
    not_a_bias = None  # why a bias in the mask is not one FA4 adds, should the mask not be served otherwise either
    if isinstance(attn_mask, Node) and reason is None and not query.one_head:
        try:
            carried = bias_in_mask(attn_mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
                                   reader=mask_reader or node, mutations=context.mutations)
        except NotAnalyzable as exc:
            carried, not_a_bias = None, str(exc)
        if carried is not None:
            operands = dataclasses.replace(operands, replaced=(*operands.replaced, attn_mask))
            position_bias, attn_mask = _added(position_bias, carried.bias), carried.mask
            mask_hides_where_true, mask_reader = carried.hides_where_true, carried.mask_reader
            if position_bias is None:
                reason = "two position biases on the scores that FA4 does not add as one (only biases per key sum)"
    if attn_mask is not None and reason is None:
        try:
            mask_structure, mask_nodes, modeled = analyze_mask(
                attn_mask, q.shape[2], k.shape[2], hides_where_true=mask_hides_where_true, batch=q.shape[0],
                heads=q.shape[1], one_head=query.one_head,
                reader=mask_reader or node, mutations=context.mutations)
            masks = attn_mask.masks if isinstance(attn_mask, AddedMasks) else (attn_mask,)
            operands = dataclasses.replace(operands, dead=(*masks, *mask_nodes))
        except ReadsData as exc:
            blocked = _data_mask_blocker(attn_mask, q, k, query.one_head, constants["is_causal"])
            if blocked:
                reason = f"attn_mask not expressible in FA4: {exc}; as data: {blocked}"
            else:
                data_mask = dict(data_mask=attn_mask, data_mask_hides=mask_hides_where_true)
                features["mask"] = "data, checked at run time"
        except NotAnalyzable as exc:
            reason = f"attn_mask not expressible in FA4: {exc}"
    masks = data_mask
    if mask_structure is not None and reason is None:
        causal, window = mask_structure.causal, (mask_structure.window_left, mask_structure.window_right)
        if constants["is_causal"]:  # SDPA applies both: the mask and-ed with the causal triangle (S_q == S_kv)
            causal, window = window[0] < 0, (window[0], 0) if window[0] >= 0 else (-1, -1)
        masks = dict(key_padding=mask_structure.key_padding, key_padding_hides=mask_structure.key_padding_hides,
                     key_lengths=mask_structure.key_lengths, segment_ids=mask_structure.segment_ids)
        features["mask"] = "full" if mask_structure.is_full else "analyzed"
        features["padding"] = mask_structure.key_padding is not None or mask_structure.key_lengths is not None
        features["documents"] = mask_structure.segment_ids is not None
    if position_bias is not None and reason is None:
        kind, feature = {Alibi: ("ALiBi", "alibi"), RelativeBias: ("a relative-position bias", "relative_bias"),
                         KeyBias: ("a bias per key", "key_bias")}[type(position_bias)]
        features[feature] = True
        if masks.get("data_mask") is not None:
            reason = f"{kind} beside a mask given as data: FA4's op for it takes masks the graph builds"
        elif constants["softcap"]:
            reason = f"{kind} with softcap: FA4 takes one score_mod"
    if reason and not_a_bias:
        reason = f"{reason}; the bias it adds: {not_a_bias}"
    if reason:
        return SiteDecision(node, reason, features, operands=operands)
    # SDPA's is_causal flag is top-left aligned; a mask-derived structure is already FA4's.
    call = AttentionCall.from_tensors(
        q, k, v, dropout_p=constants["dropout_p"] or 0.0, is_causal=bool(constants["is_causal"]),
        enable_gqa=bool(constants["enable_gqa"]) or k_repeats > 1,
    )
    if context.assume_cuda:
        call = dataclasses.replace(call, device=torch.device("cuda"))
    reason = unsupported_reason(call, context.devices, arch_major=context.arch_major)
    softmax_scale = constants["scale"]
    if softmax_scale is None and reason is None:
        softmax_scale = 1.0 / math.sqrt(int(d))  # FA4 needs a static head dim: int() guards a symbolic one
    params = FA4Params(softmax_scale=_as_float(softmax_scale), causal=causal, window_left=window[0],
                       window_right=window[1], softcap=_as_float(constants["softcap"]), position_bias=position_bias,
                       **masks)
    if reason is None and context.mutations is not None:
        reason = context.mutations.unsafe_read(
            node, [t.source for t in (query, key, value)] + [h.factor for h in query.head_scales]
            + list(params.mask_sources), modeled, read_inputs)
    features.update(causal=causal, window=None if window == (-1, -1) else window)
    return SiteDecision(node, reason, features, params if reason is None else None, operands)


def _added(bias: PositionBias | None, other: PositionBias) -> PositionBias | None:
    """``other``, or the two biases as one where both are biases per key (their tables summed); else None."""
    if bias is None:
        return other
    if isinstance(bias, KeyBias) and isinstance(other, KeyBias):
        return dataclasses.replace(bias, plus=(*bias.plus, other))  # (the table of ``other`` sums its own)
    return None


def _data_mask_blocker(mask: Node | AddedMasks, q, k, one_head: bool, is_causal) -> str | None:
    """Why a mask given as data can't be decided at run time here, or None."""
    if isinstance(mask, AddedMasks):
        return "masks added one after another, not one tensor to read"
    value = example_value(mask)
    if is_causal:
        return "is_causal=True as well (SDPA would and the two)"
    if one_head:
        return "the attention is written over (B * H, S, D), so the mask's axes are not FA4's"
    if not isinstance(value, torch.Tensor) or not (value.dtype == torch.bool or value.is_floating_point()):
        return "it is not a bool or float tensor"
    if value.requires_grad:
        return "it needs a gradient (a learned bias), which the attention kernels do not give"
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if value.dim() > 4 or not all(statically_known_true(size == 1) or statically_known_true(size == want)
                                  for size, want in zip(reversed(value.shape), reversed(target))):
        return f"its shape {_shape_text(value.shape)} does not broadcast to (B, H, S_q, S_kv) = {_shape_text(target)}"
    return None


def _strip_repeat(operand: Operand) -> tuple[Operand, int]:
    """:func:`strip_kv_repeat` of an operand the graph holds as it is."""
    if operand.transposed or operand.one_head:
        return operand, 1
    source, repeats = strip_kv_repeat(operand.source)
    return Operand(source), repeats
