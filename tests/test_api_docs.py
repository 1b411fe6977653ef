"""The API pages (docs/api/*.rst) document every public name, once, and nothing else (no Sphinx build here).

A public module is a module of the package without a ``_``-prefixed part; each name of its ``__all__`` has one
home page where autodoc documents it, and every other module listing it links there
(``docs/_ext/apipages.py`` decides the home; ``python docs/_ext/apipages.py`` writes the page of a new module).
Every documented function and class has its own docstring, every constant a ``#:`` comment or a description
on its page.
"""

import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
apipages = importlib.import_module("apipages")

DIRECTIVE = re.compile(r"^\.\. auto(module|class|exception|function|data):: (\S+)\n((?:[ \t]+.*\n|\n)*)", re.M)
LINK = re.compile(r"^- ``(\w+)``: :(?:mod|class|exc|func|data):`([\w.]+)`", re.M)


@pytest.fixture(scope="module")
def homes():
    return apipages.homes()


def _page(module: str) -> str:
    path = API / f"{module}.rst"
    assert path.exists(), f"{module}: no API page {path.relative_to(ROOT)} (run python docs/_ext/apipages.py)"
    return path.read_text()


def test_every_public_module_has_a_page_and_the_index_lists_it():
    modules = apipages.public_modules()
    assert {"ellsjax", "ellsjax.machines", "ellsjax.kernel", "ellsjax.samplers", "ellsjax.plan"} <= set(modules)
    index = (API / "index.rst").read_text()
    listed = set(re.findall(r"^   (ellsjax[\w.]*)$", index, re.M))
    assert listed == set(modules), (set(modules) - listed, listed - set(modules))
    pages = {p.stem for p in API.glob("ellsjax*.rst")}
    assert pages == set(modules), (set(modules) - pages, pages - set(modules))


@pytest.mark.parametrize("module", apipages.public_modules())
def test_every_name_of_the_module_is_documented_once(module, homes):
    text = _page(module)
    documented = {m.group(2): (m.group(1), m.group(3)) for m in DIRECTIVE.finditer(text)}
    linked = dict(LINK.findall(text))
    assert documented.pop(module, ("module",))[0] == "module", f"{module}: its page has no automodule"
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", []):
        home = homes[module, name]
        obj = getattr(mod, name)
        if home == module and apipages.kind(obj) != "module":
            kind, body = documented.pop(f"{module}.{name}", (None, ""))
            assert kind == apipages.kind(obj), f"{module}.{name}: not documented on its page (auto{kind})"
            if kind == "data":
                assert apipages.data_doc(module, name) or body.strip(), f"{module}.{name}: a constant without a description"
            else:
                doc = inspect.getdoc(obj)
                inherited = inspect.isclass(obj) and any(doc == inspect.getdoc(b) for b in obj.__mro__[1:])
                assert doc and not inherited, f"{module}.{name}: no docstring of its own"
        else:
            target = linked.pop(name, None)
            expected = obj.__name__ if apipages.kind(obj) == "module" else f"{home}.{name}"
            assert target == expected, f"{module}.{name}: re-exported from {home}, not linked there (got {target})"
    assert not documented, f"{module}: documents names not in its __all__: {sorted(documented)}"
    assert not linked, f"{module}: links names not in its __all__: {sorted(linked)}"
