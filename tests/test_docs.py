"""Every public module's docstring examples run (Google-style 'Example:' sections)."""

import doctest
import importlib

import pytest

MODULES = [
    "ellsjax", "ellsjax.schedules", "ellsjax.kernel", "ellsjax.machines", "ellsjax.machines.patch",
    "ellsjax.machines.ideal", "ellsjax.samplers", "ellsjax.samplers._ddim", "ellsjax.plotting", "ellsjax.data",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
