"""Shared fixtures: a clean plugin state and fresh Dynamo caches per test."""

import pathlib
import sys

import pytest
import torch

import fa4_inductor
from fa4_inductor import stats

# The repository root, so tests can import the example models (``examples.*``).
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The development loop (``pytest -m quick``, a few minutes on 2 cores): the layer rules, the decisions, the mask
# analysis with its near misses and the spellings, the ops' contract and the support table.
QUICK = {"tests/test_architecture.py", "tests/compile/test_decisions.py", "tests/compile/test_near_miss.py",
         "tests/compile/test_masks_and_idioms.py", "tests/compile/test_spellings.py", "tests/runtime/test_ops.py",
         "tests/inspect/test_support_table.py", "tests/test_docs.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.resolve().relative_to(ROOT).as_posix() in QUICK:
            item.add_marker(pytest.mark.quick)


@pytest.fixture(autouse=True)
def clean_state():
    fa4_inductor.disable()
    stats.reset()
    torch._dynamo.reset()
    yield
    fa4_inductor.disable()


@pytest.fixture
def no_compile_cache():
    """Compile for real: no graph from Inductor's caches, each test's rewrite runs on the code under test."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
