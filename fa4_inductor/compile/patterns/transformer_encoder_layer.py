"""``nn.TransformerEncoderLayer``'s inference fast path: one ``torch._transformer_encoder_layer_fwd`` node.

In inference (eval mode, no grad) the layer hands its whole forward to that fused op, attention included. Matches:
that node. Emits: the layer written out (layer norms, residuals, the feed-forward with ReLU or GELU, and the
attention as :func:`.multihead_attention.attention_block` writes it, with the merged mask the layer gives the op),
so the ``sdpa`` pattern decides the attention: a causal ``src_mask`` becomes FA4's ``causal``, a
``src_key_padding_mask`` FA4's key padding.

The fused op gives NaN in a batch row whose every key is padded (SDPA and FA4 give zeros): the written-out layer
puts NaN there too. An ``src_mask`` is written out only where no row can hide every key (proven causal or a
window); otherwise the op stays, with that reason.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from fa4_inductor.compile.fx_utils import example_value
from fa4_inductor.compile.sites import GraphExpansion, RewriteContext, register_expansion

from .multihead_attention import Writer, additive_mask, attention_block, rows_keep_a_key

NAME = "transformer_encoder_layer"
_ARGUMENTS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu",
              "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2", "ffn_weight_1",
              "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type")
# mask_type: 0 an (L, S) mask, 1 a (B, S) key padding mask, 2 a (B, H, L, S) one.
_MASK_DIMS = {0: 2, 1: 2, 2: 4}


def _sdpa_mask(w: Writer, mask: Node | None, mask_type: int | None, dtype: torch.dtype) -> Node | None:
    if mask is None:
        return None
    mask = additive_mask(w, mask, dtype)
    return w(torch.unsqueeze, w(torch.unsqueeze, mask, 1), 1) if mask_type == 1 else mask


def expand(node: Node, context: RewriteContext) -> str | None:
    """Write one fused encoder layer out, its attention as an SDPA call, or say why it stays."""
    layer = dict(zip(_ARGUMENTS, (*node.args, None, None)))
    layer.update(node.kwargs)
    src, mask, mask_type = example_value(layer["src"]), example_value(layer["mask"]), layer["mask_type"]
    if not isinstance(src, torch.Tensor) or src.dim() != 3 or src.is_nested:
        return "src is not a (B, L, E) tensor"
    if mask is not None and (mask_type not in _MASK_DIMS or mask.dim() != _MASK_DIMS[mask_type]):
        return f"a mask of shape {tuple(mask.shape)} with mask_type {mask_type}"
    if not all(isinstance(layer[name], (int, float, bool)) for name in ("num_heads", "use_gelu", "norm_first", "eps")):
        return "the layer's settings are computed in the graph"
    if mask_type in (0, 2):
        kept = rows_keep_a_key(layer["mask"], src.shape[1], src.shape[1])
        if kept is not None:
            return (f"the fused op's mask {kept}: the op gives NaN in a row whose every key is masked, SDPA and "
                    "FA4 give zeros")
    w = Writer(node)
    embed_dim = example_value(layer["proj_weight"]).shape[0]

    def norm(x, which):
        return w(F.layer_norm, x, (embed_dim,), layer[f"norm_weight_{which}"], layer[f"norm_bias_{which}"],
                 layer["eps"])

    def self_attention(x):  # (B, L, E) in and out, as nn.MultiheadAttention with batch_first=True
        sequence_first = w(torch.transpose, x, 0, 1)
        call = {"query": sequence_first, "key": sequence_first, "value": sequence_first,
                "use_separate_proj_weight": False, "in_proj_weight": layer["qkv_weight"],
                "in_proj_bias": layer["qkv_bias"], "out_proj_weight": layer["proj_weight"],
                "out_proj_bias": layer["proj_bias"]}
        attended = attention_block(w, call, layer["num_heads"], _sdpa_mask(w, layer["mask"], mask_type, src.dtype),
                                   False, NAME)
        if mask_type == 1:  # NaN in the batch rows whose every key is padded, as the fused op gives
            padded = layer["mask"] if mask.dtype == torch.bool else w(torch.eq, layer["mask"], float("-inf"))
            unkept = w(torch.unsqueeze, w(torch.unsqueeze, w(torch.all, padded, -1), 0), -1)
            attended = w(torch.where, unkept, float("nan"), attended)
        return w(torch.transpose, attended, 0, 1)

    def feed_forward(x):
        hidden = w(F.linear, x, layer["ffn_weight_1"], layer["ffn_bias_1"])
        return w(F.linear, w(F.gelu if layer["use_gelu"] else F.relu, hidden), layer["ffn_weight_2"],
                 layer["ffn_bias_2"])

    x = layer["src"]
    if layer["norm_first"]:
        x = w(operator.add, x, self_attention(norm(x, 1)))
        x = w(operator.add, x, feed_forward(norm(x, 2)))
    else:
        x = norm(w(operator.add, x, self_attention(x)), 1)
        x = norm(w(operator.add, x, feed_forward(x)), 2)
    node.replace_all_uses_with(x)
    node.graph.erase_node(node)
    return None


TRANSFORMER_ENCODER_LAYER = register_expansion(GraphExpansion(
    name=NAME,
    matches="torch._transformer_encoder_layer_fwd (nn.TransformerEncoderLayer in inference)",
    emits="the layer's norms, residuals and feed-forward, its attention as F.scaled_dot_product_attention "
          "(then the sdpa pattern)",
    targets=(torch._transformer_encoder_layer_fwd,),
    expand=expand,
))
