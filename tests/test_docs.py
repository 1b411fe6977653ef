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


# -- the Python blocks of the README and the docs' pages ---------------------------------------------
# Each block says on its first line whether it runs and how long it takes:
#   "# runs as written (the tests run it): about N s"  runs here, in order with the file's earlier such blocks;
#   "# runs as written …: about N s"                   runs as written, too slow for this suite;
#   "# continues the … block (names): …"               continues an earlier block (these names come from it);
#   "# needs: …"                                       needs what it names (data, a run, a GPU, names of yours).
# Every name a block uses must be defined by it, by an earlier block of its file, or be named on its first
# line: a block that uses a name nobody defines (the calibration block's `noise` once) fails here.
# ELLSJAX_RUN_DOCS=1 also runs the slow blocks that need nothing else (minutes of CPU).

import os  # noqa: E402
import re  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "docs" / "getting-started.md",
             *sorted((ROOT / "docs" / "guides").glob("*.md")), *sorted((ROOT / "docs" / "design").glob("*.md"))]
FAST = "(the tests run it)"


def _blocks(path: Path) -> list[str]:
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", path.read_text(), flags=re.S | re.M)
    return [textwrap.dedent(code) for _, code in blocks]


def _free_names(code: str) -> tuple[set[str], set[str]]:
    """``(used, defined)`` names at a block's top level (imports, assignments, for targets, defs)."""
    import ast

    tree = ast.parse(code)
    used, defined = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (defined if isinstance(node.ctx, ast.Store) else used).add(node.id)
        elif isinstance(node, ast.alias):
            defined.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return used, defined


def test_the_readme_and_guides_have_fast_blocks():
    fast = {p.name for p in DOC_FILES for code in _blocks(p) if FAST in code.splitlines()[0]}
    assert {"README.md", "data.md", "machines.md", "samplers.md", "scaling.md"} <= fast, fast


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_blocks_say_what_they_need_and_define_what_they_use(path):
    import builtins

    known = set(dir(builtins))
    for i, code in enumerate(_blocks(path)):
        first = code.splitlines()[0]
        assert first.startswith(("# runs as written", "# continues", "# needs:")), (path.name, i, first)
        # how long (or where it runs): "about 50 s", "12 min", "hours", or the test that runs it
        assert re.search(r"\d\s*(s|min|h)\b|\b(seconds|minutes|hours)\b|tests/", first), (path.name, i, first)
        used, defined = _free_names(code)
        named = set(re.split(r"[\s,()]+", first)) if first.startswith(("# needs:", "# continues")) else set()
        missing = sorted(used - defined - known - named)
        assert not missing, f"{path.name} block {i} ({first!r}) uses {missing}, defined by no earlier block"
        known |= defined


@pytest.mark.parametrize("path", [p for p in DOC_FILES if any(FAST in c.splitlines()[0] for c in _blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_fast_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    ns: dict = {"__name__": "__docs__"}
    for i, code in enumerate(_blocks(path)):
        if FAST in code.splitlines()[0]:
            exec(compile(code, f"{path.name} block {i}", "exec"), ns)  # noqa: S102


@pytest.mark.skipif(not os.environ.get("ELLSJAX_RUN_DOCS"),
                    reason="minutes of CPU: set ELLSJAX_RUN_DOCS=1 to run the slow runnable blocks too")
def test_all_runnable_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in DOC_FILES:
        ns: dict = {"__name__": "__docs__"}
        for i, code in enumerate(_blocks(path)):
            if code.startswith("# runs as written") or code.startswith("# continues") and "guide's" not in code[:80]:
                exec(compile(code, f"{path.name} block {i}", "exec"), ns)  # noqa: S102
