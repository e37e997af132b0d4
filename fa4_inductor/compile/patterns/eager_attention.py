"""Hand-written attention: ``softmax(q @ kᵀ · scale [softcap] [+ mask]) @ v``.

Matches: the code of Hugging Face's ``attn_implementation="eager"`` and its
cousins, over (B, H, S, D) operands or (B * H, S, D) ones with ``bmm``/``baddbmm`` (diffusers' classic
``AttnProcessor``, PyTorch's fuse_attention set), their scores viewed as (B, H, S, S) for the mask and the softmax
where the operands are (B, H, S, D) tensors with the heads folded into the batch (Bloom, with its ALiBi as the
``baddbmm`` input; mBART, folded again before the softmax), anchored on the softmax (``dim=-1``, optionally with
``dtype=float32``), read backwards: an optional mask added to the scores
(analyzed like an SDPA mask), an optional softcap ``tanh(x / c) * c``, an
optional scale (``* s`` or ``/ s``, ``s`` a number or a 0-d constant tensor), and
``matmul(q, k.transpose(-2, -1))`` with K optionally GQA-repeated; and forwards:
casts (``.to(dtype)``) and copies (``.clone()``) in any order around an optional
dropout that is a no-op (``p=0`` or ``training=False``), and ``matmul(p, v)``. Emits: one ``fa4.flash_attn_fwd``
with the scale, softcap, causal/window found, replacing the final matmul;
the score/softmax chain and the mask are removed. Extra check: every step
has a single user (attention weights used elsewhere, e.g. returned to the
caller, keep the site as it is), plus the SDPA rules.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
from torch._inductor.pattern_matcher import CallFunctionVarArgs, CallMethodVarArgs, Match
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import guard_or_false, statically_known_true

from fa4_inductor.compile import bias_analysis, mask_analysis, modeled_ops
from fa4_inductor.compile.fx_utils import example_value, op_name
from fa4_inductor.compile.emit import call_with_meta, emit_fa4, replace_output, replace_with_fa4
from fa4_inductor.compile.sites import (AddedMasks, Alibi, AttentionPattern, GraphScale, HeadScale, Operand,
                                        PositionBias, RewriteContext, SiteDecision, register)

from .common import decide, guarded_value

# aten._safe_softmax (what SDPA's math decomposition calls) gives zeros in a row whose every score is -inf, as FA4.
SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax, torch.ops.aten._safe_softmax,
           torch.ops.aten._safe_softmax.default)


class NoMatch(Exception):
    """The code around this softmax is not (this kind of) attention."""


class NotServed(NoMatch):
    """The code around this softmax is attention that FA4 does not compute as written."""


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _single_user(node: Node) -> Node:
    if len(node.users) != 1:
        raise NoMatch(f"{node.name} has {len(node.users)} users (attention weights used elsewhere?)")
    return next(iter(node.users))


def _scalar(value: Any) -> Any:
    """A Python number (also given as a 0-d constant tensor, ``torch.full((), c)`` / ``torch.tensor(c)``), or a
    graph node holding a scalar (``dynamic=True`` turns module float attributes into ``.item()`` nodes); None for
    anything else."""
    value = _constant_tensor_value(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(example_value(value), (torch.SymFloat, torch.SymInt)):
        return value
    return None


def _constant_tensor_value(value: Any) -> Any:
    """The number a 0-d constant tensor made in the graph holds (``torch.full([], c)``, ``torch.tensor(c)``,
    ``torch.scalar_tensor(c)``; a graph node where the number is symbolic), else ``value`` itself."""
    if not isinstance(value, Node) or not _is(value, "full", "tensor", "scalar_tensor"):
        return value
    example = example_value(value)
    if not isinstance(example, torch.Tensor) or example.dim() != 0 or example.requires_grad:
        return value
    size, number = (value.args[:2] if _is(value, "full") else ((), value.args[0] if value.args else None))
    symbolic = isinstance(example_value(number), (torch.SymFloat, torch.SymInt))  # e.g. sqrt(head_dim), dynamic
    if tuple(size) != () or isinstance(number, bool) or not (isinstance(number, (int, float)) or symbolic):
        return value
    return number


def _constant_operand(node: Node) -> tuple[Node, Any] | None:
    """For ``x * c`` / ``c * x`` (c a scalar) return (x, c); None otherwise."""
    a, b = node.args[:2]
    if isinstance(a, Node) and _scalar(b) is not None and not isinstance(example_value(a), (torch.SymFloat, torch.SymInt)):
        return a, _scalar(b)
    if isinstance(b, Node) and _scalar(a) is not None:
        return b, _scalar(a)
    return None


def _head_factor(node: Node) -> tuple[Node, Node] | None:
    """For ``x * t`` / ``t * x`` / ``x / t`` with ``t`` a float tensor that varies along the head axis of a 4-D ``x``
    only (shaped (..., H or 1, 1, 1)): (x, t); None otherwise."""
    pairs = ((node.args[0], node.args[1]),) if _is(node, "div", "truediv", "__truediv__") \
        else ((node.args[0], node.args[1]), (node.args[1], node.args[0]))
    for x, factor in pairs:
        x_value, factor_value = example_value(x), example_value(factor)
        if not (isinstance(x, Node) and isinstance(factor, Node) and isinstance(x_value, torch.Tensor)
                and isinstance(factor_value, torch.Tensor) and factor_value.is_floating_point()):
            continue
        shape = tuple(factor_value.shape)
        if x_value.dim() == 4 and 3 <= len(shape) <= 4 and shape[-2:] == (1, 1) and shape[:-3] in ((), (1,)) \
                and shape[-3] in (1, x_value.shape[1]):
            return x, factor
    return None


def _is(node: Any, *names: str) -> bool:
    """Is ``node`` a call of one of ``names``? A call with an argument the analysis does not model (a division's
    ``rounding_mode``, an ``alpha``, an ``out``) makes the site fall back, naming it."""
    if op_name(node) not in names:
        return False
    unmodeled = modeled_ops.unmodeled_argument(node)
    if unmodeled is not None:
        raise NotServed(f"the attention uses {unmodeled}")
    return True


def _is_matmul(node: Node) -> bool:
    return _is(node, "matmul", "bmm") or (node.op == "call_function" and node.target is operator.matmul)


def _is_last_two_transposed(node: Any) -> bool:
    """``x.transpose(-2, -1)`` (any spelling of the two last dims)."""
    value = example_value(node)
    if not _is(node, "transpose") or not isinstance(value, torch.Tensor):
        return False
    rank = value.dim()
    return sorted(int(d) % rank for d in node.args[1:3]) == [rank - 2, rank - 1]


# Casts to a float type keep a tensor's values (up to its precision): FA4 computes scores and softmax in float32
# anyway. (Each use checks the result is a float: ``_is_float_cast``.)
_CASTS = tuple(modeled_ops.DTYPE_CASTS)


def _peel_casts(node: Any, exact_only: bool = False) -> Any:
    """See through dtype casts (``scores.float()``, ``.to(torch.float32)``, ``.type_as(q)``); with ``exact_only``
    only through those that keep every value (to a wider type): q and k rounded to bf16 after float32 rotary code
    (OLMo, Cohere) are the bf16 tensors the scores are made of, not their float32 sources."""
    while _is(node, *_CASTS) and isinstance(node.args[0], Node) and _is_float_cast(node) \
            and not (exact_only and _narrows(node)):
        node = node.args[0]
    return node


def _narrows(cast: Node) -> bool:
    before, after = example_value(cast.args[0]).dtype, example_value(cast).dtype
    return before != after and after.itemsize <= before.itemsize


def _is_float_cast(node: Node) -> bool:
    value = example_value(node)
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.device == example_value(
        node.args[0]).device


def _peel_factors(node: Any, factors: list, operand: bool = False, per_head: bool = True) -> Any:
    """See through ``x * c``, ``c * x`` and ``x / c`` with scalar ``c`` (and casts, on an ``operand`` of the scores
    only those that keep its values), and with ``per_head`` a factor per head (:func:`_head_factor`; not on k,
    whose heads GQA may repeat); collect the factors."""
    while True:
        node = _peel_casts(node, exact_only=operand)
        # In-place spellings too (Falcon's ``scores /= sqrt(d)``): the write's value is the product's, and
        # graph_mutations checks that nothing else reads the tensor it writes.
        scaled = _constant_operand(node) if _is(node, "mul", "__mul__", "mul_", "imul", "__imul__") else None
        if scaled:
            node = scaled[0]
            factors.append(scaled[1])
        elif _is(node, "div", "truediv", "__truediv__", "div_", "itruediv", "__itruediv__") \
                and _scalar(node.args[1]) is not None:
            divisor = _scalar(node.args[1])
            factors.append(1.0 / divisor if isinstance(divisor, (int, float)) else GraphScale(divisors=(divisor,)))
            node = node.args[0]
        elif per_head and _is(node, "mul", "__mul__", "div", "truediv", "__truediv__") \
                and (head := _head_factor(node)) is not None:
            factors.append(HeadScale(head[1], divides=not _is(node, "mul", "__mul__")))
            node = head[0]
        elif _is_identity_view(node):  # Falcon's matmul_result.view(B, H, S_q, S_kv)
            node = node.args[0]
        else:
            return node


def _is_identity_view(node: Any) -> bool:
    """Is ``node`` a ``view``/``reshape`` to its input's own shape?"""
    if not (_is(node, "view", "reshape", "_unsafe_view") and isinstance(node.args[0], Node)):
        return False
    before, after = example_value(node.args[0]), example_value(node)
    return isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dim() == after.dim() \
        and all(statically_known_true(a == b) for a, b in zip(before.shape, after.shape))


def _scale(factors: list) -> Any:
    """One softmax scale from the factors found around the scores: a number, or a :class:`GraphScale`."""
    number = math.prod(f for f in factors if isinstance(f, (int, float)))  # per-head factors go into q
    divisors = tuple(d for f in factors if isinstance(f, GraphScale) for d in f.divisors)
    symbolic = tuple(f for f in factors if isinstance(f, Node))
    return GraphScale(number, symbolic, divisors) if symbolic or divisors else number


def _einsum(node: Node) -> tuple[str, Node, Node] | None:
    """``("scores", a, b)`` for ``einsum("..ik,..jk->..ij", a, b)`` (a @ bᵀ), ``("output", a, b)`` for
    ``einsum("..ij,..jk->..ik", a, b)`` (a @ b), over 4-D operands with shared leading letters; else None."""
    if not (_is(node, "einsum") and isinstance(node.args[0], str)):
        return None
    operands = node.args[1:] if len(node.args) > 2 else tuple(node.args[1])
    if len(operands) != 2 or not all(isinstance(t, Node) for t in operands):
        return None
    inputs, _, output = node.args[0].replace(" ", "").partition("->")
    left, _, right = inputs.partition(",")
    if not (len(left) == len(right) == len(output) == 4 and left[:2] == right[:2] == output[:2]):
        return None
    (i, x), (j, y), (o1, o2) = left[2:], right[2:], output[2:]
    if x == y and (o1, o2) == (i, j) and len({i, j, x}) == 3:
        return "scores", *operands
    if x == j and (o1, o2) == (i, y) and len({i, j, y}) == 3:
        return "output", *operands
    return None


def _peel_scores(scores: Node, bias_of: _BiasTerms) -> dict[str, Any]:
    """Walk back from the softmax input to ``q @ kᵀ``; ``bias_of`` tells a position bias added to the scores."""
    node = _peel_casts(scores)
    scaled = _scaled_after_a_term(node)
    if scaled is not None:
        return _times(_peel_scores(scaled[0], bias_of), scaled[1])
    # In-place spellings (``scores += mask``, ``scores.masked_fill_(m, -inf).softmax(-1)``) read as their out-of-place
    # twins: the site falls back where another reader would see the write (fa4_inductor.compile.graph_mutations).
    if _is(node, "add", "__add__", "iadd", "add_", "__iadd__") and all(isinstance(a, Node) for a in node.args[:2]):
        not_served = None
        for scores_side, mask_side in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            try:
                inner = _peel_scores(scores_side, bias_of)
            except NotServed as exc:
                not_served = not_served or exc
                continue
            except NoMatch:
                continue
            bias = bias_of(mask_side, node)
            if bias is not None:
                if inner["bias"] is not None:
                    raise NotServed("two position biases added to the scores")
                inner["bias"], inner["bias_term"] = bias, mask_side
                return inner
            if inner["mask"] is None:
                inner["mask"], inner["mask_reader"] = mask_side, node
                return inner
            if not inner["mask_hides_where_true"] and not _is(inner["mask_reader"], "masked_fill", "masked_fill_",
                                                                  "where"):
                masks = inner["mask"] if isinstance(inner["mask"], AddedMasks) \
                    else AddedMasks((inner["mask"],), (inner["mask_reader"],))
                inner["mask"] = AddedMasks((*masks.masks, mask_side), (*masks.readers, node))
                inner["mask_reader"] = node
                return inner
        raise not_served or NoMatch("no attention scores under the mask addition")
    floor = _scalar(node.args[1]) if _is(node, "max", "maximum") and len(node.args) == 2 else None
    if isinstance(floor, (int, float)) and floor <= -1e30 and isinstance(node.args[0], Node):
        # XGLM keeps masked scores finite, max(scores + mask, finfo.min): every score stays as it is but a hidden
        # key's, which stays hidden (a fill at or below -1e30 hides a key here)
        return _peel_scores(node.args[0], bias_of)
    fill = _scalar(node.args[2]) if _is(node, "masked_fill", "masked_fill_", "where") else None
    if isinstance(fill, (int, float)) and fill <= -1e30 and all(isinstance(a, Node) for a in node.args[:2]):
        # masked_fill(scores, hidden, fill), or where(kept, scores, fill) (GPT-2)
        mask, scores_node = (node.args[1], node.args[0]) if _is(node, "masked_fill", "masked_fill_") \
            else (node.args[0], node.args[1])
        inner = _peel_scores(scores_node, bias_of)
        if inner["mask"] is not None and bias_of.refused:
            raise NotServed(f"a bias on the scores that FA4 does not add: {'; '.join(bias_of.refused)}")
        if inner["mask"] is not None:
            raise NoMatch("two masks on the scores")
        inner["mask"], inner["mask_hides_where_true"], inner["mask_reader"] = mask, not _is(node, "where"), node
        return inner
    filled = node.args[0] if _is(node, "masked_fill", "masked_fill_") else node.args[1] if fill is not None else None
    if isinstance(fill, (int, float)) and fill < 0 and isinstance(filled, Node):
        _peel_scores(filled, bias_of)  # scores filled with -1e4 or -1e9
        raise NotServed(f"scores filled where hidden: {mask_analysis.finite_fill_reason(fill)}")
    capped = _constant_operand(node) if _is(node, "mul", "__mul__") else None
    if capped and _is(capped[0], "tanh"):
        cap, inner = capped[1], capped[0].args[0]
        if not (_is(inner, "div", "truediv", "__truediv__") and inner.args[1] == cap and isinstance(inner.args[0], Node)):
            raise NoMatch("tanh that is not a softcap tanh(x / c) * c")
        found = _peel_scale(inner.args[0], bias_of)
        found["softcap"] = cap
        return found
    return _peel_scale(node, bias_of)


# What a scale after the scores' masks and biases may wrap: the scores with a term added, filled or floored.
_TERMS = ("add", "__add__", "iadd", "add_", "__iadd__", "masked_fill", "masked_fill_", "where", "max", "maximum")


def _scaled_after_a_term(node: Node) -> tuple[Node, float] | None:
    """(x, c) for ``x * c``, ``c * x`` or ``x / (1 / c)`` (in place too) with ``c`` a positive number and ``x``
    (through casts) scores with a term added, filled or floored (Falcon's ``(q·kᵀ + alibi) * s`` before transformers
    5.23); else None. ``(s + t) * c = s * c + t * c``, and a hidden key stays hidden for ``c > 0``."""
    if _is(node, "mul", "__mul__", "mul_", "imul", "__imul__"):
        pair = _constant_operand(node)
    elif _is(node, "div", "truediv", "__truediv__", "div_", "itruediv", "__itruediv__") \
            and isinstance(_scalar(node.args[1]), (int, float)) and _scalar(node.args[1]) > 0:
        pair = (node.args[0], 1.0 / _scalar(node.args[1]))
    else:
        return None
    if pair is None or not isinstance(pair[0], Node) or not isinstance(pair[1], (int, float)) or pair[1] <= 0:
        return None
    return (pair[0], float(pair[1])) if op_name(_peel_casts(pair[0])) in _TERMS else None


def _times(found: dict[str, Any], factor: float) -> dict[str, Any]:
    """``found`` scores with everything on them (the scale, a position bias) multiplied by ``factor`` > 0."""
    if found["softcap"]:
        raise NotServed("not attention as written: a scale after the softcap, which FA4 applies last")
    scale = found["scale"]
    found["scale"] = dataclasses.replace(scale, number=scale.number * factor) if isinstance(scale, GraphScale) \
        else scale * factor
    bias = found["bias"]
    if isinstance(bias, Alibi):
        found["bias"] = dataclasses.replace(bias, slope=bias.slope * factor)
    elif bias is not None:
        found["bias"] = dataclasses.replace(bias, scale=bias.scale * factor)
    return found


def _peel_scale(node: Node, bias_of: _BiasTerms, factors: list | None = None, heads: Any = None) -> dict[str, Any]:
    """``q @ kᵀ`` (``matmul``, ``@`` or ``einsum``) with scalar factors anywhere on the scores, q or k; or a
    (B * H, S_q, S_kv) ``bmm``/``baddbmm`` of operands with the heads folded into the batch, viewed as (B, H, S_q,
    S_kv) scores (Bloom, mBART): ``heads`` is then H, set in ``found["heads"]``, and the operands found are the (B, H,
    S, D) tensors folded."""
    factors = [] if factors is None else factors
    node = _peel_factors(node, factors)
    found: dict[str, Any] = {"mask": None, "softcap": 0.0, "mask_hides_where_true": False, "bias": None,
                             "heads": heads}
    einsum = _einsum(node)
    if einsum is not None and einsum[0] == "scores":
        query, key = einsum[1:]
    elif _is_matmul(node) or _is(node, "baddbmm"):
        query, key_t = (_arg(node, 1, "batch1"), _arg(node, 2, "batch2")) if _is(node, "baddbmm") \
            else (_arg(node, 0, "input"), _arg(node, 1, "mat2", _arg(node, 1, "other")))
        if _is(node, "baddbmm"):
            _peel_baddbmm(node, factors, found)
        key_t = _peel_factors(key_t, factors, operand=True, per_head=False)
        rank = example_value(node).dim()
        if _is_last_two_transposed(key_t):
            key = key_t.args[0]
        elif isinstance(example_value(key_t), torch.Tensor) and example_value(key_t).dim() == rank:
            key, found["key_transposed"] = None, key_t  # permute, .mT, ...: the rewrite transposes it back
        else:
            raise NoMatch(f"the scores' right operand is not a {rank}-D kᵀ")
    elif heads is None and _is(node, "view", "reshape", "_unsafe_view") \
            and (split := _folded_heads(node.args[0], node)) is not None:
        return _peel_scale(node.args[0], bias_of, factors, split)
    else:
        raise NoMatch("the scores are not q @ k^T")
    found["query"] = _peel_factors(query, factors, operand=True)
    found["key"] = _peel_factors(key, factors, operand=True, per_head=False) if key is not None else None
    if heads is not None:
        _unfold_scores(found, heads, bias_of, factors)
    found["scale"] = _scale(factors)
    found["head_scales"] = tuple(f for f in factors if isinstance(f, HeadScale))
    return found


def _folded_heads(folded: Node, unfolded: Node) -> Any:
    """H where ``folded`` is (B * H, ...) and ``unfolded`` is (B, H, ...), the rest of their shapes the same (a
    ``view`` between them splits or folds the heads); else None."""
    small, large = example_value(folded), example_value(unfolded)
    if not (isinstance(small, torch.Tensor) and isinstance(large, torch.Tensor) and small.dim() == 3
            and large.dim() == 4):
        return None
    same = [statically_known_true(small.shape[0] == large.shape[0] * large.shape[1])] + [
        statically_known_true(a == b) for a, b in zip(small.shape[1:], large.shape[2:])]
    return large.shape[1] if all(same) else None


def _same_heads(found: Any, heads: Any) -> bool:
    """Is ``found`` (a :func:`_folded_heads` result, None for no fold) the same head count as ``heads``?"""
    return found is not None and statically_known_true(found == heads)


def _unfolded(operand: Node, heads: Any, factors: list, per_head: bool = True) -> Node:
    """The (B, H, S, D) tensor that a (B * H, S, D) operand folds (``x.reshape(B * H, S, D)``), scalar factors on
    it collected."""
    if _is(operand, "view", "reshape", "_unsafe_view") and isinstance(operand.args[0], Node) \
            and _same_heads(_folded_heads(operand, operand.args[0]), heads):
        return _peel_factors(operand.args[0], factors, operand=True, per_head=per_head)
    raise NotServed(f"not attention as written: the (B * H, S, D) operand '{operand.name}' is not a (B, H, S, D) "
                    "tensor with its heads folded into the batch")


def _unfold_scores(found: dict[str, Any], heads: Any, bias_of: _BiasTerms, factors: list) -> None:
    """The (B, H, S, D) q and k of scores over operands with the heads folded; a term ``baddbmm`` adds (Bloom's
    ALiBi) as the position bias it is, read over the folded heads."""
    if found["key"] is None:
        raise NotServed("not attention as written: the scores' right operand, with the heads folded into the batch, "
                        "is not a transposed k times numbers")
    found["query"] = _unfolded(found["query"], heads, factors)
    found["key"] = _unfolded(found["key"], heads, factors, per_head=False)
    term = found["mask"]
    if term is None:
        return
    bias = bias_of(term, found["mask_reader"], folded=True)
    if bias is None:
        refused = f": {'; '.join(bias_of.refused)}" if bias_of.refused else ""
        raise NotServed(f"a mask that baddbmm adds to scores with the heads folded into the batch, which FA4 can't "
                        f"take as a mask per head{refused}")
    found["bias"], found["bias_term"], found["mask"] = bias, term, None


def _peel_baddbmm(node: Node, factors: list, found: dict[str, Any]) -> None:
    """``baddbmm(input, q, kᵀ, beta=b, alpha=a)`` = ``b * input + a * (q @ kᵀ)``: ``input`` ignored at b=0 (an
    ``empty`` tensor, diffusers' AttnProcessor), an additive mask at b=1; ``a`` is a factor of the scale."""
    beta, alpha = _scalar(_arg(node, 3, "beta", 1)), _scalar(_arg(node, 4, "alpha", 1))
    if isinstance(beta, Node):  # a float attribute under dynamic=True (Bloom's self.beta): decided, with a guard
        value = example_value(beta)
        beta = 0 if guard_or_false(value == 0) else 1 if guard_or_false(value == 1) else None
    if not isinstance(beta, (int, float)) or alpha is None:
        raise NoMatch("baddbmm with a computed beta or alpha")
    if beta not in (0, 1):
        raise NoMatch(f"baddbmm with beta={beta}: the scores are not q @ k^T plus a mask")
    factors.append(alpha)
    if beta == 1:
        found["mask"], found["mask_reader"] = node.args[0], node


def _peel_output(softmax: Node, heads: Any = None) -> tuple[Node, Node, float]:
    """Walk forward from the softmax to ``matmul(p, v)``: (output node, v, dropout p). With ``heads`` (scores over
    operands with the heads folded into the batch), the probabilities may be viewed between (B, H, S_q, S_kv) and
    (B * H, S_q, S_kv) on the way (Bloom folds them for ``bmm``, XGLM unfolds and folds them again)."""
    probs, dropout_p, dropped = softmax, 0.0, False
    node = _single_user(probs)
    while True:
        # Casts and copies keep the probabilities and their gradient (not detach: it would cut the gradient).
        if (_is(node, *_CASTS) and _is_float_cast(node)) or _is(node, *modeled_ops.COPIES):
            probs, node = node, _single_user(node)
        elif _is_identity_view(node):  # Falcon's attention_probs.view(B, H, S_q, S_kv)
            probs, node = node, _single_user(node)
        elif heads is not None and _is(node, "view", "reshape", "_unsafe_view") \
                and (_same_heads(_folded_heads(node, probs), heads) or _same_heads(_folded_heads(probs, node), heads)):
            probs, node = node, _single_user(node)
        elif _is(node, "dropout") and not dropped:
            p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
            if _scalar(p) is None or not isinstance(training, bool):
                raise NoMatch("dropout with a computed p or training flag")
            if isinstance(p, Node):
                p = guarded_value(p)  # a dynamic float attribute
            dropout_p, dropped = (float(p) if training else 0.0), True
            probs, node = node, _single_user(node)
        else:
            break
    einsum = _einsum(node)
    if einsum is not None and einsum[0] == "output" and einsum[1] is probs:
        return node, einsum[2], dropout_p
    if not (_is_matmul(node) and node.args[0] is probs):
        raise NoMatch("the probabilities do not feed p @ v")
    return node, node.args[1], dropout_p


def analyze(match: Match, context: RewriteContext) -> SiteDecision | None:
    """Decide a hand-written attention site anchored on ``match``'s softmax.

    Returns None for a softmax that is not over the last dim of a 4-D tensor, or of a 3-D one over ``q @ kᵀ``
    (``bmm`` over (B * H, S, D) operands): not an attention site at all.
    """
    softmax = match.output_node()
    dim = _arg(softmax, 1, "dim")
    shape = example_value(softmax).shape if isinstance(example_value(softmax), torch.Tensor) else ()
    if len(shape) not in (3, 4) or dim not in (-1, len(shape) - 1):
        return None
    scores_node, folded_softmax = softmax.args[0], None
    if len(shape) == 3 and _is(scores_node, "view", "reshape", "_unsafe_view") \
            and isinstance(scores_node.args[0], Node):
        # mBART: scores over folded heads viewed as (B, H, S, S) for the mask, folded again for the softmax
        folded_softmax = _folded_heads(scores_node, scores_node.args[0])
        if folded_softmax is not None:
            scores_node, shape = scores_node.args[0], example_value(scores_node.args[0]).shape
    bias_of = _BiasTerms(tuple(shape), context.mutations)
    try:
        scores = _peel_scores(scores_node, bias_of)
        if folded_softmax is not None and not _same_heads(scores["heads"], folded_softmax):
            raise NotServed("not attention as written: (B, H, S, S) scores folded into (B * H, S, S) for the softmax "
                            "are not q @ kᵀ of operands with the heads folded so")
    except NotServed as exc:
        return SiteDecision(softmax, str(exc), {})
    except NoMatch as exc:
        # A 3-D softmax is attention only over q @ kᵀ (bmm); others (routers, classifiers) are no site at all.
        return None if example_value(softmax).dim() == 3 else SiteDecision(softmax, f"not attention: {exc}", {})
    unmodeled = modeled_ops.unmodeled_argument(softmax)
    if unmodeled is not None:
        return SiteDecision(softmax, f"the attention uses {unmodeled}", {})
    folded = scores["heads"]
    try:
        output, value, dropout_p = _peel_output(softmax, folded)
        if folded is not None and example_value(output).dim() == 3:  # p @ v over the folded heads
            value = _unfolded(value, folded, [])
    except NotServed as exc:
        return SiteDecision(softmax, str(exc), {})
    except NoMatch as exc:
        return SiteDecision(softmax, f"not attention: {exc}", {})
    one_head = len(shape) == 3  # (B * H, S, D) operands (bmm): one head each, read as (B * H, 1, S, D)
    key = Operand(scores["key_transposed"], transposed=True, one_head=one_head) if scores["key"] is None \
        else Operand(scores["key"], one_head=one_head)  # kᵀ written some other way (permute, .mT): transposed back
    if one_head and scores["head_scales"]:
        return SiteDecision(softmax, "a per-head factor on (B * H, S, S) scores, which the pattern does not follow", {})
    query = Operand(scores["query"], one_head=one_head, head_scales=scores["head_scales"])
    value = Operand(value, one_head=one_head)
    decision = decide(
        output, context, query, key, value, dropout_p=dropout_p,
        scale=scores["scale"], enable_gqa=False, attn_mask=scores["mask"], softcap=scores["softcap"],
        mask_hides_where_true=scores["mask_hides_where_true"],
        mask_reader=None if isinstance(scores["mask"], AddedMasks) else scores.get("mask_reader"),
        replaced=(softmax.args[0], key.source, value.source, *filter(None, [scores.get("bias_term")])),
        position_bias=scores["bias"],
    )
    if decision.reason and bias_of.refused and isinstance(scores["mask"], AddedMasks):  # (one mask: decide says)
        return dataclasses.replace(decision, reason=f"{decision.reason}; as a bias: {'; '.join(bias_of.refused)}")
    return decision


class _BiasTerms:
    """Tells whether a term added to (B, H, S_q, S_kv) scores is a position bias FA4 adds
    (:func:`.bias_analysis.bias_in_mask`), keeping why a float term is not (for the site's reason, should the term
    not be a mask either)."""

    def __init__(self, shape: tuple, mutations):
        self.shape, self.mutations, self.refused = shape, mutations, []

    def __call__(self, term: Node, reader: Node, folded: bool = False) -> PositionBias | None:
        """The position bias ``term`` is (over (B * H, S_q, S_kv), the heads folded, with ``folded``), else None."""
        value = example_value(term)
        if len(self.shape) != 4 or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return None
        try:
            carried = bias_analysis.bias_in_mask(term, self.shape, reader=reader, mutations=self.mutations,
                                                 folded=folded)
        except mask_analysis.IsAMask:
            return None
        except mask_analysis.NotAnalyzable as exc:
            self.refused.append(str(exc))
            return None
        # A mask that carries a bias is the site's mask: decide() takes the bias out and analyzes the rest.
        return carried.bias if carried is not None and carried.mask is None else None


def rewrite(match: Match, decision: SiteDecision) -> None:
    """Replace ``matmul(p, v)`` by an FA4 call; the score chain dies with it."""
    if example_value(decision.node).dim() == 4:
        replace_with_fa4(decision, decision.node)
        return
    # (B * H, 1, S, D): the one head squeezed back out; (B, H, S, D) of operands with their heads folded: folded back
    out, _ = emit_fa4(decision, decision.node)
    with decision.node.graph.inserting_before(decision.node):
        out = call_with_meta(decision.node.graph, torch.squeeze, (out, 1)) if decision.operands.query.one_head \
            else call_with_meta(decision.node.graph, torch.flatten, (out, 0, 1))
    replace_output(decision, decision.node, out)


register(AttentionPattern(
    name="eager_attention",
    matches="softmax(matmul(q, k^T) * scale [softcap] [+ mask], dim=-1) [.to] [dropout p=0] @ v",
    emits="fa4.flash_attn_fwd (+ fa4.flash_attn_bwd via autograd)",
    pattern=(CallFunctionVarArgs(SOFTMAX), CallMethodVarArgs("softmax")),
    analyze=analyze,
    rewrite=rewrite,
))
