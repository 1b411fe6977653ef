"""Every relative link of the README, the top-level Markdown files and the docs' pages resolves to a file."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md",
         *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]
# [text](target) and ![alt](target), outside code spans and fenced blocks
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Drawn from a run longer than the suite allows (scripts/readme_figure.py on `ellsjax reproduce --preset
# mnist-cpu`), and committed.
FIGURE = ROOT / "docs" / "_static" / "readme.png"


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_the_pages_have_links_to_check():
    assert len(FILES) > 20 and sum(len(_links(p)) for p in FILES) > 50


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in _links(path):
        file = (path.parent / target.split("#")[0]).resolve()
        if not file.exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


def test_readme_links_the_figure():
    assert "docs/_static/readme.png" in _links(ROOT / "README.md")


def test_readme_figure_is_committed():
    assert FIGURE.exists(), "docs/_static/readme.png: draw it with python scripts/readme_figure.py RUN_DIR"
    assert FIGURE.stat().st_size < 150_000, "the README's figure should stay small (< 150 KB)"
    assert FIGURE.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
