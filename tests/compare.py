"""Checks shared by the rewrite tests: a compiled program gives eager's output and gradients; reasons read as
written for users."""

import re

import torch

from fa4_inductor.compile.sites import RewriteContext

from fa4_inductor.compile.rewrite import rewrite_graph

# What a Python exception's message looks like, as opposed to a reason written for users.
EXCEPTION_TEXT = re.compile(r"\b\w*(Error|Exception)\b|unsupported operand|has no attribute|not subscriptable|"
                            r"positional argument|object is not|Traceback|StrictGreaterThan|'Not'")


def assert_matches_eager(fn, compiled, inputs, extra=(), *, grad_atol=2e-2, seed=2, label="") -> torch.Tensor:
    """Run ``fn`` eagerly and ``compiled`` on ``inputs`` (leaves) and ``extra``; assert the outputs match and the
    gradients of a random projection match on one scale across the inputs (a gradient that should be zero is not
    judged alone). Returns the compiled output."""
    want = fn(*inputs, *extra)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed)).to(want.dtype)
    want_grads = torch.autograd.grad((want.float() * weights).sum(), inputs)
    got = compiled(*inputs, *extra)
    got_grads = torch.autograd.grad((got.float() * weights).sum(), inputs)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2, msg=lambda m: f"{label}: {m}")
    scale = max(g.abs().max() for g in want_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g / scale, w / scale, atol=grad_atol, rtol=0, msg=lambda m: f"{label}: {m}")
    return got


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` in the Frobenius norm."""
    return ((got - want).norm() / want.norm().clamp_min(1e-6)).item()


def assert_parameter_grads_close(got_grads: dict, want_grads: dict, tol: float = 5e-2) -> None:
    """Each parameter's gradient within ``tol`` (relative) of eager's; parameters only the compiled run has a
    gradient for (unused outputs, such as BERT's pooler) must have zero gradients."""
    extra = got_grads.keys() - want_grads.keys()
    assert want_grads.keys() <= got_grads.keys() and all(got_grads[k].count_nonzero() == 0 for k in extra)
    for key, want in want_grads.items():
        if want.norm() < 1e-5:
            continue  # zero in exact math (a key bias under softmax): only rounding noise is left
        assert relative_error(got_grads[key], want) < tol, key


def rewriting_backend(records: list):
    """A torch.compile backend that applies the plugin's rewrite to each Dynamo graph (as Inductor's pre-grad hook
    does) and runs the result eagerly (the ops' CPU reference), appending the site records to ``records``."""
    def backend(gm: torch.fx.GraphModule, example_inputs):
        records.extend(rewrite_graph(gm.graph, RewriteContext(devices=("cpu",), publish=False)))
        gm.recompile()
        return gm
    return backend


def _errors(result, exact) -> dict:
    """Relative error of the logits and of each gradient that is not zero in exact math, against ``exact``."""
    pairs = [("logits", result[0], exact[0]), *((key, result[1][key], truth) for key, truth in exact[1].items())]
    return {key: relative_error(value, truth) for key, value, truth in pairs if truth.norm() >= 1e-5}


def assert_as_exact_as_stock(got, eager, stock, exact, *, factor: float = 1.25, margin: float = 1e-2):
    """Every output and gradient of the compiled bf16 model (``got``: the outputs and a dict of parameter gradients)
    as close to the float32 model's (``exact``) as bf16 eager's or, where Inductor's own rounding moves it
    (``stock()``, compiled without the plugin), stock's: within ``factor`` times that error plus ``margin``."""
    got_errors, eager_errors = _errors(got, exact), _errors(eager, exact)
    worse = [key for key in got_errors if got_errors[key] > factor * eager_errors[key] + margin]
    if worse:
        stock_errors = _errors(stock(), exact)
        worse = [key for key in worse
                 if got_errors[key] > factor * max(eager_errors[key], stock_errors[key]) + margin]
    assert not worse, {key: (got_errors[key], eager_errors[key]) for key in worse}


def band(seqlen_q: int, seqlen_k: int, *, causal: bool = False, window=(-1, -1)) -> torch.Tensor:
    """The (S_q, S_k) keys a causal or windowed query sees, bottom-right aligned as FA4 aligns them (-1: unbounded)."""
    i = torch.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k)[None, :]
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    right = 0 if causal else window[1]
    if window[0] >= 0:
        keep &= j >= i - window[0]
    if right >= 0:
        keep &= j <= i + right
    return keep


def masked_scores(q, k, *, scale, keep, softcap=0.0):
    """Scaled (and softcapped) scores of head-major q (..., H, S_q, D) against k (..., H_kv, S_k, D), k's heads
    repeated for GQA, -inf where ``keep`` is False."""
    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    return scores.masked_fill(~keep, float("-inf"))


def packed_attention_reference(q, k, v, cu_q, cu_k, *, scale, causal=False, window=(-1, -1), softcap=0.0, used=None):
    """Attention on packed (tokens, H, D) sequences, each through an explicit mask, bottom-right aligned as FA4
    aligns them, in the inputs' dtype (float64 makes it the independent yardstick); ``used`` limits each sequence's
    keys."""
    outs = []
    for b in range(len(cu_q) - 1):
        rows = slice(cu_q[b], cu_q[b + 1])
        end = cu_k[b + 1] if used is None else cu_k[b] + used[b]
        qs, ks, vs = q[rows].transpose(0, 1), k[cu_k[b]:end].transpose(0, 1), v[cu_k[b]:end].transpose(0, 1)
        keep = band(qs.shape[1], ks.shape[1], causal=causal, window=window)
        s = masked_scores(qs, ks, scale=scale, keep=keep, softcap=softcap)
        p = torch.where(keep.any(-1, keepdim=True), torch.softmax(s, -1), 0.0)
        outs.append((p.nan_to_num() @ vs.repeat_interleave(qs.shape[0] // vs.shape[0], 0)).transpose(0, 1))
    return torch.cat(outs)
