"""A transformer layer's attention: qkv projection -> SDPA -> out projection (benchmarks, GPU tests)."""

import torch
import torch.nn.functional as F


class AttentionBlock(torch.nn.Module):
    """Fused qkv projection, ``F.scaled_dot_product_attention``, output projection."""

    def __init__(self, dim: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, dim // self.heads).unbind(2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=self.causal)
        return self.proj(o.transpose(1, 2).reshape(b, s, dim))
