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


# -- the README's Python blocks -------------------------------------------------------------------------
# Each block either runs as written on the bundled data, saying how long on its first line
# ("# runs as written …" or "# continues the … block …: about N s"), or says what it needs and how long
# ("# needs: …"). Every name a block uses must be defined by it, by an earlier block, or be named in its
# "needs" line: a block that uses a name nobody defines (the calibration block's `noise` once) fails here.
# Running them costs minutes of CPU (the Use block about 20 CPU-s, explain about 3 CPU-min), more than
# this suite's budget: ELLSJAX_RUN_README=1 runs the blocks that need nothing else, in order.


def _readme_blocks():
    import re
    import textwrap
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
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


def test_readme_blocks_say_what_they_need_and_define_what_they_use():
    import builtins
    import re

    blocks = _readme_blocks()
    assert len(blocks) >= 6
    known = set(dir(builtins))
    for i, code in enumerate(blocks):
        first = code.splitlines()[0]
        assert first.startswith(("# runs as written", "# continues", "# needs:")), (i, first)
        # how long (or where it runs): "about 50 s", "12 min", "hours", or the test that runs it
        assert re.search(r"\d\s*(s|min|h)\b|\b(seconds|minutes|hours)\b|tests/", first), (i, first)
        used, defined = _free_names(code)
        needs = set(first.replace(",", " ").split()) if first.startswith("# needs:") else set()
        missing = sorted(used - defined - known - needs)
        assert not missing, f"README block {i} ({first!r}) uses {missing}, defined by no earlier block"
        known |= defined


@pytest.mark.skipif(not __import__("os").environ.get("ELLSJAX_RUN_README"),
                    reason="minutes of CPU: set ELLSJAX_RUN_README=1 to run the README's runnable blocks")
def test_readme_runnable_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    ns: dict = {}
    for i, code in enumerate(_readme_blocks()):
        if code.startswith("# needs:"):
            continue
        exec(compile(code, f"README block {i}", "exec"), ns)  # noqa: S102
