"""Hand-written attention: ``softmax(q @ kᵀ · scale [softcap] [+ mask]) @ v``.

Matches: the code of Hugging Face's ``attn_implementation="eager"`` and its
cousins, anchored on the softmax (``dim=-1``, optionally with
``dtype=float32``), read backwards: an optional mask added to the scores
(analyzed like an SDPA mask), an optional softcap ``tanh(x / c) * c``, an
optional scale (``* s`` or ``/ s``), and ``matmul(q, k.transpose(-2, -1))``
with K optionally GQA-repeated; and forwards: an optional cast back
(``.to(dtype)``), an optional dropout that is a no-op (``p=0`` or
``training=False``), and ``matmul(p, v)``. Emits: one ``fa4.flash_attn_fwd``
with the scale, softcap, causal/window found, replacing the final matmul;
the score/softmax chain and the mask are removed. Extra check: every step
has a single user (attention weights used elsewhere, e.g. returned to the
caller, keep the site as it is), plus the SDPA rules.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, CallMethodVarArgs, Match
from torch.fx import Node

from fa4_inductor.emit import example_value, op_name
from fa4_inductor.pattern_registry import AttentionPattern, RewriteContext, SiteDecision, register

from .common import Reciprocal, decide, guarded_value, replace_with_fa4

SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)


class NoMatch(Exception):
    """The code around this softmax is not (this kind of) attention."""


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _single_user(node: Node) -> Node:
    if len(node.users) != 1:
        raise NoMatch(f"{node.name} has {len(node.users)} users (attention weights used elsewhere?)")
    return next(iter(node.users))


def _scalar(value: Any) -> Any:
    """A Python number, or a graph node holding a scalar (``dynamic=True`` turns module
    float attributes into ``.item()`` nodes); None for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(example_value(value), (torch.SymFloat, torch.SymInt)):
        return value
    return None


def _constant_operand(node: Node) -> tuple[Node, Any] | None:
    """For ``x * c`` / ``c * x`` (c a scalar) return (x, c); None otherwise."""
    a, b = node.args[:2]
    if isinstance(a, Node) and _scalar(b) is not None and not isinstance(example_value(a), (torch.SymFloat, torch.SymInt)):
        return a, b
    if isinstance(b, Node) and _scalar(a) is not None:
        return b, a
    return None


def _is(node: Any, *names: str) -> bool:
    return op_name(node) in names


def _is_matmul(node: Node) -> bool:
    return _is(node, "matmul") or (node.op == "call_function" and node.target is operator.matmul)


def _peel_scores(scores: Node) -> dict[str, Any]:
    """Walk back from the softmax input to ``matmul(q, kᵀ)``."""
    node = scores
    if _is(node, "add", "__add__", "iadd") and all(isinstance(a, Node) for a in node.args[:2]):
        for scores_side, mask_side in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            try:
                inner = _peel_scores(scores_side)
            except NoMatch:
                continue
            if inner["mask"] is None:
                inner["mask"] = mask_side
                return inner
        raise NoMatch("no attention scores under the mask addition")
    capped = _constant_operand(node) if _is(node, "mul", "__mul__") else None
    if capped and _is(capped[0], "tanh"):
        cap, inner = capped[1], capped[0].args[0]
        if not (_is(inner, "div", "truediv", "__truediv__") and inner.args[1] == cap and isinstance(inner.args[0], Node)):
            raise NoMatch("tanh that is not a softcap tanh(x / c) * c")
        found = _peel_scale(inner.args[0])
        found["softcap"] = cap
        return found
    return _peel_scale(node)


def _peel_scale(node: Node) -> dict[str, Any]:
    found: dict[str, Any] = {"mask": None, "softcap": 0.0, "scale": 1.0}
    scaled = _constant_operand(node) if _is(node, "mul", "__mul__") else None
    if scaled:
        node, found["scale"] = scaled
    elif _is(node, "div", "truediv", "__truediv__") and _scalar(node.args[1]) is not None:
        divisor = node.args[1]
        found["scale"] = 1.0 / divisor if isinstance(divisor, (int, float)) else Reciprocal(divisor)
        node = node.args[0]
    if not _is_matmul(node):
        raise NoMatch("the scores are not matmul(q, k^T)")
    query, key_t = node.args[:2]
    if _is(key_t, "transpose") and sorted(int(d) % 4 for d in key_t.args[1:3]) == [2, 3]:
        found["key"] = key_t.args[0]
    else:
        raise NoMatch("the scores' right operand is not k.transpose(-2, -1)")
    found["query"] = query
    return found


def _peel_output(softmax: Node) -> tuple[Node, Node, float]:
    """Walk forward from the softmax to ``matmul(p, v)``: (output node, v, dropout p)."""
    node, dropout_p = _single_user(softmax), 0.0
    if _is(node, "to", "type_as", "type"):
        node = _single_user(node)
    if _is(node, "dropout"):
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
        if _scalar(p) is None or not isinstance(training, bool):
            raise NoMatch("dropout with a computed p or training flag")
        if isinstance(p, Node):
            p = guarded_value(p)  # a dynamic float attribute
        dropout_p = float(p) if training else 0.0
        node = _single_user(node)
    if not _is_matmul(node):
        raise NoMatch("the probabilities do not feed matmul(p, v)")
    return node, node.args[1], dropout_p


def analyze(match: Match, context: RewriteContext) -> SiteDecision | None:
    """Decide a hand-written attention site anchored on ``match``'s softmax.

    Returns None for a softmax that is not over the last dim of a 4-D
    tensor (not an attention site at all).
    """
    softmax = match.output_node()
    dim = _arg(softmax, 1, "dim")
    shape = example_value(softmax).shape if isinstance(example_value(softmax), torch.Tensor) else ()
    if len(shape) != 4 or dim not in (-1, 3):
        return None
    try:
        scores = _peel_scores(softmax.args[0])
        output, value, dropout_p = _peel_output(softmax)
    except NoMatch as exc:
        return SiteDecision(softmax, f"not attention: {exc}", {})
    decision = decide(
        output, context, scores["query"], scores["key"], value, dropout_p=dropout_p,
        scale=scores["scale"], enable_gqa=False, attn_mask=scores["mask"], softcap=scores["softcap"],
    )
    decision.captured["replaced"] = [softmax.args[0], scores["key"], value]
    return decision


def rewrite(match: Match, decision: SiteDecision) -> None:
    """Replace ``matmul(p, v)`` by an FA4 call; the score chain dies with it."""
    replace_with_fa4(decision, decision.node)


register(AttentionPattern(
    name="eager_attention",
    matches="softmax(matmul(q, k^T) * scale [softcap] [+ mask], dim=-1) [.to] [dropout p=0] @ v",
    emits="fa4.flash_attn_fwd (+ fa4.flash_attn_bwd via autograd)",
    pattern=(CallFunctionVarArgs(SOFTMAX), CallMethodVarArgs("softmax")),
    analyze=analyze,
    rewrite=rewrite,
))
