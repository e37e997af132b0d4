"""Schemas shared by the attention op families of the ``fa4`` namespace."""

from __future__ import annotations

import torch

TAGS = (torch.Tag.pt2_compliant_tag,)


def define_attention_ops(name: str, arguments: str) -> torch.library.Library:
    """Define ``fa4::{name}_fwd`` (the differentiable op) and ``{name}_fwd_kernel``, ``(q, k, v, arguments) -> (out,
    lse)``, and ``{name}_bwd``, ``(dout, q, k, v, out, lse, arguments) -> (dq, dk, dv)``; return their library."""
    library = torch.library.Library("fa4", "FRAGMENT")
    for op in (f"{name}_fwd", f"{name}_fwd_kernel"):
        library.define(f"{op}(Tensor q, Tensor k, Tensor v, {arguments}) -> (Tensor, Tensor)", tags=TAGS)
    library.define(f"{name}_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {arguments}) "
                   "-> (Tensor, Tensor, Tensor)", tags=TAGS)
    return library


def implement_attention_ops(library: torch.library.Library, name: str, differentiable, kernels: dict) -> None:
    """Register the ops :func:`define_attention_ops` defined: ``differentiable`` as ``{name}_fwd``
    (CompositeImplicitAutograd) and ``kernels`` = {"forward"/"backward": {"CPU"/"CUDA"/"fake": function}}."""
    library.impl(f"{name}_fwd", differentiable, "CompositeImplicitAutograd")
    for kind, op in (("forward", f"{name}_fwd_kernel"), ("backward", f"{name}_bwd")):
        for device in ("CPU", "CUDA"):
            library.impl(op, kernels[kind][device], device)
        torch.library.register_fake(f"fa4::{op}", kernels[kind]["fake"], lib=library)
