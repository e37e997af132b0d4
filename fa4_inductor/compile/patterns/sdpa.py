"""``F.scaled_dot_product_attention`` (and ``aten.scaled_dot_product_attention``).

Matches: an SDPA call: ``is_causal``, ``scale``, ``enable_gqa`` in any
combination, GQA written as ``repeat_kv``/``repeat_interleave`` on K/V, and
an ``attn_mask`` built in the graph from index arithmetic (as Hugging Face
models build it). Emits: ``fa4.flash_attn_fwd`` on ``transpose(1, 2)``
views of the un-repeated K/V, with the mask turned into ``causal`` /
``window_size_*`` and removed from the graph; autograd of the op gives
``fa4.flash_attn_bwd`` in the backward graph. Extra check: the mask is
provably a band around the diagonal (:mod:`fa4_inductor.compile.mask_analysis`),
and :func:`fa4_inductor.runtime.support.unsupported_reason`.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match

from fa4_inductor.compile.sites import AttentionPattern, RewriteContext, SiteDecision, register

from fa4_inductor.compile.emit import replace_with_fa4

from .common import decide, normalized_kwargs

aten = torch.ops.aten
SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    aten.scaled_dot_product_attention,
    aten.scaled_dot_product_attention.default,
)


def analyze(match: Match, context: RewriteContext) -> SiteDecision:
    """Decide an SDPA site."""
    node = match.output_node()
    kw = normalized_kwargs(node)
    return decide(
        node, context, kw["query"], kw["key"], kw["value"],
        dropout_p=kw.get("dropout_p", 0.0), is_causal=kw.get("is_causal", False),
        scale=kw.get("scale"), enable_gqa=kw.get("enable_gqa", False), attn_mask=kw.get("attn_mask"),
        replaced=(kw["key"], kw["value"]),
    )


def rewrite(match: Match, decision: SiteDecision) -> None:
    """Replace the SDPA node by an FA4 call."""
    replace_with_fa4(decision, decision.node)


SDPA = register(AttentionPattern(
    name="sdpa",
    matches="F.scaled_dot_product_attention / aten.scaled_dot_product_attention (+ in-graph masks, repeat_kv)",
    emits="fa4.flash_attn_fwd (+ fa4.flash_attn_bwd via autograd)",
    pattern=CallFunctionVarArgs(SDPA_TARGETS),
    analyze=analyze,
    rewrite=rewrite,
))
