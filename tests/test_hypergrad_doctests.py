"""The examples in the engine's docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "hypergrad.aid",
    "hypergrad.contraction",
    "hypergrad.fixed_point_solvers",
    "hypergrad.graphed",
    "hypergrad.implicit",
    "hypergrad.itd",
    "hypergrad.linear_solvers.cg",
    "hypergrad.linear_solvers.neumann",
    "hypergrad.maps",
    "hypergrad.modules",
    "hypergrad.optim",
    "hypergrad.pytree",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
