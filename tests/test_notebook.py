"""notebooks/quickstart.ipynb runs top to bottom (code cells exec'd in order, Agg backend, tmp cwd)."""

import json
import os
from pathlib import Path

import matplotlib

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    monkeypatch.chdir(tmp_path)
    env = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        src = "".join(cell["source"])
        assert not any(line.lstrip().startswith(("%", "!")) for line in src.splitlines()), f"cell {i}: magic"
        exec(compile(src, f"quickstart.ipynb[code cell {i}]", "exec"), env)
    # it did what it says: a calibrated schedule, and a comparison over the 6 seeds
    assert len(env["grid"].scales) == len(env["ts"]) - 1
    assert env["summary"]["n"] == 6 and -1 <= env["summary"]["machine"]["pearson_r"]["median"] <= 1
    import matplotlib.pyplot as plt

    plt.close("all")
    assert os.getcwd() == str(tmp_path)
