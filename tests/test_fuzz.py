"""Differential fuzz: random attention programs compiled with the plugin against eager PyTorch (CPU reference).

Every program must give eager's output and gradients (one scale across q, k and v, so a gradient that should
be zero is not judged alone), rewritten or not; at least 95 % of the programs FA4 can express must be
rewritten. The rewrite runs as in Inductor's pre-grad hook on each Dynamo graph; the rewritten graph then runs
eagerly (the ops' CPU reference, autograd through the op), which keeps a few hundred programs within CI's
time; every 25th program goes through Inductor itself.
"""

import collections
import logging

import pytest
import torch

import fa4_inductor
from fa4_inductor.pattern_registry import RewriteContext, rewrite_graph

from tests.compare import assert_matches_eager
from tests.fuzz_programs import random_programs

log = logging.getLogger(__name__)
pytestmark = pytest.mark.usefixtures("no_compile_cache")  # Inductor runs the rewrite on cache misses only

PROGRAMS = 240


def _rewriting_backend(records: list):
    def backend(gm: torch.fx.GraphModule, example_inputs):
        records.extend(rewrite_graph(gm.graph, RewriteContext(devices=("cpu",), publish=False)))
        gm.recompile()
        return gm
    return backend


def _run(program, backend):
    inputs, extra = program.inputs()
    fn = program.function()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, dynamic=program.dynamic, fullgraph=True)
    assert_matches_eager(fn, compiled, inputs, extra, grad_atol=3e-2, seed=program.seed, label=str(program))


def test_random_programs_match_eager_and_expressible_ones_run_fa4():
    rewritten, expressible, misses = 0, 0, collections.Counter()
    for index, program in enumerate(random_programs(PROGRAMS)):
        records: list = []
        if index % 25 == 0:
            with fa4_inductor.enabled(eager=False, devices=("cpu",)):
                _run(program, "inductor")
            records = fa4_inductor.stats.site_records()
            fa4_inductor.stats.reset()
        else:
            _run(program, _rewriting_backend(records))
        ran_fa4 = any(r.decision == "fa4" for r in records)
        assert program.expressible or not ran_fa4, f"rewrote what FA4 can't express: {program}"
        if program.expressible:
            expressible += 1
            rewritten += ran_fa4
            if not ran_fa4:
                misses[(program.spelling, program.band, program.extra, [r.reason for r in records][:1][0]
                        if records else "no site record")] += 1
    rate = rewritten / expressible
    log.warning("fuzz: %d programs, %d FA4-expressible, %d rewritten (%.1f%%); misses: %s",
                PROGRAMS, expressible, rewritten, 100 * rate, dict(misses))
    assert rate >= 0.95, (rate, misses)
