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
correct answer when a pass's identity is unknown.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from . import fa4_api, graph_dump
from .pattern_registry import RewriteContext, rewrite_graph

log = logging.getLogger(__name__)

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def _source_files() -> tuple[str, ...]:
    from . import patterns

    dirs = (_PACKAGE_DIR, pathlib.Path(patterns.__file__).resolve().parent)
    return tuple(sorted(str(p) for d in dirs for p in d.glob("*.py")))


class FA4AttentionPass(CustomGraphPass):
    """Pre-grad pass: run the user's previous pass, then rewrite attention to FA4."""

    def __init__(self, previous, devices: tuple[str, ...], arch_major: int | None = None):
        self.previous = previous
        self.devices = devices
        self.arch_major = arch_major

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.previous is not None:
            self.previous(graph)
        before = graph_dump.graph_code(graph) if graph_dump.wanted() else None
        context = RewriteContext(devices=self.devices, arch_major=self.arch_major)
        records = rewrite_graph(graph, context)
        if before is not None and records:
            graph_dump.emit(graph_dump.GraphDump(context.graph_name, before, graph_dump.graph_code(graph)))

    def uuid(self) -> str | None:
        previous_uuid = None
        if self.previous is not None:
            previous_uuid = self.previous.uuid() if isinstance(self.previous, CustomGraphPass) else None
            if previous_uuid is None:
                return None
        settings = f"{self.devices}|{self.arch_major}|{fa4_api.version()}|{previous_uuid}"
        return hashlib.sha256(get_hash_for_files(_source_files(), settings)).hexdigest()


def install(devices: tuple[str, ...]) -> FA4AttentionPass:
    """Chain our pass after the current ``pre_grad_custom_pass``; return it."""
    attention_pass = FA4AttentionPass(inductor_config.pre_grad_custom_pass, devices)
    inductor_config.pre_grad_custom_pass = attention_pass
    return attention_pass


def uninstall(attention_pass: FA4AttentionPass) -> None:
    """Put back the pass that was there before ``install``."""
    if inductor_config.pre_grad_custom_pass is attention_pass:
        inductor_config.pre_grad_custom_pass = attention_pass.previous
    else:
        log.warning(
            "pre_grad_custom_pass was replaced after fa4_inductor installed its pass; "
            "leaving the current value in place"
        )
