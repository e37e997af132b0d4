"""Shared fixtures: a clean plugin state and fresh Dynamo caches per test."""

import pathlib
import sys

import pytest
import torch

import fa4_inductor
from fa4_inductor import stats

# The repository root, so tests can import the example models (``examples.*``).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


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
