"""Every module's docstring examples run (Google-style 'Example:' sections)."""

import doctest
import importlib
import pkgutil

import pytest

import ellsjax

# Every module of the package, found rather than listed, so a new module's examples are run too
# (``__main__`` would run the command line on import).
MODULES = sorted(m.name for m in pkgutil.walk_packages(ellsjax.__path__, "ellsjax.") if m.name != "ellsjax.__main__")


def test_the_package_is_discovered():
    assert {"ellsjax.kernel", "ellsjax.machines.patch", "ellsjax.samplers._ddim", "ellsjax.cli._sample"} <= set(MODULES)


@pytest.mark.parametrize("name", ["ellsjax", *MODULES])
def test_docstring_examples_run(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
