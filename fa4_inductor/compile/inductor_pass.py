"""Install the attention rewrite into Inductor through its public pass hook.

Why pre-grad: the rewrite runs on Dynamo's graph, before AOTAutograd. There
the attention is still one ``scaled_dot_product_attention`` call (or the
readable matmul/softmax/mask code of hand-written attention) with fake
tensors and symbolic shapes on every node. Replacing it by
``fa4.flash_attn_fwd``, whose autograd formula calls ``fa4.flash_attn_bwd``,
lets AOTAutograd derive a backward graph that runs FA4 too, and pairs
forward and backward by construction (they share one logsumexp). A joint
or post-grad rewrite would have to find SDPA's already-decomposed forward
and backward separately and keep their decisions consistent, on aten IR
that differs per device (CPU flash vs CUDA flash/efficient/cuDNN).

The pass is a ``CustomGraphPass`` in ``config.pre_grad_custom_pass``. It
wraps whatever pass the user had installed (run first, unchanged), and its
``uuid()`` hashes this package's source, the FA4 version and the routing
settings, so Inductor's FX graph and AOTAutograd caches stay on and never
hand back a graph compiled under other settings. A wrapped pass without a
uuid makes ours report none, which makes Inductor bypass its caches: the
correct answer when a pass's identity is unknown. A second pass, in
``config.post_grad_custom_post_pass`` and chained the same way, shares one
masking buffer among the calls of a graph that mask by the same data
(:mod:`.buffer_sharing`).
"""

from __future__ import annotations

import hashlib
import logging
import pathlib

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from fa4_inductor.compile import buffer_sharing


from fa4_inductor.runtime import fa4_version

from fa4_inductor.compile import graph_dump
from fa4_inductor.compile.sites import RewriteContext
from fa4_inductor.compile.rewrite import rewrite_graph

log = logging.getLogger(__name__)

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def _source_files() -> tuple[str, ...]:
    from fa4_inductor.compile import patterns

    dirs = (_PACKAGE_DIR, pathlib.Path(patterns.__file__).resolve().parent)
    return tuple(sorted(str(p) for d in dirs for p in d.glob("*.py")))


def _chained_uuid(previous, settings: str) -> str | None:
    """This package's source and ``settings`` hashed with the uuid of the pass run before ours; None when that pass
    has none (its identity is unknown)."""
    previous_uuid = None
    if previous is not None:
        previous_uuid = previous.uuid() if isinstance(previous, CustomGraphPass) else None
        if previous_uuid is None:
            return None
    return hashlib.sha256(get_hash_for_files(_source_files(), f"{settings}|{previous_uuid}")).hexdigest()


class SharedMaskingBuffersPass(CustomGraphPass):
    """Post-grad pass: run the user's previous pass, then share masking buffers (:mod:`.buffer_sharing`)."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        merged = buffer_sharing.share_masking_buffers(graph)
        if merged:
            log.debug("fa4_inductor: %d masking buffer ops share an earlier one's buffer", merged)

    def uuid(self) -> str | None:
        return _chained_uuid(self.previous, "shared masking buffers")


class FA4AttentionPass(CustomGraphPass):
    """Pre-grad pass: run the user's previous pass, then rewrite attention to FA4 (``post_pass``: the post-grad
    pass installed with it)."""

    def __init__(self, previous, devices: tuple[str, ...], arch_major: int | None = None):
        self.previous = previous
        self.devices = devices
        self.arch_major = arch_major
        self.post_pass: SharedMaskingBuffersPass | None = None
        self.previous_timing: str | None = None  # Inductor's pre-grad pass timing before install()

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        before = graph_dump.graph_code(graph) if graph_dump.wanted() else None
        context = RewriteContext(devices=self.devices, arch_major=self.arch_major)
        records = rewrite_graph(graph, context)
        if before is not None and records:
            graph_dump.emit(graph_dump.GraphDump(context.graph_name, before, graph_dump.graph_code(graph)))

    def uuid(self) -> str | None:
        return _chained_uuid(self.previous, f"{self.devices}|{self.arch_major}|{fa4_version.version()}")


# torch >= 2.12 runs a pre-grad pass that has a uuid after the cache lookup ("late"): a graph from Inductor's cache
# then runs no pass at all, so a warm cache would leave stats without the records of sites that run FA4. "early"
# runs the pre-grad passes before the lookup (as torch 2.11 did), so every compile, hit or miss, records its sites.
_TIMING, _EARLY = "pre_grad_pass_timing", "early"


def install(devices: tuple[str, ...]) -> FA4AttentionPass:
    """Chain our passes after the current ``pre_grad_custom_pass`` and ``post_grad_custom_post_pass``, and have
    pre-grad passes run on cache hits too; return the pre-grad pass (holding the other)."""
    attention_pass = FA4AttentionPass(inductor_config.pre_grad_custom_pass, devices)
    attention_pass.post_pass = SharedMaskingBuffersPass(inductor_config.post_grad_custom_post_pass)
    inductor_config.pre_grad_custom_pass = attention_pass
    inductor_config.post_grad_custom_post_pass = attention_pass.post_pass
    if hasattr(inductor_config, _TIMING):
        attention_pass.previous_timing = getattr(inductor_config, _TIMING)
        setattr(inductor_config, _TIMING, _EARLY)
    return attention_pass


def uninstall(attention_pass: FA4AttentionPass) -> None:
    """Put back the passes (and the pre-grad pass timing) that were there before ``install``."""
    for name, ours in (("pre_grad_custom_pass", attention_pass), ("post_grad_custom_post_pass",
                                                                   attention_pass.post_pass)):
        if ours is None:
            continue
        if getattr(inductor_config, name) is ours:
            setattr(inductor_config, name, ours.previous)
        else:
            log.warning("%s was replaced after fa4_inductor installed its pass; leaving the current value in place",
                        name)
    if attention_pass.previous_timing is not None and getattr(inductor_config, _TIMING) == _EARLY:
        setattr(inductor_config, _TIMING, attention_pass.previous_timing)
