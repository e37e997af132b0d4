"""Differential fuzz: random attention programs compiled with the plugin against eager PyTorch (CPU reference).

Every program must give eager's output and gradients (one scale across q, k and v, so a gradient that should
be zero is not judged alone), rewritten or not; at least 95 % of the programs FA4 can express must be
rewritten. The rewrite runs as in Inductor's pre-grad hook on each Dynamo graph; the rewritten graph then runs
eagerly (the ops' CPU reference, autograd through the op), which keeps a few hundred programs within CI's
time; every 25th program goes through Inductor itself. FlexAttention programs (the same masks as mask_mods,
with identity/scale/softcap/bias score_mods) are judged against FlexAttention's dense definition.
"""

import collections
import logging

import pytest
import torch

import fa4_inductor

from tests.compare import EXCEPTION_TEXT, assert_matches_eager, rewriting_backend
from tests.compile.fuzz_programs import random_programs

log = logging.getLogger(__name__)
pytestmark = pytest.mark.usefixtures("no_compile_cache")  # every program compiled afresh

PROGRAMS = 240
FLEX_PROGRAMS = 40


def _run(program, backend):
    inputs, extra = program.inputs()
    torch._dynamo.reset()
    compiled = torch.compile(program.function(), backend=backend, dynamic=program.dynamic, fullgraph=True)
    assert_matches_eager(program.reference(), compiled, inputs, extra, grad_atol=3e-2, seed=program.seed,
                         label=str(program))


def test_random_programs_match_eager_and_expressible_ones_run_fa4():
    _fuzz(random_programs(PROGRAMS), through_inductor_every=25)


def test_random_flex_programs_match_their_definition_and_expressible_ones_run_fa4(monkeypatch):
    """FlexAttention programs, rewritten graphs run eagerly (FlexAttention's CPU kernels have no backward; its
    device check is lifted for tracing, the graph then runs its math implementation where a site stays)."""
    from torch.nn.attention import flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    _fuzz(random_programs(FLEX_PROGRAMS, seed=1, spellings=("flex",)), through_inductor_every=None)


def _fuzz(programs, through_inductor_every: int | None):
    rewritten, expressible, misses = 0, 0, collections.Counter()
    for index, program in enumerate(programs):
        records: list = []
        fa4_inductor.stats.reset()
        if through_inductor_every and index % through_inductor_every == 0:
            with fa4_inductor.enabled(eager=False, devices=("cpu",)):
                _run(program, "inductor")
            records = fa4_inductor.stats.site_records()
        else:
            _run(program, rewriting_backend(records))
        assert records, f"an attention left with no site record: {program}"
        assert not [r.reason for r in records if EXCEPTION_TEXT.search(r.reason or "")], program
        # A site whose mask is data ran FA4 only where the run-time verdict said so. That verdict reads every entry,
        # so it may serve a program whose structure FA4 can't express but whose values it can (a query padding that
        # pads no row past the first leaves the diagonal): only the compile-time rewrites must be expressible.
        rewrote = any(r.decision == "fa4" and r.features.get("mask") != "data, checked at run time" for r in records)
        ran_fa4 = rewrote or fa4_inductor.stats.counters["data_mask.fa4"] > 0
        assert program.expressible or not rewrote, f"rewrote what FA4 can't express: {program}"
        if program.expressible:
            expressible += 1
            rewritten += ran_fa4
            if not ran_fa4:
                misses[(program.spelling, program.band, program.extra, [r.reason for r in records][:1][0]
                        if records else "no site record")] += 1
    rate = rewritten / expressible
    log.warning("fuzz: %d programs, %d FA4-expressible, %d rewritten (%.1f%%); misses: %s",
                len(programs), expressible, rewritten, 100 * rate, dict(misses))
    assert rate >= 0.95, (rate, misses)
