"""Branches on a uniform random draw whose outcome the draw's range decides: LayerDrop at ``layerdrop=0``.

Hugging Face's OPT, BART, Whisper, mBART, Marian (57 model files) skip a layer in training when
``torch.rand([]) < self.layerdrop``. Dynamo can't branch on a tensor, so it breaks the graph there, inside the loop
over the layers, which makes it give up on the whole frame: every layer becomes a graph of its own that receives the
attention mask built elsewhere as an opaque input, with no causal or padding structure left to prove. A
``torch.rand`` draw lies in [0, 1], so ``draw < c`` with ``c <= 0`` is False whatever was drawn: the program's
branch is known before it runs, and Dynamo is told so (the draw stays in the graph, as in the program). Any other
comparison, a draw the program could have changed, or a bound that is a symbol is left to Dynamo.
"""

from __future__ import annotations

import logging
import operator
import threading

import torch

from fa4_inductor import _torch_private, stats

log = logging.getLogger(__name__)

_DRAW_RANGE = (0.0, 1.0)  # torch.rand draws from [0, 1); 1 is included so rounding to a narrow dtype is covered
_DRAWS = (torch.rand, torch.rand_like)
_COMPARISONS = {operator.lt: "lt", operator.le: "le", operator.gt: "gt", operator.ge: "ge",
                torch.lt: "lt", torch.le: "le", torch.gt: "gt", torch.ge: "ge"}
_METHOD_COMPARISONS = {name: name for name in ("lt", "le", "gt", "ge")} | {
    f"__{name}__": name for name in ("lt", "le", "gt", "ge")}
_MIRRORED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def _comparison(node: torch.fx.Node) -> str | None:
    if node.op == "call_function":
        return _COMPARISONS.get(node.target)
    if node.op == "call_method":
        return _METHOD_COMPARISONS.get(node.target)
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_unchanged_draw(node) -> bool:
    """A ``torch.rand``/``rand_like`` result read by comparisons only (nothing could have written to it)."""
    return (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _DRAWS
            and "out" not in node.kwargs and all(_comparison(user) is not None for user in node.users))


def _truth(op: str, bound: float) -> bool | None:
    low, high = _DRAW_RANGE
    always, never = {"lt": (high < bound, low >= bound), "le": (high <= bound, low > bound),
                     "gt": (low > bound, high <= bound), "ge": (low >= bound, high < bound)}[op]
    return True if always else False if never else None


def decided_truth(node: torch.fx.Node) -> bool | None:
    """The truth of a one-element comparison of a uniform draw with a number, when every draw gives the same one
    (``rand([]) < 0.0`` is False); None when it depends on the draw or ``node`` is no such comparison."""
    example = node.meta.get("example_value")
    op = _comparison(node)
    if op is None or not isinstance(example, torch.Tensor) or example.numel() != 1 or len(node.args) != 2:
        return None
    left, right = node.args
    if _is_number(left) and _is_unchanged_draw(right):
        op, left, right = _MIRRORED[op], right, left
    if not (_is_unchanged_draw(left) and _is_number(right)):
        return None
    return _truth(op, float(right))


def _decide(node: torch.fx.Node) -> bool | None:
    truth = decided_truth(node)
    if truth is not None:
        stats.counters["compile.drawn_branches_decided"] += 1
        log.debug("branch on %s decided %s for every draw (%s)", node.name, truth,
                  (node.meta.get("stack_trace") or "").strip().splitlines()[-1:])
    return truth


_lock = threading.Lock()
_users = 0
_undo = None


def see_through() -> None:
    """Have Dynamo take the branch such comparisons decide instead of breaking the graph (counted: one
    :func:`stop_seeing_through` per call undoes it)."""
    global _users, _undo
    with _lock:
        _users += 1
        if _users == 1:
            _undo = _torch_private.decide_tensor_branches(_decide)


def stop_seeing_through() -> None:
    """Undo one :func:`see_through`; the last one gives Dynamo back its own branch handling."""
    global _users, _undo
    with _lock:
        _users -= 1
        if _users == 0 and _undo is not None:
            _undo()
            _undo = None
