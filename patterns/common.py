"""Analysis shared by the patterns: from an SDPA-style call to an FA4 decision."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function

from fa4_inductor.emit import example_value
from fa4_inductor.pattern_registry import RewriteContext, SiteDecision
from fa4_inductor.support import AttentionCall, unsupported_reason


def normalized_kwargs(node: Node) -> dict[str, Any]:
    """All arguments of an SDPA-like call node by parameter name."""
    normalized = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    if normalized is None:
        raise ValueError(f"cannot normalize the arguments of {node.target}")
    return dict(normalized.kwargs)


def _constant(name: str, value: Any, kinds: tuple[type, ...]) -> tuple[Any, str | None]:
    if isinstance(value, Node):
        return None, f"{name} is computed in the graph, not a constant"
    if value is not None and not isinstance(value, kinds):
        return None, f"{name}={value!r} has unexpected type {type(value).__name__}"
    return value, None


def _shape_text(value) -> str:
    return "(" + ", ".join(str(s) for s in value.shape) + ")"


def decide(
    node: Node,
    context: RewriteContext,
    query: Node,
    key: Node,
    value: Node,
    *,
    dropout_p: Any = 0.0,
    is_causal: Any = False,
    scale: Any = None,
    enable_gqa: Any = False,
    mask_reason: str | None = None,
) -> SiteDecision:
    """Decide one SDPA-style site (B,H,S,D operands) for FA4.

    ``mask_reason`` is the reason an attention mask could not be expressed
    in FA4 terms, if the site has such a mask.
    """
    q, k, v = (example_value(n) for n in (query, key, value))
    features: dict[str, Any] = {}
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return SiteDecision(node, "query/key/value have no tensor metadata", features)
    d, hq, hk = q.shape[-1], q.shape[1], k.shape[1]
    features.update(
        dtype=str(q.dtype).replace("torch.", ""), head_dim=int(d) if isinstance(d, int) else str(d),
        q_shape=_shape_text(q), k_shape=_shape_text(k), v_shape=_shape_text(v),
        gqa_ratio=(hq // hk) if isinstance(hq, int) and isinstance(hk, int) and hk else None,
        causal=False, window=None, softcap=None, padding=False,
    )
    reason = mask_reason
    constants = {}
    for name, val, kinds in (("dropout_p", dropout_p, (int, float)), ("is_causal", is_causal, (bool,)),
                             ("scale", scale, (int, float)), ("enable_gqa", enable_gqa, (bool,))):
        constants[name], bad = _constant(name, val, kinds)
        reason = reason or bad
    if reason:
        return SiteDecision(node, reason, features)
    call = AttentionCall.from_tensors(
        q, k, v, dropout_p=constants["dropout_p"] or 0.0, is_causal=bool(constants["is_causal"]),
        enable_gqa=bool(constants["enable_gqa"]),
    )
    if context.assume_cuda:
        call = dataclasses.replace(call, device=torch.device("cuda"))
    reason = unsupported_reason(call, context.devices, arch_major=context.arch_major)
    features["causal"] = bool(constants["is_causal"])
    softmax_scale = constants["scale"]
    if softmax_scale is None and isinstance(d, int):
        softmax_scale = 1.0 / math.sqrt(d)
    params = dict(
        softmax_scale=float(softmax_scale or 0.0), causal=features["causal"],
        window_left=-1, window_right=-1, softcap=0.0, seqused_k=None,
    )
    return SiteDecision(node, reason, features, params)
