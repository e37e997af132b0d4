"""Compile FA4's sm90 forward and backward kernels through the adapter, without a GPU.

Run as a script (FA4 reads its arch settings at import): FLASH_ATTENTION_ARCH=sm_90
CUTE_DSL_ARCH=sm_90a FLASH_ATTENTION_NUM_SMS=132. Under FakeTensorMode FA4 builds
the kernel and skips the launch, so a change in FA4's API or compile path fails here.
"""

import json
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fa4_inductor import fa4_adapter


def main() -> None:
    """Compile one causal GQA config (fwd + bwd) and print what came back as JSON."""
    start = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(2, 256, 8, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(2, 256, 2, 128, dtype=torch.bfloat16, device="cuda")
        v = torch.empty(2, 256, 2, 128, dtype=torch.bfloat16, device="cuda")
        params = dict(softmax_scale=128 ** -0.5, causal=True, window_left=-1, window_right=-1, softcap=0.0,
                      seqused_k=None)
        out, lse = fa4_adapter.forward(q, k, v, **params)
        grads = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (q, k, v)]
        fa4_adapter.backward(out, q, k, v, out, lse, **params, dq=grads[0], dk=grads[1], dv=grads[2])
    print(json.dumps({"out": list(out.shape), "lse": list(lse.shape), "lse_dtype": str(lse.dtype),
                      "seconds": round(time.perf_counter() - start, 1), "fa4": fa4_adapter.version()}))


if __name__ == "__main__":
    main()
