"""What a pattern is and what it decides: the pattern and expansion types, the decision of one site, and the
registry the patterns add themselves to (:mod:`fa4_inductor.compile.rewrite` applies them to a graph)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch._inductor.pattern_matcher import Match, PatternExpr
from torch.fx import Node

from fa4_inductor.compile import graph_mutations
from fa4_inductor.compile.fx_utils import example_value


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


@dataclasses.dataclass(frozen=True)
class GraphScale:
    """A scale computed from graph scalars (``dynamic=True`` sizes and attributes): ``number * Π factors / Π
    divisors``; emission writes that arithmetic before the FA4 call."""

    number: float = 1.0
    factors: tuple[Node, ...] = ()
    divisors: tuple[Node, ...] = ()


@dataclasses.dataclass(frozen=True)
class AddedMasks:
    """0/-inf masks added to the scores one after another (T5's position bias, then the padding mask), each read
    by its addition: a key is kept where every one keeps it."""

    masks: tuple[Node, ...]
    readers: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class HeadScale:
    """A factor of the scores that differs per head: a tensor shaped (..., H or 1, 1, 1) (a learned temperature).
    Emission multiplies it into q (divides, with ``divides``) in q's dtype, which FA4 then reads: autograd sees the
    product, so a learned factor gets its gradient."""

    factor: Node
    divides: bool = False


@dataclasses.dataclass(frozen=True)
class Operand:
    """A (B, H, S, D) operand of the FA4 call: ``source`` as the graph has it, seen through the views emission
    writes (``transposed``: ``source`` is kᵀ, transposed back; ``one_head``: a (B * H, S, D) ``bmm`` operand read
    as (B * H, 1, S, D)) and the per-head factors it writes into q."""

    source: Node
    transposed: bool = False
    one_head: bool = False
    head_scales: tuple[HeadScale, ...] = ()  # q only

    @property
    def example(self) -> Any:
        """The operand's fake value (its source's, through the views)."""
        value = example_value(self.source)
        if isinstance(value, torch.Tensor) and self.transposed:
            value = value.transpose(-2, -1)
        if isinstance(value, torch.Tensor) and self.one_head:
            value = value.unsqueeze(1)
        return value


@dataclasses.dataclass(frozen=True)
class FixedBlocks:
    """Documents of ``size`` consecutive positions, ``q_idx // size == kv_idx // size`` (torchtitan's fixed-block
    mask): the segment ids ``arange(S) // size``, shared by every row, which emission writes."""

    size: int


@dataclasses.dataclass(frozen=True)
class Alibi:
    """ALiBi on the scores: ``slope(h) * (kv_idx - q_idx)`` (up to a constant per row). ``slope`` is arithmetic of
    the head index (the symbol ``head``) and of ``slopes``, a float graph tensor read at the head (the symbol
    ``slope``), where given: a (H_q,) one as it is, else read at ``slopes_index`` (None marking the head's axis; no
    None: one entry every head shares). Emission evaluates it per head and calls ``fa4.flash_attn_alibi_fwd``."""

    slope: Any  # a sympy expression
    slopes: Node | None = None
    slopes_index: tuple[int | None, ...] | None = None


@dataclasses.dataclass(frozen=True)
class OffsetChain:
    """How a relative-position bias is computed: ``ops`` (graph order) from ``positions``, an (S_q, S_kv) tensor
    holding ``kv - q + start``; run on a row of offsets instead, they give the bias once per offset."""

    positions: Node
    start: int
    ops: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class RelativeBias:
    """A bias on the scores that depends on the head and ``kv_idx - q_idx`` only (T5's bucketed position bias):
    ``values``, the graph tensor that holds it, broadcasting to (B, H, S_q, S_kv); emission reads it once per offset
    into the table ``fa4.flash_attn_relative_bias_fwd`` takes, rounded to ``dtype`` where the graph rounds the bias
    (with the mask it carries) before the scores read it."""

    values: Node
    dtype: torch.dtype | None = None
    chain: OffsetChain | None = None  # where known, emission runs it on the offsets instead of reading the grid
    # Where given, ``values`` is an (H, N) table read at [head, kv_idx - q_idx + table_start] (a FlexAttention
    # score_mod's), not the bias broadcast to the scores.
    table_start: int | None = None
    # ``values`` broadcasts to (B * H, S_q, S_kv), the heads folded into its first axis (a ``baddbmm`` input).
    folded: bool = False
    scale: float = 1.0  # the bias times this number (a scale applied to the scores after the bias is added)


@dataclasses.dataclass(frozen=True)
class KeyBias:
    """A bias on the scores that depends on the batch row, the head and ``kv_idx`` only (the same for every query):
    ``values``, the graph tensor that holds it, broadcasting to (B, H, S_q, S_kv); emission reads its first query
    row, rounded to ``dtype`` where the graph rounds the bias before the scores read it, into the table
    ``fa4.flash_attn_key_bias_fwd`` takes."""

    values: Node
    dtype: torch.dtype | None = None
    folded: bool = False  # ``values`` broadcasts to (B * H, S_q, S_kv), the heads folded into its first axis
    scale: float = 1.0  # the bias times this number (a scale applied to the scores after the bias is added)
    plus: tuple[KeyBias, ...] = ()  # other biases per key the scores add (Falcon's ALiBi, twice before 5.23)


PositionBias = Alibi | RelativeBias | KeyBias


@dataclasses.dataclass(frozen=True)
class FA4Params:
    """What a site's FA4 call computes: ``fa4.flash_attn_fwd``'s parameters after q, k and v, as the analysis found
    them. The masks are their sources in the graph (a 0/1 or bool padding input that hides the keys where it is
    nonzero with ``key_padding_hides``, per-row key lengths, segment ids per row or shared), which emission turns
    into FA4's operands."""

    softmax_scale: float | Node | GraphScale
    causal: bool = False
    window_left: int = -1
    window_right: int = -1
    softcap: float | Node = 0.0
    key_padding: Node | None = None
    key_padding_hides: bool = False
    key_lengths: Node | None = None
    segment_ids: Node | FixedBlocks | None = None
    # A mask given as data, decided at run time (``fa4.flash_attn_data_mask``); True in a bool one hides with
    # ``data_mask_hides``.
    data_mask: Node | None = None
    data_mask_hides: bool = False
    position_bias: PositionBias | None = None

    @property
    def mask_sources(self) -> tuple[Node, ...]:
        """The graph tensors the call reads its masks and bias from."""
        bias = self.position_bias
        bias_sources = (bias.slopes,) if isinstance(bias, Alibi) else (bias.values,) if bias is not None else ()
        if isinstance(bias, KeyBias):
            bias_sources += tuple(part.values for part in bias.plus)
        return tuple(n for n in (self.key_padding, self.key_lengths, self.segment_ids, self.data_mask, *bias_sources)
                     if isinstance(n, Node))


@dataclasses.dataclass(frozen=True)
class SiteOperands:
    """The graph values a site's rewrite reads and drops: q, k, v, the nodes that die with the site (a mask's
    subgraph, block lists) and those it replaced that may die too (a ``repeat_kv``, the scores)."""

    query: Operand
    key: Operand
    value: Operand
    dead: tuple[Node, ...] = ()
    replaced: tuple[Node, ...] = ()


@dataclasses.dataclass(frozen=True)
class SiteDecision:
    """A pattern's verdict on one site: the FA4 call it becomes (``params``, on ``operands``), or why it stays
    (``reason``); ``features`` are what the site record shows."""

    node: Node
    reason: str | None
    features: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    params: FA4Params | None = None
    operands: SiteOperands | None = None


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
