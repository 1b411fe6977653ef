"""Every public module's docstring examples run (Google-style 'Example:' sections)."""

import doctest
import importlib

import pytest

MODULES = [
    "ellsjax", "ellsjax.schedules", "ellsjax.kernel", "ellsjax.machines", "ellsjax.machines.patch",
    "ellsjax.machines.ideal", "ellsjax.samplers", "ellsjax.samplers._ddim", "ellsjax.plotting", "ellsjax.data",
    "ellsjax.edm", "ellsjax.machines.pspc", "ellsjax.machines.wiener", "ellsjax.machines.pca", "ellsjax.machines.cfdm",
    "ellsjax.samplers._edm", "ellsjax.samplers._ddpm", "ellsjax.samplers._diffrax",
    "ellsjax.nets", "ellsjax.training", "ellsjax.models",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
