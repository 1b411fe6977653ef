"""notebooks/quickstart.ipynb runs top to bottom (code cells exec'd in order, Agg backend, tmp cwd)."""

import json
import os
from pathlib import Path

import matplotlib
import numpy as np

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
    assert env["grid"].scales == tuple(np.sort(env["grid"].best, axis=1)[:, (4 - 1) // 2])  # lower median, 4 seeds
    # the summary's numbers, recomputed here from the samples (numpy's corrcoef)
    res, summary = env["result"], env["summary"]
    np.testing.assert_array_equal(res.network, np.asarray(env["network_samples"]))
    corr = lambda a, b: np.array([np.corrcoef(u.ravel(), v.ravel())[0, 1] for u, v in zip(a, b, strict=True)])  # noqa: E731
    r_els, r_is = corr(res.machine, res.network), corr(res.baseline, res.network)
    assert summary["n"] == 6
    assert abs(summary["machine"]["pearson_r"]["median"] - np.median(r_els)) < 1e-5
    assert abs(summary["baseline"]["pearson_r"]["mean"] - np.mean(r_is)) < 1e-5
    assert summary["frac_beats_baseline"] == np.mean(r_els > r_is)
    # the ideal score memorises: each of its samples is a training image
    train = np.asarray(env["images"]).reshape(len(env["images"]), -1)
    nearest = np.sqrt(((res.baseline.reshape(6, 1, -1) - train[None]) ** 2).mean(-1)).min(1)
    assert nearest.max() < 1e-2, nearest
    import matplotlib.pyplot as plt

    plt.close("all")
    assert os.getcwd() == str(tmp_path)
