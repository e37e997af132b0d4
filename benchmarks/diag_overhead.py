"""Where does time go per attention call? Host time per call (no sync), GPU kernel time, do_bench median.

Compares FA4 direct (flash_attn_func), the fa4 op eagerly, and the plugin's compiled attention.
"""
import json
import time

import torch, torch.nn.functional as F
from triton.testing import do_bench
import fa4_inductor
from flash_attn.cute import flash_attn_func


def host_us(fn, n=50):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def kernels_us(fn):
    fn(); torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.key[:90]] = round(e.device_time_total / 5, 1)
    return out


def main(s=4096, d=128, causal=False):
    h, b = 2048 // d, 16384 // s
    qs, ks, vs = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    def attention(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    plugin = torch.compile(attention, fullgraph=True)
    fns = {
        "fa4_direct": lambda: flash_attn_func(qs, ks, vs, causal=causal)[0],
        "fa4_op_eager": lambda: torch.ops.fa4.flash_attn_fwd(qs, ks, vs, d ** -0.5, causal)[0],
        "plugin_compiled": lambda: plugin(qs, ks, vs),
    }
    res = {}
    # Stay enabled while timing: a recompile (for no_grad) after disable() gets no rewrite.
    with torch.no_grad(), fa4_inductor.enabled(compile=True, eager=False):
        for name, fn in fns.items():
            res[name] = dict(host_us=host_us(fn), bench_ms=do_bench(fn, warmup=25, rep=100, return_mode="median"), kernels=kernels_us(fn))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
