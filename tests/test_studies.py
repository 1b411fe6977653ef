"""The studies (ellsjax.studies): the paper's table and the attention study, smoke-sized, end to end."""

import dataclasses
import json
import shutil

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402

from ellsjax import cli, reproduce, studies  # noqa: E402


@pytest.fixture(scope="module")
def paper(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    shutil.copytree(smoke_run, out / "smoke")  # a finished member: reused, not rerun
    lines = []
    res = studies.run("paper-smoke", out, progress=False, log=lines.append)
    return out, res, lines


def test_paper_table_rows_figure_and_reuse(paper):
    out, res, lines = paper
    assert any("reusing the finished run" in m and m.endswith("smoke") for m in lines)
    assert [r["run"] for r in res["rows"]] == ["smoke", "attention-smoke-with", "attention-smoke-without"]
    for row in res["rows"]:  # each row is its run's grid-machine evaluation
        member = json.loads(next(out.rglob(f"{row['run']}/results.json")).read_text())
        grid = member["evaluations"][f"{row['machine']}-grid"]["summary"]
        assert row["median_r"] == grid["machine"]["pearson_r"]["median"]
        assert row["is_median_r"] == grid["baseline"]["pearson_r"]["median"]
        assert row["frac_beats_is"] == grid["frac_beats_baseline"]
    assert [r["architecture"] for r in res["rows"]] == ["resnet (circular)", "unet+attention (zeros)", "unet (zeros)"]
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    png = matplotlib.image.imread(out / res["figures"]["samples"])
    assert png.ndim == 3 and png.shape[0] > 50
    assert "| mnist | resnet (circular) |" in (out / "report.md").read_text()
    # a finished member is reused only with the same settings
    p, run = reproduce.preset("attention-smoke-with"), out / "attention-smoke" / "attention-smoke-with"
    assert reproduce.finished(p, run) is not None
    assert reproduce.finished(dataclasses.replace(p, eval_seeds=3), run) is None
    assert reproduce.finished("attention-smoke-without", run) is None


def test_attention_study_error_maps_and_mixture(paper):
    out, _, _ = paper
    d = out / "attention-smoke"
    res = json.loads((d / "results.json").read_text())
    key = res["machine_key"]
    assert key == "bbels-grid" and {"bbels-grid", "bbels+is-mixture"} <= set(res["median_r"])
    for name, label in (("attention-smoke-with", "with"), ("attention-smoke-without", "without")):
        with np.load(d / name / "samples.npz") as z:  # the map's mean is the mean of 1 - r (numpy's corrcoef)
            r = [np.corrcoef(u.ravel(), v.ravel())[0, 1] for u, v in zip(z["network"], z["bbels-grid"], strict=True)]
        assert np.mean(res["error_maps"][f"{label}:{key}"]) == pytest.approx(1 - np.mean(r), rel=1e-6)
        member = json.loads((d / name / "results.json").read_text())
        w = member["calibration"]["mixtures"]["is"]["weights"]
        assert len(w) == 2 and all(0.0 <= v <= 1.0 for v in w)
        assert member["calibration"]["mixtures"]["is"]["objective"] <= member["calibration"]["mixtures"]["is"][
            "objective_local"] + 1e-9
    a = res["attention"]
    assert a["layers_times"] == 4 and 0.0 <= a["mass_beyond_patch"] <= 1.0 and a["mean_distance_px"] > 0
    drop = res["median_r"][key]
    assert drop["drop"] == pytest.approx(drop["without_attention"] - drop["with_attention"])
    assert matplotlib.image.imread(d / res["figures"]["error_maps"]).ndim == 3


def test_cli_resolves_studies_and_refuses_weights(tmp_path):
    with pytest.raises(SystemExit, match="--weights: paper-smoke is a study"):
        cli.main(["reproduce", "--preset", "paper-smoke", "--out", str(tmp_path), "--weights", "x.pt"])


def test_record_study_tables_come_from_the_runs(paper):
    from tests.conftest import load_script

    out, res, _ = paper
    tables = dict(load_script("record_study").tables(out))
    table = tables["paper_smoke"]
    assert [row[0] for row in table["rows"]] == [r["dataset"] for r in res["rows"]]
    assert [row[4] for row in table["rows"]] == [f"{r['median_r']:.3f}" for r in res["rows"]]
    assert {"paper_smoke_smoke", "attention_smoke"} <= set(tables)
