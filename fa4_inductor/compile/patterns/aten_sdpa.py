"""The aten ops SDPA lowers to, when user code calls them directly.

Matches: ``aten._scaled_dot_product_flash_attention`` (CUDA),
``_scaled_dot_product_flash_attention_for_cpu``, ``_efficient_attention``,
``_cudnn_attention`` (forward), and the flash backward ops. Emits:
``fa4.flash_attn_fwd`` / ``fa4.flash_attn_bwd`` and rewires the tuple
outputs (``[0]`` output, ``[1]`` logsumexp). Extra check: the support rules,
plus: only outputs FA4 produces may be used (the flash logsumexp has FA4's
B,H,S layout; efficient/cuDNN logsumexp layouts, RNG state and debug
masks have no FA4 equivalent), and no attention bias/mask.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, Match

from fa4_inductor.compile.emit import emit_fa4, fa4_arguments, fa4_attention_backward, replace_tuple_outputs
from fa4_inductor.compile.fx_utils import tuple_reads
from fa4_inductor.compile.sites import AttentionPattern, RewriteContext, SiteDecision, register

from .common import decide, normalized_kwargs

aten = torch.ops.aten


def _targets(*packets):
    return tuple(t for p in packets for t in (p, p.default))


FLASH_FORWARD = _targets(aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_for_cpu)
OTHER_FORWARD = _targets(aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention)
FLASH_BACKWARD = _targets(
    aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward,
)


def _output_reason(node, allowed: set[int]) -> str | None:
    used, escapes = tuple_reads(node)
    if escapes or not used <= allowed:
        return f"uses outputs {sorted(used)} of {node.target}; FA4 provides only {sorted(allowed)}"
    return None


def analyze_forward(match: Match, context: RewriteContext) -> SiteDecision:
    """Decide a direct call of an aten SDPA forward kernel."""
    node = match.output_node()
    kw = normalized_kwargs(node)
    mask = kw.get("attn_mask", kw.get("attn_bias"))
    allowed = {0, 1} if node.target in FLASH_FORWARD else {0}
    reason = ("attn_mask/attn_bias is not a mask FA4 can express" if mask is not None else None) \
        or _output_reason(node, allowed)
    return decide(
        node, context, kw["query"], kw["key"], kw["value"], dropout_p=kw.get("dropout_p", 0.0),
        is_causal=kw.get("is_causal", False), scale=kw.get("scale"), enable_gqa=True, blocker=reason,
    )


def rewrite_forward(match: Match, decision: SiteDecision) -> None:
    """Replace the aten forward by an FA4 call; rewire output and logsumexp."""
    out, lse = emit_fa4(decision, decision.node)
    replace_tuple_outputs(decision.node, {0: out, 1: lse})


def analyze_backward(match: Match, context: RewriteContext) -> SiteDecision:
    """Decide a direct call of an aten flash backward kernel."""
    node = match.output_node()
    kw = normalized_kwargs(node)
    reason = ("attn_mask is not a mask FA4 can express" if kw.get("attn_mask") is not None else None) \
        or _output_reason(node, {0, 1, 2})
    return decide(
        node, context, kw["query"], kw["key"], kw["value"], dropout_p=kw.get("dropout_p", 0.0),
        is_causal=kw.get("is_causal", False), scale=kw.get("scale"), enable_gqa=True, blocker=reason,
    )


def rewrite_backward(match: Match, decision: SiteDecision) -> None:
    """Replace the aten flash backward by FA4's; rewire dq, dk, dv."""
    node = decision.node
    kw = normalized_kwargs(node)
    args = tuple(kw[n] for n in ("grad_out", "query", "key", "value", "out", "logsumexp"))
    with node.graph.inserting_before(node):
        grads = fa4_attention_backward(node.graph, args, fa4_arguments(node.graph, decision.params, *args[1:3]))
    replace_tuple_outputs(node, dict(enumerate(grads)))


register(AttentionPattern(
    name="aten_sdpa_forward",
    matches="aten._scaled_dot_product_{flash,flash_for_cpu,efficient,cudnn}_attention",
    emits="fa4.flash_attn_fwd",
    pattern=CallFunctionVarArgs(FLASH_FORWARD + OTHER_FORWARD),
    analyze=analyze_forward,
    rewrite=rewrite_forward,
))

register(AttentionPattern(
    name="aten_sdpa_flash_backward",
    matches="aten._scaled_dot_product_flash_attention{,_for_cpu}_backward",
    emits="fa4.flash_attn_bwd",
    pattern=CallFunctionVarArgs(FLASH_BACKWARD),
    analyze=analyze_backward,
    rewrite=rewrite_backward,
))
