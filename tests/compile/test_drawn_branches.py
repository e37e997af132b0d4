"""Branches on a uniform draw that its range decides (LayerDrop at 0): one graph with the plugin, the program's own
branch taken, stock Dynamo's graph break back once the plugin is disabled."""

import pytest
import torch

import fa4_inductor
from fa4_inductor import stats


def _compile_counting_graphs(fn):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return torch.compile(fn, backend=backend), graphs


def _layer(comparison):
    def fn(x):
        x = x * 3
        if comparison(torch.rand([])):
            return x - 1  # the layer skipped (an op of its own: a graph after a break is never empty)
        return torch.sin(x) + 1
    return fn


SKIPPED, KEPT = "skipped", "kept"
# (comparison of the draw r, what every draw in [0, 1] makes the program do; None: it depends on the draw)
CASES = {
    "r < 0.0": (lambda r: r < 0.0, KEPT),
    "r < 0 (int)": (lambda r: r < 0, KEPT),
    "r <= -0.5": (lambda r: r <= -0.5, KEPT),
    "0.0 > r": (lambda r: 0.0 > r, KEPT),
    "torch.lt(r, 0.0)": (lambda r: torch.lt(r, 0.0), KEPT),
    "r.lt(0.0)": (lambda r: r.lt(0.0), KEPT),
    "r >= 1.5": (lambda r: r >= 1.5, KEPT),
    "r < 1.5": (lambda r: r < 1.5, SKIPPED),
    "r >= 0.0": (lambda r: r >= 0.0, SKIPPED),
    "r < 0.5": (lambda r: r < 0.5, None),
    "r > 0.0": (lambda r: r > 0.0, None),  # rand can draw 0
    "r < 1.0": (lambda r: r < 1.0, None),  # 1 stands for a draw rounded up in a narrow dtype
    "r == 0.0": (lambda r: r == 0.0, None),
}


@pytest.mark.parametrize("case", CASES)
def test_branch_on_a_draw_is_taken_only_where_every_draw_decides_it(case):
    comparison, outcome = CASES[case]
    fn = _layer(comparison)
    x = torch.randn(8)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled, graphs = _compile_counting_graphs(fn)
        got = compiled(x)
    decided = stats.counters["compile.drawn_branches_decided"]
    if outcome is None:
        assert decided == 0 and len(graphs) > 1  # Dynamo's own graph break
        return
    assert decided == 1 and len(graphs) == 1
    want = x * 3 - 1 if outcome == SKIPPED else torch.sin(x * 3) + 1
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("draw", ["randn", "mutated", "tensor bound", "rand_like"])
def test_draws_that_are_not_a_plain_uniform_draw_compared_with_a_number_are_left_to_dynamo(draw):
    def fn(x):
        if draw == "randn":
            r = torch.randn([])
        elif draw == "rand_like":
            r = torch.rand_like(x[:1])
        else:
            r = torch.rand([])
        if draw == "mutated":
            r.sub_(1.0)  # the program moved the draw out of [0, 1]
        bound = torch.zeros(()) if draw == "tensor bound" else 0.0
        if r < bound:
            return x - 1
        return x + 1

    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        compiled, graphs = _compile_counting_graphs(fn)
        got = compiled(torch.randn(8))
    if draw == "rand_like":  # a uniform draw too: decided
        assert stats.counters["compile.drawn_branches_decided"] == 1 and len(graphs) == 1
    else:
        assert stats.counters["compile.drawn_branches_decided"] == 0 and len(graphs) > 1
    assert got.shape == (8,)


def test_disabling_gives_dynamo_its_own_branch_handling_back():
    fn = _layer(lambda r: r < 0.0)
    with fa4_inductor.enabled(eager=False, devices=("cpu",)):
        with fa4_inductor.enabled(eager=False, devices=("cuda", "cpu")):  # another setting, then the first again
            pass
        compiled, graphs = _compile_counting_graphs(fn)
        compiled(torch.randn(8))
        assert len(graphs) == 1
    torch._dynamo.reset()
    compiled, graphs = _compile_counting_graphs(fn)
    compiled(torch.randn(8))
    assert len(graphs) > 1
