"""Which public name is documented on which API page (shared by the docs build, its generator and the tests).

A *public module* is a module of the package whose dotted path has no ``_``-prefixed part. Every name in a
public module's ``__all__`` has one *home* page where autodoc documents it; other modules that list it
re-export it and link to the home. Documenting an object once keeps Sphinx's cross-references unambiguous.

The home of a function or class is the public module it is defined in (a private submodule's objects belong to
the public package above it), when that module lists it; of a constant, the module that assigns it at top level;
otherwise the first module listing it. ``python docs/_ext/apipages.py`` (re)writes a page per module under
``docs/api/`` that does not exist yet and the index (``--force``: every page, keeping hand-written descriptions);
``tests/test_api_docs.py`` checks the committed pages against this.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import re
import sys
import types
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]


def public_modules() -> list[str]:
    import ellsjax

    names = ["ellsjax"]
    for m in pkgutil.walk_packages(ellsjax.__path__, "ellsjax."):
        if not any(part.startswith("_") for part in m.name.split(".")[1:]):
            names.append(m.name)
    return sorted(names)


def page_of(module: str) -> str:
    """``docs/api/<module>.rst`` relative to docs/, without the suffix."""
    return f"api/{module}"


def _public_owner(modname: str) -> str:
    parts = modname.split(".")
    while any(p.startswith("_") for p in parts[1:]):
        parts = parts[:-1]
    return ".".join(parts)


@functools.cache
def _source(module: str) -> tuple[ast.Module, list[str]] | None:
    """A module's parsed source and its lines (None without a source file)."""
    try:
        source = Path(inspect.getsourcefile(importlib.import_module(module))).read_text()
    except (TypeError, OSError):
        return None
    return ast.parse(source), source.splitlines()


def _assigned_at_top(module: str, name: str) -> bool:
    if (parsed := _source(module)) is None:
        return False
    for node in parsed[0].body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def doc_comment(module: str, name: str) -> list[str]:
    """The ``#:`` comment lines above ``name``'s top-level assignment in ``module``'s source (Sphinx's form for
    documenting a constant), or a string statement right after it; [] if none."""
    if (parsed := _source(module)) is None:
        return []
    tree, lines = parsed
    for i, node in enumerate(tree.body):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        doc, j = [], node.lineno - 2
        while j >= 0 and lines[j].lstrip().startswith("#:"):
            text = lines[j].lstrip()[2:].rstrip()
            doc.insert(0, text[1:] if text.startswith(" ") else text)  # keeps a continuation line's indent
            j -= 1
        after = tree.body[i + 1] if i + 1 < len(tree.body) else None
        if not doc and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            doc = inspect.cleandoc(after.value.value).splitlines()
        return doc
    return []


def data_doc(module: str, name: str) -> list[str]:
    """A constant's documentation: its doc comment where ``module`` assigns it, else where any module of the
    package (private ones included) assigns the same object under that name."""
    import ellsjax

    doc = doc_comment(module, name)
    if doc:
        return doc
    obj = getattr(importlib.import_module(module), name)
    for m in pkgutil.walk_packages(ellsjax.__path__, "ellsjax."):
        if m.name.endswith("__main__"):
            continue
        mod = importlib.import_module(m.name)
        if getattr(mod, name, None) is obj and (doc := doc_comment(m.name, name)):
            return doc
    return []


def kind(obj) -> str:
    """The autodoc directive for an object: module, class, exception, function or data."""
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return "data"


def homes() -> dict[tuple[str, str], str]:
    """``(module, name) -> home module`` for every name of every public module's ``__all__``."""
    mods = public_modules()
    listing = {m: list(getattr(importlib.import_module(m), "__all__", [])) for m in mods}
    out = {}
    for m in mods:
        for n in listing[m]:
            obj = getattr(importlib.import_module(m), n)
            k = kind(obj)
            home = None
            if k == "module":
                home = obj.__name__
            elif k in ("class", "exception", "function") and getattr(obj, "__module__", "").startswith("ellsjax"):
                owner = _public_owner(obj.__module__)
                if n in listing.get(owner, []) and getattr(importlib.import_module(owner), n) is obj:
                    home = owner
            if home is None:
                same = [o for o in mods if n in listing[o] and getattr(importlib.import_module(o), n) is obj]
                defining = [o for o in same if _assigned_at_top(o, n)]
                home = (defining or same)[0]
            out[m, n] = home
    return out


def render(module: str, table: dict[tuple[str, str], str], bodies: dict[str, list[str]] | None = None) -> str:
    """A page for ``module``: its docstring, its own names (autodoc), then the names it re-exports (links).

    ``bodies``: text written under a directive on the page by hand (a constant's description), kept.
    """
    bodies = bodies or {}
    mod = importlib.import_module(module)
    title = module
    lines = [title, "=" * len(title), "", f".. automodule:: {module}", "   :no-members:", ""]
    own, reexported = [], []
    for n in getattr(mod, "__all__", []):
        home = table[module, n]
        (own if home == module and kind(getattr(mod, n)) != "module" else reexported).append(n)
    for n in own:
        k = kind(getattr(mod, n))
        lines += [f".. auto{k}:: {module}.{n}"]
        if k in ("class", "exception"):
            lines += ["   :members:"]
        if k == "data":
            lines += ["   :no-value:"]
        if bodies.get(f"{module}.{n}"):
            lines += [""] + ["   " + b for b in bodies[f"{module}.{n}"]]
        lines += [""]
    if reexported:
        lines += [".. rubric:: Also here", "", "Names this module re-exports, documented on their own page:", ""]
        for n in reexported:
            obj = getattr(mod, n)
            home = table[module, n]
            target = obj.__name__ if kind(obj) == "module" else f"{home}.{n}"
            role = {"module": "mod", "class": "class", "exception": "exc", "function": "func"}.get(kind(obj), "data")
            lines += [f"- ``{n}``: :{role}:`{target}`"]
        lines += [""]
    return "\n".join(lines)


def _bodies(page: str) -> dict[str, list[str]]:
    """The hand-written text under each directive of an existing page (not its options)."""
    out = {}
    for m in re.finditer(r"^\.\. auto\w+:: (\S+)\n((?:[ \t]+.*\n|\n)*)", page, re.M):
        body = [ln[3:] for ln in m.group(2).splitlines() if ln.strip() and not ln.strip().startswith(":")]
        if body:
            out[m.group(1)] = body
    return out


def index(modules: list[str]) -> str:
    """``docs/api/index.rst``: every public module, the machine families in a second list."""
    top = [m for m in modules if not m.startswith("ellsjax.machines.")]
    families = [m for m in modules if m.startswith("ellsjax.machines.")]
    return "\n".join([
        "API reference", "=============", "",
        "One page per public module. Each name of a module's ``__all__`` is documented once, on the page of the module",
        "that defines it; a module that re-exports it links there (``tests/test_api_docs.py`` checks both).", "",
        ".. toctree::", "   :maxdepth: 1", "", *(f"   {m}" for m in top), "",
        "The machine families, one module each (their builders and classes are re-exported by :mod:`ellsjax.machines`):",
        "", ".. toctree::", "   :maxdepth: 1", "", *(f"   {m}" for m in families), ""])


def main(argv: list[str]) -> int:
    """Write ``docs/api/index.rst`` and the page of every public module that has none; ``--force`` rewrites
    every page from the modules' ``__all__`` (keeping hand-written descriptions under the directives)."""
    sys.path.insert(0, str(DOCS.parent))
    table = homes()
    modules = public_modules()
    (DOCS / "api" / "index.rst").write_text(index(modules))
    for module in modules:
        path = DOCS / (page_of(module) + ".rst")
        if path.exists() and "--force" not in argv:
            continue
        bodies = _bodies(path.read_text()) if path.exists() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(module, table, bodies))
        print("wrote", path.relative_to(DOCS.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
