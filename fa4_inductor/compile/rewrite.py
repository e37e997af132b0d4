"""The pass that applies the registered patterns to a graph.

A pattern (one per idiom family, in :mod:`fa4_inductor.compile.patterns`) declares what it matches (an Inductor
``pattern_matcher`` expression), what it emits, and an ``analyze`` step that is the extra check: it returns a
:class:`~fa4_inductor.compile.sites.SiteDecision` with the FA4 parameters, or the reason the site stays on the stock
path. Every analyzed site leaves a :class:`~fa4_inductor.stats.SiteRecord`.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging

import torch
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, register_graph_pattern

from fa4_inductor import stats
from fa4_inductor.compile import emit, graph_mutations, library_calls, library_ops
from fa4_inductor.compile.fx_utils import example_value, op_name, user_location
from fa4_inductor.compile import patterns  # noqa: F401  (registers the built-in patterns and expansions)
from fa4_inductor.compile.sites import (EXPANDED_FROM, AttentionPattern, RewriteContext, SiteDecision,
                                        registered_expansions, registered_patterns)

log = logging.getLogger(__name__)

_graph_ids = itertools.count()


def source_location(node: torch.fx.Node) -> tuple[str | None, str | None]:
    """('file:line', module path) of the user code that made ``node``: the innermost frame outside torch itself."""
    module_stack = node.meta.get("nn_module_stack") or {}
    module_path = list(module_stack.values())[-1][0] if module_stack else None
    return user_location(node.meta.get("stack_trace")), module_path


def _record(pattern_name: str, decision: SiteDecision, context: RewriteContext, anchor: torch.fx.Node) -> None:
    location, module_path = source_location(decision.node)
    record = stats.SiteRecord(
        graph=context.graph_name,
        node=decision.node.name,
        target=getattr(decision.node.target, "__name__", str(decision.node.target)),
        pattern=pattern_name,
        decision="fallback" if decision.reason else "fa4",
        reason=decision.reason,
        location=location,
        module_path=module_path,
        features=decision.features,
        anchor=anchor.name if anchor is not decision.node else None,
    )
    context.records.append(record)


def _analyzed(pattern: AttentionPattern, match: Match, context: RewriteContext) -> SiteDecision | None:
    """``pattern.analyze``; a site whose analysis raised stays as it is, with a reason naming the pattern and node
    (the exception is logged, not shown as the reason)."""
    try:
        return pattern.analyze(match, context)
    except Exception:
        node = match.output_node()
        log.warning("fa4_inductor: the %s analysis failed on '%s'; the site stays on the stock path", pattern.name,
                    node.name, exc_info=log.isEnabledFor(logging.DEBUG))
        return SiteDecision(node, f"the {pattern.name} analysis can't read the code at '{node.name}' "
                                  f"({getattr(node.target, '__name__', node.target)}); left as written", {})


# The compilation a pass is deciding for: set by rewrite_graph around the pass, read by the patterns' checks.
_current: contextvars.ContextVar[RewriteContext] = contextvars.ContextVar("fa4_inductor_rewrite_context")


@functools.lru_cache(maxsize=1)
def _pattern_pass(registered: tuple[AttentionPattern, ...]) -> PatternMatcherPass:
    """The pass of the ``registered`` patterns, built once (again only if a pattern is registered later)."""
    matcher = PatternMatcherPass(pass_name="fa4_inductor")
    for pattern in registered:
        decisions: dict[torch.fx.Node, SiteDecision] = {}

        def check(match: Match, pattern=pattern, decisions=decisions) -> bool:
            context = _current.get()
            decision = _analyzed(pattern, match, context)
            if decision is None:
                return False
            _record(decision.node.meta.get(EXPANDED_FROM, pattern.name), decision, context, match.output_node())
            decisions[match.output_node()] = decision
            return decision.reason is None

        def replace(match: Match, *args, pattern=pattern, decisions=decisions, **kwargs) -> None:
            pattern.rewrite(match, decisions.pop(match.output_node()))

        expressions = pattern.pattern if isinstance(pattern.pattern, tuple) else (pattern.pattern,)
        for expression in expressions:
            register_graph_pattern(expression, extra_check=check, pass_dict=matcher)(replace)
    return matcher


def _expand(graph: torch.fx.Graph, context: RewriteContext) -> None:
    """Run the expansions on their nodes; a node one leaves gets a fallback record with its reason."""
    by_target = {target: e for e in registered_expansions() for target in e.targets}
    for node in list(graph.nodes):
        expansion = by_target.get(node.target) if node.op == "call_function" else None
        if expansion is None:
            continue
        try:
            reason = expansion.expand(node, context)
        except Exception:
            log.warning("fa4_inductor: the %s expansion failed on '%s'; the call stays as written", expansion.name,
                        node.name, exc_info=log.isEnabledFor(logging.DEBUG))
            reason = f"the {expansion.name} expansion can't read the call at '{node.name}'; left as written"
        if reason is not None:
            _record(expansion.name, SiteDecision(node, reason, {}), context, node)


def _rewrite_library_ops(graph: torch.fx.Graph, context: RewriteContext) -> list[stats.SiteRecord]:
    """Decide every FA2/FA3 op node (:mod:`.library_ops`) and write the fa4 op in place of each that FA4 serves."""
    records = []
    for node in list(graph.nodes):
        if library_ops.library_op(node) is not None:
            if library_ops.in_function_body(node):  # Inductor's pass visits the body too: its function decides
                continue
            decision = library_ops.decide(node, context)
        elif library_ops.inside_autograd_function(node) is not None:
            decision = library_ops.decide_autograd_function(node, context)
        else:
            continue
        location, module_path = source_location(node)
        target = library_ops.schema_name(node) or str(node.target)
        # A rewritten site is recorded under its fa4 op's node, the one left in the graph.
        name = node.name if decision.reason else emit.replace_library_op(decision).name
        records.append(stats.SiteRecord(
            graph=context.graph_name, node=name, target=target, pattern=decision.api,
            decision="fallback" if decision.reason else "fa4", reason=decision.reason, location=location,
            module_path=module_path, features=decision.features))
    return records


_SOFTMAX_NAMES = {"softmax", "_softmax", "_safe_softmax", "log_softmax"}


def _over_scores(softmax: torch.fx.Node) -> bool:
    """Could the softmax be attention's: over a tensor of 3 or more axes (batch, queries, keys)? A classifier's or a
    router's softmax is over 2."""
    value = example_value(softmax)
    return isinstance(value, torch.Tensor) and value.dim() >= 3


def _unreported_softmaxes(graph: torch.fx.Graph, context: RewriteContext) -> list[stats.SiteRecord]:
    """A fallback record for every softmax over scores (3 or more axes) that no pattern decided: no attention is
    left on PyTorch without the user being told."""
    decided = {r.anchor or r.node for r in context.records}
    records = []
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and op_name(node) in _SOFTMAX_NAMES \
                and node.name not in decided and _over_scores(node):
            location, module_path = source_location(node)
            records.append(stats.SiteRecord(
                graph=context.graph_name, node=node.name, target="softmax", pattern=None, decision="fallback",
                reason=f"softmax over a {tuple(example_value(node).shape)} tensor that no attention pattern matched "
                       "(not q @ kᵀ → softmax → @ v as the patterns read it): left as written",
                location=location, module_path=module_path, features={}))
    return records


def rewrite_graph(graph: torch.fx.Graph, context: RewriteContext) -> list[stats.SiteRecord]:
    """Apply every registered pattern to ``graph``; return the site records."""
    context.graph_name = f"{context.graph_name}_{next(_graph_ids)}"
    context.records.extend(library_calls.records(graph, context.graph_name, source_location))
    context.records.extend(_rewrite_library_ops(graph, context))
    _expand(graph, context)
    context.mutations = graph_mutations.Mutations(graph)
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    token = _current.set(context)
    try:
        _pattern_pass(tuple(registered_patterns())).apply(graph)
    finally:
        _current.reset(token)
    context.records.extend(_unreported_softmaxes(graph, context))
    context.records.sort(key=lambda r: order.get(r.node, len(order)))
    if context.publish:
        for record in context.records:
            stats.record_site(record)
    return context.records
