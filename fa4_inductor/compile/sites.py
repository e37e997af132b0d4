"""What a pattern is and what it decides: the pattern and expansion types, the decision of one site, and the
registry the patterns add themselves to (:mod:`fa4_inductor.compile.rewrite` applies them to a graph)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._inductor.pattern_matcher import Match, PatternExpr

from fa4_inductor.compile import graph_mutations


@dataclasses.dataclass
class RewriteContext:
    """What a pattern needs to know about the compilation at hand."""

    devices: tuple[str, ...]
    arch_major: int | None = None  # None: detect from the device
    # Judge every site as if its tensors were on a CUDA GPU of ``arch_major``
    # (``explain`` on a machine without one).
    assume_cuda: bool = False
    # Count and log the sites (off for ``explain``, which only reports).
    publish: bool = True
    graph_name: str = "graph"
    records: list = dataclasses.field(default_factory=list)
    # The graph's in-place writes, which no rewrite may miss (set by :func:`rewrite_graph`).
    mutations: graph_mutations.Mutations | None = None


@dataclasses.dataclass
class SiteDecision:
    """A pattern's verdict on one site: FA4 parameters, or a fallback reason."""

    node: torch.fx.Node
    reason: str | None
    features: dict[str, Any]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Graph nodes the rewrite needs (operands found by the analysis, nodes to drop).
    captured: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AttentionPattern:
    """One idiom: what it matches, what it emits, its check and its rewrite.

    ``pattern`` is one ``pattern_matcher`` expression or a tuple of them;
    ``analyze`` returns None for a match that is no attention site at all.
    """

    name: str
    matches: str
    emits: str
    pattern: PatternExpr | tuple[PatternExpr, ...]
    analyze: Callable[[Match, RewriteContext], SiteDecision | None]
    rewrite: Callable[[Match, SiteDecision], None]


@dataclasses.dataclass(frozen=True)
class GraphExpansion:
    """A library call whose attention is inside it, one node in Dynamo's graph (``F.multi_head_attention_forward``).

    ``expand`` writes the node out as the PyTorch ops it computes, with one SDPA call the patterns then decide
    (its nodes carry ``EXPANDED_FROM``), and returns None; or it leaves the node and returns why.
    """

    name: str
    matches: str
    emits: str
    targets: tuple[Any, ...]
    expand: Callable[[torch.fx.Node, "RewriteContext"], str | None]


# Node meta key: the expansion that wrote the node; the site's record names the expansion as its pattern.
EXPANDED_FROM = "fa4_expanded_from"

_PATTERNS: list[AttentionPattern] = []
_EXPANSIONS: list[GraphExpansion] = []


def register(pattern: AttentionPattern) -> AttentionPattern:
    """Add a pattern; patterns are tried in registration order."""
    if any(p.name == pattern.name for p in _PATTERNS):
        raise ValueError(f"attention pattern {pattern.name!r} is registered twice")
    _PATTERNS.append(pattern)
    return pattern


def register_expansion(expansion: GraphExpansion) -> GraphExpansion:
    """Add an expansion; expansions run before the patterns."""
    if any(e.name == expansion.name for e in _EXPANSIONS):
        raise ValueError(f"graph expansion {expansion.name!r} is registered twice")
    _EXPANSIONS.append(expansion)
    return expansion


def registered_patterns() -> Sequence[AttentionPattern]:
    """The registered patterns, in the order they are tried."""
    return tuple(_PATTERNS)


def registered_expansions() -> Sequence[GraphExpansion]:
    """The registered expansions, in the order they run."""
    return tuple(_EXPANSIONS)
