"""Compile FA4's kernels through the adapter's precompile path, without a GPU.

Run as a script (FA4 reads its arch and cache settings at import):
FLASH_ATTENTION_ARCH=sm_90 CUTE_DSL_ARCH=sm_90a FLASH_ATTENTION_NUM_SMS=132
(or sm_100 / sm_100a / 148 for Blackwell), and FLASH_ATTENTION_CUTE_DSL_CACHE_DIR
for the on-disk kernel cache. Under fake tensors FA4 builds the kernels and
skips the launch, so a change in FA4's API or compile path fails here. Covers
the plugin's kernel families: plain (causal GQA, non-causal fp16, a sliding
window, head dim 256, a deterministic backward), the masking routes (block
sparsity for key padding, documents and both with a band; the mask_mod on
every tile for a small padding-only call), softcap on both and, on sm90,
split-KV decoding, the varlen ops (packed sequences: causal GQA, a window with softcap, seqused_k, decoding) and
the position-bias score_mods (ALiBi: causal GQA, a window, beside key padding; a relative-position table: d64,
causal GQA, beside key padding and documents; a bias per key: causal GQA, beside key padding). Prints one JSON line.
"""

import json
import logging
import os
import pathlib
import time

import torch

from fa4_inductor.runtime import fa4_binding, fa4_call, launch_plan, mask_routes, position_bias, varlen

from fa4_inductor.runtime import fa4_version
from fa4_inductor._torch_private import fresh_fake_mode

ARCH_MAJOR = int(os.environ.get("FLASH_ATTENTION_ARCH", "sm_90")[3:]) // 10

def _params(causal=True, window=(-1, -1)):
    return dict(softmax_scale=128 ** -0.5, causal=causal, window_left=window[0], window_right=window[1],
                softcap=0.0, seqused_k=None)


def _qkv(batch, seqlen, heads, heads_kv, dtype=torch.bfloat16, head_dim=128):
    return (torch.empty(batch, seqlen, heads, head_dim, dtype=dtype, device="cuda"),
            torch.empty(batch, seqlen, heads_kv, head_dim, dtype=dtype, device="cuda"),
            torch.empty(batch, seqlen, heads_kv, head_dim, dtype=dtype, device="cuda"))


class _WarningsSeen(logging.Handler):
    """Keeps the plugin's warnings (a precompile that failed is logged, not raised)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _python_wrapped(kernel) -> bool:
    """Would a launch plan of this kernel, given every argument its wrapper takes positionally, still go through a
    Python ``__call__``? JIT-compiled kernels are CuTe DSL objects, kernels from the disk cache plain TVM-FFI
    functions. (The argument count FA4 passes is checked where it launches: the GPU tests.)"""
    import tvm_ffi

    if type(kernel) is tvm_ffi.Function:
        return False
    code = getattr(getattr(kernel, "_kwargs_wrapper", None), "__code__", None)
    return launch_plan.direct_entry(kernel, code.co_argcount if code else -1) is kernel


# (name, heads, heads_kv, head dim, dtype, causal, window, deterministic backward): plain calls besides the causal
# GQA one main() compiles first.
PLAIN = (
    ("noncausal_fp16_d64", 8, 8, 64, torch.float16, False, (-1, -1), False),
    ("window_d128", 8, 8, 128, torch.bfloat16, False, (256, 0), False),
    ("causal_d256", 8, 8, 256, torch.bfloat16, True, (-1, -1), False),
    ("deterministic_causal_gqa", 8, 2, 128, torch.bfloat16, True, (-1, -1), True),
)


def precompile_plain() -> dict:
    """Precompile each of :data:`PLAIN` (fwd + bwd); {name: seconds}."""
    results = {}
    for name, heads, heads_kv, head_dim, dtype, causal, window, deterministic in PLAIN:
        with fresh_fake_mode():
            q, k, v = _qkv(2, 512, heads, heads_kv, dtype=dtype, head_dim=head_dim)
            out = torch.empty_like(q)
            lse = torch.empty(2, heads, 512, dtype=torch.float32, device="cuda")
        params = {**_params(causal, window), "softmax_scale": head_dim ** -0.5}
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            results[name] = round(fa4_call.precompile_forward(q, k, v, **params)
                                  + fa4_call.precompile_backward(out, q, k, v, out, lse, **params), 2)
        finally:
            torch.use_deterministic_algorithms(previous)
    return results


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
        seconds = (fa4_call.precompile_forward(q, k, v, **params)
                   + fa4_call.precompile_backward(out, q, k, v, out, lse, **params))
        route = mask_routes.block_sparsity_route(tuple(q.shape), seqlen, head_dim, params, ARCH_MAJOR) \
            if padded or documents else None  # no mask_mod at all
        results[name] = (round(seconds, 2), route)
    return results


# (name, heads, heads_kv, head dim, causal, window, softcap, seqused_k): the varlen op's configurations (FA4's and
# FA2's varlen API calls, Hugging Face's padded and packed flash-attention paths).
VARLEN = (
    ("varlen_causal_gqa", 8, 2, 128, True, (-1, -1), 0.0, False, 1000),
    ("varlen_window_softcap_d64", 8, 8, 64, False, (63, 0), 30.0, False, 1000),
    ("varlen_seqused_k", 8, 4, 128, False, (-1, -1), 0.0, True, 1000),
    ("varlen_decode", 32, 8, 128, True, (-1, -1), 0.0, False, 1),  # one query per sequence: split-KV on sm100
)


def precompile_varlen() -> dict:
    """Precompile each of :data:`VARLEN` (fwd + bwd) on 3 sequences of up to 1000 keys; {name: seconds}."""
    results = {}
    for name, heads, heads_kv, head_dim, causal, window, softcap, used, longest_q in VARLEN:
        tokens_q = 3 * longest_q if longest_q == 1 else 1500
        with fresh_fake_mode():
            q = torch.empty(tokens_q, heads, head_dim, dtype=torch.bfloat16, device="cuda")
            k, v = (torch.empty(1500, heads_kv, head_dim, dtype=torch.bfloat16, device="cuda") for _ in "kv")
            lse = torch.empty(heads, tokens_q, dtype=torch.float32, device="cuda")
            cu_seqlens_q, cu_seqlens_k = (torch.empty(4, dtype=torch.int32, device="cuda") for _ in "qk")
            seqused_k = torch.empty(3, dtype=torch.int32, device="cuda") if used else None
        args = (cu_seqlens_q, cu_seqlens_k, longest_q, 1000, head_dim ** -0.5, causal, *window, softcap, seqused_k)
        results[name] = round(varlen.precompile_forward(q, k, v, *args)
                              + varlen.precompile_backward(q, q, k, v, q, lse, *args), 2)
    return results


# (name, bias, heads, heads_kv, head dim, causal, window, padded, documents): the position-bias ops' score_mod
# kernels, alone and beside the block-sparse mask_mod of key padding or documents.
POSITION_BIASES = (
    ("alibi_causal_gqa", position_bias.ALIBI, 8, 2, 128, True, (-1, -1), False, False),
    ("alibi_window_d64", position_bias.ALIBI, 8, 8, 64, False, (255, 0), False, False),
    ("alibi_padded_causal_gqa", position_bias.ALIBI, 8, 2, 128, True, (-1, -1), True, False),
    ("relative_bias_d64", position_bias.RELATIVE_BIAS, 8, 8, 64, False, (-1, -1), False, False),
    ("relative_bias_causal_gqa", position_bias.RELATIVE_BIAS, 8, 2, 128, True, (-1, -1), False, False),
    ("relative_bias_padded", position_bias.RELATIVE_BIAS, 8, 8, 64, False, (-1, -1), True, False),
    ("relative_bias_documents_causal", position_bias.RELATIVE_BIAS, 8, 8, 128, True, (-1, -1), False, True),
    ("key_bias_causal_gqa", position_bias.KEY_BIAS, 8, 2, 128, True, (-1, -1), False, False),
    ("key_bias_padded_causal", position_bias.KEY_BIAS, 8, 8, 64, True, (-1, -1), True, False),
    # biases given as data, decided at run time (runtime/data_mask.py): per key with no causal band, padded or not;
    # of the offset under a sliding window
    ("key_bias_d64", position_bias.KEY_BIAS, 8, 8, 64, False, (-1, -1), False, False),
    ("key_bias_padded", position_bias.KEY_BIAS, 8, 8, 64, False, (-1, -1), True, False),
    ("relative_bias_window_d64", position_bias.RELATIVE_BIAS, 8, 8, 64, False, (255, 0), False, False),
)


def precompile_position_biases() -> dict:
    """Precompile each of :data:`POSITION_BIASES` (fwd + bwd); {name: seconds}."""
    results = {}
    for name, bias, heads, heads_kv, head_dim, causal, window, padded, documents in POSITION_BIASES:
        with fresh_fake_mode():
            q, k, v = _qkv(2, 1000, heads, heads_kv, head_dim=head_dim)
            lse = torch.empty(2, heads, 1000, dtype=torch.float32, device="cuda")
            aux = torch.empty(bias.aux_shape(q, k), dtype=torch.float32, device="cuda")
            masks = (torch.empty(2, 1000, dtype=torch.bool, device="cuda") if padded else None,
                     torch.empty(2, 1000, dtype=torch.int64, device="cuda") if documents else None)
        options = (head_dim ** -0.5, causal, *window, *masks)
        results[name] = round(position_bias.precompile(bias, "forward", (q, k, v, aux), options)
                              + position_bias.precompile(bias, "backward", (q, q, k, v, q, lse, aux), options), 2)
    return results


def _without_a_cuda_device() -> None:
    """FA4's deterministic backward exports its semaphores through DLPack, which asks torch for the current CUDA
    device; torch built without CUDA can't answer: device 0 (only compiling, nothing launches)."""
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: 0


def main() -> None:
    """Precompile a causal GQA config (fwd + bwd), the other plain configs, every masking route and, on sm90, a
    split-KV decoding step with key padding; print JSON."""
    _without_a_cuda_device()
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
    fwd_seconds = fa4_call.precompile_forward(q, k, v, **params)
    bwd_seconds = fa4_call.precompile_backward(out, q, k, v, out, lse, **params)
    again = fa4_call.precompile_forward(q, k, v, **params)
    plain, masked, packed, biased = precompile_plain(), precompile_masked(), precompile_varlen(), precompile_position_biases()
    result = {"arch": ARCH_MAJOR, "forward_s": round(fwd_seconds, 2), "backward_s": round(bwd_seconds, 2),
              "again_s": again, "plain": plain, "masked": masked, "varlen": packed, "position_bias": biased,
              "fa4": fa4_version.version(),
              "warnings": warnings.messages}
    if ARCH_MAJOR == 9:
        result.update(sm90_only())
    result["total_s"] = round(time.perf_counter() - start, 1)
    cache_dir = fa4_binding.disk_cache_dir()
    result["disk_cache"] = sorted({p.parent.name for p in pathlib.Path(cache_dir).rglob("*.o")}) if cache_dir else []
    print(json.dumps(result))


def sm90_only() -> dict:
    """Split-KV decoding (sm90 only), direct launch entries."""
    with fresh_fake_mode():  # a decoding step (split-KV on sm90), its static cache's mask as key padding
        dq = torch.empty(1, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
        dk, dv = (torch.empty(1, 8, 4096, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in "kv")
        decode_padding = torch.empty(1, 4096, dtype=torch.bool, device="cuda")
    decode = {**_params(causal=False), "key_padding": decode_padding}
    decode_splits = fa4_call.split_count(dq, dk, dv, decode)
    decode_s = fa4_call.precompile_forward(dq, dk, dv, **decode)
    fa4 = fa4_binding.module()
    backward_kernels = [kernel for entry in (fa4._bwd_preprocess, fa4._flash_attn_bwd, fa4._bwd_postprocess_convert)
                        for kernel in entry.compile_cache.cache.values()]
    return {"decode_splits": decode_splits, "decode_s": round(decode_s, 2),
            "forward_kernels_python_wrapped": [_python_wrapped(k) for k in fa4._flash_attn_fwd.compile_cache.cache.values()],
            "backward_kernels_python_wrapped": [_python_wrapped(kernel) for kernel in backward_kernels]}


if __name__ == "__main__":
    main()
