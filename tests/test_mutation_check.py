"""scripts/mutation_check.py: its mutations still apply to this code, and one tiny run."""

import json

from tests.conftest import REPO, load_script


def test_every_mutation_applies_to_one_line():
    script = load_script("mutation_check")
    names = [m.name for m in script.MUTATIONS]
    assert len(names) == len(set(names)) >= 10
    for m in script.MUTATIONS:
        text = (REPO / m.path).read_text()
        assert text.count(m.old) == 1, m.name  # else the check would report it n/a
        assert m.new != m.old and "\n" not in m.old.strip("\n") and m.tests, m.name


def test_a_tiny_run_reports_a_caught_mutation(tmp_path):
    # the chunk merge's mutation under one test of the merge (whether a passing run is reported as
    # missed is seen in every full run: the mutation table of docs/guides/mutation-check.md)
    script = load_script("mutation_check")
    out = tmp_path / "m.json"
    assert script.main(["--only", "merge-stats-rescale", "--tests", "tests/test_kernel.py -k merge_is_exact",
                        "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["mutation"] == "merge-stats-rescale" and row["caught"] is True and row["status"] == "failed"
    # the working tree is untouched (the mutation ran in a copy)
    assert "        s1.total * c1 + s2.total * c2," in (REPO / "ellsjax" / "kernel.py").read_text()
