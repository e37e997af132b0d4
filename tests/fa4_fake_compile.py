"""Compile FA4's kernels through the adapter's precompile path, without a GPU.

Run as a script (FA4 reads its arch and cache settings at import):
FLASH_ATTENTION_ARCH=sm_90 CUTE_DSL_ARCH=sm_90a FLASH_ATTENTION_NUM_SMS=132
(or sm_100 / sm_100a / 148 for Blackwell), and FLASH_ATTENTION_CUTE_DSL_CACHE_DIR
for the on-disk kernel cache. Under fake tensors FA4 builds the kernels and
skips the launch, so a change in FA4's API or compile path fails here. Covers
the plugin's kernel families: plain (causal GQA), the masking routes (block
sparsity for key padding, documents and both with a band; the mask_mod on every
tile for a small padding-only call), softcap on both and, on sm90, split-KV decoding. Prints one
JSON line.
"""

import json
import logging
import os
import pathlib
import time

import torch

from fa4_inductor import fa4_adapter, fa4_api, launch_plan, masking
from fa4_inductor._torch_private import fresh_fake_mode

ARCH_MAJOR = int(os.environ.get("FLASH_ATTENTION_ARCH", "sm_90")[3:]) // 10

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
    entry_point = fa4_api.module()._flash_attn_fwd
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


# (name, heads, heads_kv, head dim, seqlen, causal, window, key padding, documents, softcap): the masking routes,
# and softcap (Gemma 2's SDPA-eager and FlexAttention sites) on the plain and the block-sparse route.
MASKED = (
    ("padding_causal_gqa", 8, 2, 128, 1000, True, (-1, -1), True, False, 0.0),
    ("documents_d64", 8, 8, 64, 1000, False, (-1, -1), False, True, 0.0),
    ("documents_padding_window_gqa", 8, 2, 128, 777, False, (100, 0), True, True, 0.0),
    ("padding_only_small", 8, 2, 128, 256, False, (-1, -1), True, False, 0.0),
    ("softcap_window_gqa", 8, 4, 128, 1000, False, (1023, 0), False, False, 50.0),
    ("softcap_padding_causal_gqa", 8, 4, 128, 1000, True, (-1, -1), True, False, 50.0),
)


def _without_driver_queries() -> None:
    """FA4's sm100 block-sparse forward sizes its persistent grid with ``cutlass.utils.HardwareInfo``, which asks the
    CUDA driver; with no GPU here, answer with FLASH_ATTENTION_NUM_SMS (only compiling, nothing launches)."""
    import cutlass.utils
    import flash_attn.cute.tile_scheduler as tile_scheduler

    class HardwareInfo:
        def __init__(self, *args, **kwargs):
            self.sms = int(os.environ["FLASH_ATTENTION_NUM_SMS"])

        def get_device_multiprocessor_count(self):
            return self.sms

        def get_max_active_clusters(self, cluster_size=1):
            return self.sms // cluster_size

    cutlass.utils.HardwareInfo = tile_scheduler.HardwareInfo = HardwareInfo


def precompile_masked() -> dict:
    """Precompile each masking route (fwd + bwd); {name: (seconds, sparse block size or None)}."""
    results = {}
    for name, heads, heads_kv, head_dim, seqlen, causal, window, padded, documents, softcap in MASKED:
        with fresh_fake_mode():
            q, k, v = _qkv(2, seqlen, heads, heads_kv, head_dim=head_dim)
            out = torch.empty(2, seqlen, heads, head_dim, dtype=torch.bfloat16, device="cuda")
            lse = torch.empty(2, heads, seqlen, dtype=torch.float32, device="cuda")
            extra = dict(key_padding=torch.empty(2, seqlen, dtype=torch.bool, device="cuda") if padded else None,
                         segment_ids=torch.empty(2, seqlen, dtype=torch.int64, device="cuda") if documents else None)
        params = {**_params(causal, window), "softmax_scale": head_dim ** -0.5, "softcap": softcap, **extra}
        seconds = (fa4_adapter.precompile_forward(q, k, v, **params)
                   + fa4_adapter.precompile_backward(out, q, k, v, out, lse, **params))
        route = masking.block_sparsity_route(tuple(q.shape), seqlen, head_dim, params, ARCH_MAJOR) \
            if padded or documents else None  # no mask_mod at all
        results[name] = (round(seconds, 2), route)
    return results


def main() -> None:
    """Precompile a causal GQA config (fwd + bwd), every masking route and, on sm90, a split-KV decoding step
    with key padding; probe FA4's keys (sm90); print JSON."""
    if ARCH_MAJOR != 9:
        _without_driver_queries()
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
    masked = precompile_masked()
    result = {"arch": ARCH_MAJOR, "forward_s": round(fwd_seconds, 2), "backward_s": round(bwd_seconds, 2),
              "again_s": again, "masked": masked, "fa4": fa4_api.version(), "warnings": warnings.messages}
    if ARCH_MAJOR == 9:
        result.update(sm90_only())
    result["total_s"] = round(time.perf_counter() - start, 1)
    cache_dir = fa4_api.disk_cache_dir()
    result["disk_cache"] = sorted({p.parent.name for p in pathlib.Path(cache_dir).rglob("*.o")}) if cache_dir else []
    print(json.dumps(result))


def sm90_only() -> dict:
    """Split-KV decoding (sm90 only), FA4's compile keys against ``seqlen_class``, direct launch entries."""
    with fresh_fake_mode():  # a decoding step (split-KV on sm90), its static cache's mask as key padding
        dq = torch.empty(1, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
        dk, dv = (torch.empty(1, 8, 4096, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in "kv")
        decode_padding = torch.empty(1, 4096, dtype=torch.bool, device="cuda")
    decode = {**_params(causal=False), "key_padding": decode_padding}
    decode_splits = fa4_adapter.split_count(dq, dk, dv, decode)
    decode_s = fa4_adapter.precompile_forward(dq, dk, dv, **decode)
    forward_kernels = fa4_api.module()._flash_attn_fwd.compile_cache.cache.values()
    return {"decode_splits": decode_splits, "decode_s": round(decode_s, 2),
            "seqlen_classes_ok": seqlen_classes_match_fa4_keys(),
            "forward_kernels_python_wrapped": [_python_wrapped(kernel) for kernel in forward_kernels]}


if __name__ == "__main__":
    main()
