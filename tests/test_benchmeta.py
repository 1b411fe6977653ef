"""The benchmarks page's pipeline: scripts record runs as JSON (scripts/_benchmeta.py), the docs build renders
them (docs/_ext/benchtables.py) with hardware, jax version, date and command; the committed results render."""

import importlib
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
benchtables = importlib.import_module("benchtables")


def test_a_recorded_run_renders_with_its_context(tmp_path):
    meta = load_script("_benchmeta")
    run = meta.meta(["scripts/bench_x.py", "--n", "3"])
    assert run["command"] == "python scripts/bench_x.py --n 3" and run["jax"] and run["date"].endswith("UTC")
    assert run["hardware"].endswith("cores") or ";" in run["hardware"]
    for rows in ([[1, 0.5]], [[2, "a | b"]]):
        meta.record("bench_x", title="X", description="What X times.", columns=["k", "s"], rows=rows,
                    run_meta=run, results=tmp_path)
    doc = json.loads((tmp_path / "bench_x.json").read_text())
    assert [r["rows"] for r in doc["runs"]] == [[[1, 0.5]], [[2, "a | b"]]]   # appended, oldest first
    page = benchtables.render(tmp_path)
    assert page.index("| 2 | a \\| b |") < page.index("| 1 | 0.5 |")     # newest first, cells escaped
    assert f"{run['date']}** · {run['hardware']} · jax {run['jax']}" in page and run["command"] in page
    with pytest.raises(ValueError, match="rows"):
        meta.record("bench_x", title="X", description="d", columns=["k", "s"], rows=[[1]], results=tmp_path)


def test_a_run_without_its_context_does_not_render(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps(
        {"title": "T", "description": "D", "runs": [{"meta": {"date": "today"}, "columns": ["a"], "rows": [[1]]}]}))
    with pytest.raises(ValueError, match=r"bad.json: a run lacks \['hardware', 'jax', 'command'\]"):
        benchtables.render(tmp_path)


def test_the_committed_results_render():
    page = benchtables.render(ROOT / "docs" / "benchmarks" / "results")
    assert page.count("```bash") >= 4 and "Recorded measurements" in page
