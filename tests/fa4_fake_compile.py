"""Compile FA4's sm90 kernels through the adapter's precompile path, without a GPU.

Run as a script (FA4 reads its arch and cache settings at import):
FLASH_ATTENTION_ARCH=sm_90 CUTE_DSL_ARCH=sm_90a FLASH_ATTENTION_NUM_SMS=132, and
FLASH_ATTENTION_CUTE_DSL_CACHE_DIR for the on-disk kernel cache. Under fake
tensors FA4 builds the kernels and skips the launch, so a change in FA4's API
or compile path fails here. Prints one JSON line.
"""

import json
import logging
import pathlib
import time

import torch

from fa4_inductor import fa4_adapter, launch_plan
from fa4_inductor._torch_private import fresh_fake_mode

SEQLENS = (1, 7, 64, 128, 129, 192, 255, 256, 257, 300, 1000, 4096, 8192)
CONFIGS = (
    dict(heads=8, heads_kv=8, causal=False, window=(-1, -1)),
    dict(heads=8, heads_kv=8, causal=True, window=(-1, -1)),
    dict(heads=8, heads_kv=2, causal=True, window=(-1, -1)),
    dict(heads=4, heads_kv=1, causal=False, window=(64, 0)),
)


class _KeyProbe:
    """A compile cache that claims to hold every key: FA4 computes its key and stops."""

    def __init__(self):
        self.keys = []

    def __contains__(self, key):
        self.keys.append(key)
        return True


def _params(causal=True, window=(-1, -1)):
    return dict(softmax_scale=128 ** -0.5, causal=causal, window_left=window[0], window_right=window[1],
                softcap=0.0, seqused_k=None)


def _qkv(batch, seqlen, heads, heads_kv, dtype=torch.bfloat16, head_dim=128):
    return (torch.empty(batch, seqlen, heads, head_dim, dtype=dtype, device="cuda"),
            torch.empty(batch, seqlen, heads_kv, head_dim, dtype=dtype, device="cuda"),
            torch.empty(batch, seqlen, heads_kv, head_dim, dtype=dtype, device="cuda"))


def seqlen_classes_match_fa4_keys() -> bool:
    """Same ``seqlen_class`` (and config) <=> same FA4 compile key, for every probed length."""
    entry_point = fa4_adapter._module()._flash_attn_fwd
    for config in CONFIGS:
        seen: dict = {}
        for seqlen in SEQLENS:
            probe, real = _KeyProbe(), entry_point.compile_cache
            entry_point.compile_cache = probe
            try:
                with fresh_fake_mode():
                    q, k, v = _qkv(2, seqlen, config["heads"], config["heads_kv"])
                    entry_point(q, k, v, causal=config["causal"], window_size_left=_window(config["window"][0]),
                                window_size_right=_window(config["window"][1]), return_lse=True)
            finally:
                entry_point.compile_cache = real
            cls = launch_plan.seqlen_class(seqlen, config["heads"] // config["heads_kv"])
            if seen.setdefault(cls, probe.keys[0]) != probe.keys[0]:
                return False
    return True


class _WarningsSeen(logging.Handler):
    """Keeps the plugin's warnings (a precompile that failed is logged, not raised)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _python_wrapped(kernel) -> bool:
    """Would a launch plan of this kernel still go through a Python ``__call__``? (FA4's sm90 forward launches with
    18 positional arguments.) JIT-compiled kernels are CuTe DSL objects, kernels from the disk cache plain
    TVM-FFI functions."""
    import tvm_ffi

    entry = launch_plan.direct_entry(kernel, 18)
    return not (entry is not kernel or type(kernel) is tvm_ffi.Function)


def _window(value):
    return None if value < 0 else value


def main() -> None:
    """Precompile a causal GQA config, with and without key padding (fwd + bwd), and a split-KV decoding step
    with key padding; probe FA4's keys; print JSON."""
    warnings = _WarningsSeen()
    logging.getLogger("fa4_inductor").addHandler(warnings)
    params = _params()
    with fresh_fake_mode():
        q, k, v = _qkv(2, 256, 8, 2)
        out = torch.empty(2, 256, 8, 128, dtype=torch.bfloat16, device="cuda")
        lse = torch.empty(2, 8, 256, dtype=torch.float32, device="cuda")
    start = time.perf_counter()
    fwd_seconds = fa4_adapter.precompile_forward(q, k, v, **params)
    bwd_seconds = fa4_adapter.precompile_backward(out, q, k, v, out, lse, **params)
    again = fa4_adapter.precompile_forward(q, k, v, **params)
    with fresh_fake_mode():
        key_padding = torch.empty(2, 256, dtype=torch.bool, device="cuda")
    padded = {**params, "key_padding": key_padding}
    padding_s = (fa4_adapter.precompile_forward(q, k, v, **padded)
                 + fa4_adapter.precompile_backward(out, q, k, v, out, lse, **padded))
    with fresh_fake_mode():  # a decoding step (split-KV on sm90), its static cache's mask as key padding
        dq = torch.empty(1, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
        dk, dv = (torch.empty(1, 8, 4096, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in "kv")
        decode_padding = torch.empty(1, 4096, dtype=torch.bool, device="cuda")
    decode = {**_params(causal=False), "key_padding": decode_padding}
    decode_splits = fa4_adapter._split_count(dq, dk, dv, decode)
    decode_s = fa4_adapter.precompile_forward(dq, dk, dv, **decode)
    forward_kernels = fa4_adapter._module()._flash_attn_fwd.compile_cache.cache.values()
    cache_dir = fa4_adapter.disk_cache_dir()
    cached = sorted(p.parent.name for p in pathlib.Path(cache_dir).rglob("*.o")) if cache_dir else []
    print(json.dumps({
        "forward_s": round(fwd_seconds, 2), "backward_s": round(bwd_seconds, 2), "again_s": again,
        "key_padding_s": round(padding_s, 2), "decode_splits": decode_splits, "decode_s": round(decode_s, 2),
        "total_s": round(time.perf_counter() - start, 1), "disk_cache": cached,
        "seqlen_classes_ok": seqlen_classes_match_fa4_keys(), "fa4": fa4_adapter.version(),
        "warnings": warnings.messages,
        "forward_kernels_python_wrapped": [_python_wrapped(kernel) for kernel in forward_kernels],
    }))


if __name__ == "__main__":
    main()
