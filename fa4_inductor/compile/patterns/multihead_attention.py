"""``nn.MultiheadAttention``: Dynamo keeps ``F.multi_head_attention_forward`` as one node of its graph.

Matches: that node (every ``nn.MultiheadAttention``, and so the ``nn.Transformer*`` layers in training), whose
attention weights nothing reads. Emits: the call written out as the PyTorch ops it computes (the in-projection,
the heads split out, one ``F.scaled_dot_product_attention`` with the mask PyTorch would give it, the output
projection), so the ``sdpa`` pattern decides the attention like any other: a causal ``attn_mask`` or the
``is_causal`` hint becomes FA4's ``causal``, a ``key_padding_mask`` FA4's key padding. Left as one call, with the
reason: attention weights that are read (``need_weights=True`` and the second output used), dropout in training,
``add_bias_kv``, ``add_zero_attn`` and ``static_k``/``static_v``.

The need-weights form computes ``softmax(q k^T / sqrt(d) + mask) v`` with ``bmm``; its output is what SDPA
computes, except in a row whose every key is masked (NaN there, zeros from SDPA and FA4). So it is written out the
same way when its weights are dropped (DETR's ``attn(q, k, v)[0]``) only where no row can be: no mask, or an
``attn_mask`` proven causal or a window around the diagonal, and no key padding.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

from fa4_inductor.compile import graph_mutations
from fa4_inductor.compile.fx_utils import example_value, tuple_reads
from fa4_inductor.compile.emit import call_with_meta, replace_tuple_outputs
from fa4_inductor.compile.mask_analysis import NotAnalyzable, analyze_mask
from fa4_inductor.compile.sites import EXPANDED_FROM, GraphExpansion, RewriteContext, register_expansion

from .common import guarded_value

NAME = "multihead_attention"
_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_META_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack")


class Writer:
    """Inserts calls before ``node`` with fake values and ``node``'s source location."""

    def __init__(self, node: Node):
        self.node = node

    def __call__(self, target, *args, **kwargs) -> Node:
        with self.node.graph.inserting_before(self.node):
            new = call_with_meta(self.node.graph, target, args, kwargs)
        new.meta.update({k: self.node.meta[k] for k in _META_KEYS if k in self.node.meta})
        return new

    def items(self, parts: Node, count: int) -> list[Node]:
        return [self(operator.getitem, parts, i) for i in range(count)]


def _blocker(call: dict[str, Any], node: Node) -> str | None:
    """Why the call stays one call, or None."""
    read, whole = tuple_reads(node)
    if whole or not read <= {0, 1}:
        return "its result is used other than as (output, weights)"
    if any(out.args[1] == 1 and out.users for out in node.users):
        return "need_weights=True and the attention weights are read: FA4 does not compute them"
    if not isinstance(call["training"], bool):
        return "training is computed in the graph"
    dropout = call["dropout_p"] if call["training"] else 0.0
    if isinstance(dropout, Node) and isinstance(example_value(dropout), torch.SymFloat):
        dropout = guarded_value(dropout)  # a module's float attribute under dynamic=True
    if not isinstance(dropout, (int, float)):
        return "dropout_p is computed in the graph"
    if dropout > 0:
        return f"dropout_p={dropout} in training: FA4 has no dropout"
    if call["bias_k"] is not None or call["bias_v"] is not None:
        return "add_bias_kv=True: learned key/value rows are appended"
    if call["add_zero_attn"]:
        return "add_zero_attn=True: a zero key/value row is appended"
    if call["static_k"] is not None or call["static_v"] is not None:
        return "static_k/static_v replace the projected keys/values"
    query, key = example_value(call["query"]), example_value(call["key"])
    if not all(isinstance(t, torch.Tensor) for t in (query, key)) or query.dim() not in (2, 3):
        return "query is not a 2-D or 3-D tensor"
    embed_dim, heads = _embed_dim(call), call["num_heads"]
    if not isinstance(embed_dim, int) or not isinstance(heads, int) or embed_dim % heads:
        return "the embedding size is not a constant that the heads divide"
    if call["is_causal"] and call["attn_mask"] is None:
        return "is_causal=True without attn_mask (PyTorch raises)"
    for name, dims in (("attn_mask", (2, 3)), ("key_padding_mask", (query.dim() - 1,))):
        mask = example_value(call[name])
        if mask is not None and (mask.dim() not in dims or not (mask.dtype == torch.bool or mask.is_floating_point())):
            return f"{name} of shape {tuple(mask.shape)} and dtype {mask.dtype}"
    if call["need_weights"]:
        why = ("need_weights=True (weights unread) with {}: PyTorch's weights path gives NaN in a row whose every key "
               "is masked, SDPA and FA4 give zeros; pass need_weights=False for FA4")
        if call["key_padding_mask"] is not None:
            return why.format("a key_padding_mask")
        kept = rows_keep_a_key(call["attn_mask"], query.shape[0], key.shape[0])
        return None if kept is None else why.format(f"an attn_mask that {kept}")
    return None


def rows_keep_a_key(mask: Node | None, q_len, kv_len) -> str | None:
    """None when no row of ``mask`` (boolean: True hides; or additive) can hide every key: no mask, or one proven
    causal or a window around the diagonal; else what the mask is instead."""
    if mask is None:
        return None
    try:
        structure, _, _ = analyze_mask(mask, q_len, kv_len, hides_where_true=example_value(mask).dtype == torch.bool,
                                       mutations=graph_mutations.Mutations(mask.graph))
    except NotAnalyzable:
        return "is not proven causal or a window"
    if structure.key_padding is not None or structure.segment_ids is not None or structure.key_lengths is not None:
        return "reads a tensor"
    return None


def _embed_dim(call: dict[str, Any]):
    """E, from the output projection's (E, E) weight: a parameter, static also under ``dynamic=True``."""
    return example_value(call["out_proj_weight"]).shape[0]


def _projections(w: Writer, call: dict[str, Any], embed_dim: int) -> list[Node]:
    """q, k, v after the in-projection, (L, B, E) each, computed as ``F.multi_head_attention_forward`` does."""
    query, key, value, bias = call["query"], call["key"], call["value"], call["in_proj_bias"]
    if call["use_separate_proj_weight"]:
        biases = w.items(w(torch.chunk, bias, 3), 3) if bias is not None else [None] * 3
        weights = [call["q_proj_weight"], call["k_proj_weight"], call["v_proj_weight"]]
        return [w(F.linear, x, weight, b) for x, weight, b in zip((query, key, value), weights, biases)]
    weight = call["in_proj_weight"]
    if key is value and query is key:
        return w.items(w(torch.chunk, w(F.linear, query, weight, bias), 3, -1), 3)
    if key is value:
        w_q, w_kv = w.items(w(torch.split, weight, [embed_dim, 2 * embed_dim]), 2)
        b_q, b_kv = w.items(w(torch.split, bias, [embed_dim, 2 * embed_dim]), 2) if bias is not None else (None,) * 2
        return [w(F.linear, query, w_q, b_q), *w.items(w(torch.chunk, w(F.linear, key, w_kv, b_kv), 2, -1), 2)]
    weights = w.items(w(torch.chunk, weight, 3), 3)
    biases = w.items(w(torch.chunk, bias, 3), 3) if bias is not None else [None] * 3
    return [w(F.linear, x, weight, b) for x, weight, b in zip((query, key, value), weights, biases)]


def additive_mask(w: Writer, mask: Node, dtype: torch.dtype) -> Node:
    """A boolean mask (True: hidden) as the 0/-inf float mask PyTorch makes of it; a float mask as it is."""
    if example_value(mask).dtype != torch.bool:
        return mask
    return w(torch.masked_fill, w(torch.zeros_like, mask, dtype=dtype), mask, float("-inf"))


def _sdpa_mask(w: Writer, call: dict[str, Any], heads: int, dtype: torch.dtype, batched: bool) -> Node | None:
    """SDPA's ``attn_mask``, broadcastable to (B, H, L, S): ``attn_mask`` plus ``key_padding_mask``, as additive
    masks, as ``F.multi_head_attention_forward`` merges them."""
    mask, padding = call["attn_mask"], call["key_padding_mask"]
    if mask is not None:
        mask = additive_mask(w, mask, dtype)
        if example_value(mask).dim() == 3:  # (B * H, L, S)
            mask = w(torch.unflatten, mask, 0, (-1, heads))
    if padding is not None:
        padding = additive_mask(w, padding, dtype)
        padding = w(torch.unsqueeze, w(torch.unsqueeze, padding if batched else w(torch.unsqueeze, padding, 0), 1), 1)
        mask = padding if mask is None else w(operator.add, mask, padding)
    return mask


def attention_block(w: Writer, call: dict[str, Any], heads: int, mask: Node | None, causal: bool,
                    origin: str) -> Node:
    """Multi-head attention on (L, B, E) ``query``/``key``/``value`` of ``call`` (with its projection weights, named
    as ``F.multi_head_attention_forward`` names them): in-projection, SDPA with ``mask`` (broadcastable to
    (B, H, L, S)) and ``causal``, out-projection; the SDPA node is marked as written by ``origin``."""
    embed_dim = _embed_dim(call)
    # (L, B, E) -> (B, H, L, E / H)
    q, k, v = (w(torch.permute, w(torch.unflatten, t, -1, (heads, embed_dim // heads)), (1, 2, 0, 3))
               for t in _projections(w, call, embed_dim))
    attention = w(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=causal)
    attention.meta[EXPANDED_FROM] = origin
    # (B, H, L, E / H) -> (L, B, E) -> out-projection
    return w(F.linear, w(torch.flatten, w(torch.permute, attention, (2, 0, 1, 3)), -2), call["out_proj_weight"],
             call["out_proj_bias"])


def expand(node: Node, context: RewriteContext) -> str | None:
    """Write one ``F.multi_head_attention_forward`` call out with an SDPA call, or say why it stays."""
    bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    reason = _blocker(call, node)
    if reason is not None:
        return reason
    query = example_value(call["query"])
    heads, batched = call["num_heads"], query.dim() == 3
    w = Writer(node)
    if not batched:  # (L, E) -> (L, 1, E), keeping which of query, key and value are one tensor
        unsqueezed: dict[Node, Node] = {}
        for name in ("query", "key", "value"):
            if call[name] not in unsqueezed:
                unsqueezed[call[name]] = w(torch.unsqueeze, call[name], 1)
            call[name] = unsqueezed[call[name]]
    # PyTorch trusts the hint only where no key padding is merged in and no weights are computed.
    hinted = call["is_causal"] and call["key_padding_mask"] is None and not call["need_weights"]
    mask = None if hinted else _sdpa_mask(w, call, heads, query.dtype, batched)
    out = attention_block(w, call, heads, mask, hinted, NAME)
    if not batched:
        out = w(torch.squeeze, out, 1)
    replace_tuple_outputs(node, {0: out})
    return None


MULTIHEAD_ATTENTION = register_expansion(GraphExpansion(
    name=NAME,
    matches="F.multi_head_attention_forward (nn.MultiheadAttention, nn.Transformer* layers) with unread weights",
    emits="its in-projection, F.scaled_dot_product_attention (then the sdpa pattern), its out-projection",
    targets=(F.multi_head_attention_forward,),
    expand=expand,
))
