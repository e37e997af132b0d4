"""FlexAttention's definition, computed densely: the eager reference of the FlexAttention tests and fuzz.

FlexAttention has no CPU backward, so the CPU tests compare the plugin's rewrite with this: the score_mod applied
to every scaled score, the mask_mod evaluated at every position, rows with no visible key giving zeros.
"""

import math

import torch


def flex_reference(q, k, v, score_mod=None, mask_mod=None, scale=None):
    """(output in q's dtype, natural-log logsumexp) of ``flex_attention(q, k, v, score_mod, mask_mod, scale)`` on
    (B, H, S, D) tensors (GQA when K/V have fewer heads), in fp32, differentiable."""
    dtype = q.dtype
    q, k, v = (t.float() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    b, h, i, j = (torch.arange(n, device=q.device).view([-1 if d == axis else 1 for d in range(4)])
                  for axis, n in enumerate(scores.shape))
    if score_mod is not None:
        scores = score_mod(scores, b, h, i, j)
    if mask_mod is not None:
        scores = scores.masked_fill(~mask_mod(b, h, i, j).expand(scores.shape), -math.inf)
    lse = scores.logsumexp(-1)
    probabilities = torch.where(lse.isinf()[..., None], 0.0, (scores - lse[..., None]).exp())
    return (probabilities @ v).to(dtype), lse
