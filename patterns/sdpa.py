"""``F.scaled_dot_product_attention`` (and ``aten.scaled_dot_product_attention``).

Matches: an SDPA call with no mask (``is_causal``, ``scale``, ``enable_gqa``
in any combination). Emits: ``fa4.flash_attn_fwd`` on ``transpose(1, 2)``
views, its output transposed back; autograd of the op gives
``fa4.flash_attn_bwd`` in the backward graph. Extra check:
:func:`fa4_inductor.support.unsupported_reason` (dtype, head dims,
dropout, causal alignment, ...).
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match

from fa4_inductor.emit import fa4_attention
from fa4_inductor.pattern_registry import AttentionPattern, RewriteContext, SiteDecision, register

from .common import decide, normalized_kwargs

aten = torch.ops.aten
SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    aten.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
)


def analyze(match: Match, context: RewriteContext) -> SiteDecision:
    """Decide an SDPA site; masks are not handled by this pattern."""
    node = match.output_node()
    kw = normalized_kwargs(node)
    mask_reason = "attn_mask is not a mask FA4 can express" if kw.get("attn_mask") is not None else None
    return decide(
        node, context, kw["query"], kw["key"], kw["value"],
        dropout_p=kw.get("dropout_p", 0.0), is_causal=kw.get("is_causal", False),
        scale=kw.get("scale"), enable_gqa=kw.get("enable_gqa", False), mask_reason=mask_reason,
    )


def rewrite(match: Match, decision: SiteDecision) -> None:
    """Replace the SDPA node by an FA4 call."""
    node = decision.node
    kw = normalized_kwargs(node)
    with node.graph.inserting_before(node):
        out, _ = fa4_attention(node.graph, kw["query"], kw["key"], kw["value"], decision.params)
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)


SDPA = register(AttentionPattern(
    name="sdpa",
    matches="F.scaled_dot_product_attention / aten.scaled_dot_product_attention",
    emits="fa4.flash_attn_fwd (+ fa4.flash_attn_bwd via autograd)",
    pattern=CallFunctionVarArgs(SDPA_TARGETS),
    analyze=analyze,
    rewrite=rewrite,
))
