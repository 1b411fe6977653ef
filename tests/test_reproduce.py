"""`ellsjax reproduce --preset smoke` end to end, and `ellsjax evaluate` on the network it trained."""

import json

import jax
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402

import ellsjax as ej  # noqa: E402
from ellsjax import cli  # noqa: E402
from ellsjax.scales import ScaleSchedule  # noqa: E402


def _valid_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 10 and img.shape[1] > 10


@pytest.fixture(scope="module")
def smoke(smoke_run):
    return smoke_run


def test_reproduce_smoke_outputs(smoke):
    res = json.loads((smoke / "results.json").read_text())
    assert res["preset"] == "smoke"
    evals = res["evaluations"]
    assert set(evals) == {"els-grid", "soft-els-box", "pspc-grid", "wiener-none", "pca-none", "cfdm-none"}
    n = ej.reproduce.preset("smoke").eval_seeds
    for row in evals.values():
        assert row["summary"]["n"] == n
        assert row["summary"]["frac_beats_baseline"] * n in range(n + 1)  # a count of seeds
    # one row recomputed here: the Wiener filter's and IS's samples from the evaluation noise,
    # correlated with the network's by numpy
    p = ej.reproduce.preset("smoke")
    images, _ = ej.training.load_data(p.net, p.train)
    network = ej.models.load(smoke / "net")
    row = evals["wiener-none"]
    x_eval = jax.random.normal(jax.random.key(0), (n, *network.image_shape))
    sample = lambda d: np.asarray(ej.samplers.ddim(d, x_eval, row["ts"]))  # noqa: E731
    net, is_samples = sample(network), sample(ej.machines.ideal(images, schedule=network.schedule))
    wiener = sample(ej.machines.wiener(images, schedule=network.schedule))
    corr = lambda a: np.array([np.corrcoef(u.ravel(), v.ravel())[0, 1] for u, v in zip(a, net, strict=True)])  # noqa: E731
    r_w, r_is = corr(wiener), corr(is_samples)
    sm = row["summary"]
    assert abs(sm["machine"]["pearson_r"]["median"] - np.median(r_w)) < 1e-4
    assert abs(sm["baseline"]["pearson_r"]["mean"] - np.mean(r_is)) < 1e-4
    assert sm["frac_beats_baseline"] == np.mean(r_w > r_is)
    mse_w = np.mean((wiener - net) ** 2, axis=(1, 2, 3))
    assert abs(sm["machine"]["mse"]["mean"] - np.mean(mse_w)) < 1e-5
    for figs in res["figures"].values():
        for rel in figs.values():
            _valid_png(smoke / rel)
    report = (smoke / "report.md").read_text()
    assert "| els | grid |" in report and "| soft-els | box |" in report and "| pspc | grid |" in report
    for name in ("wiener", "pca", "cfdm"):
        assert f"| {name} | — |" in report and evals[f"{name}-none"]["scales"] is None
    pspc_scales = ScaleSchedule.load(smoke / "scales_grid_pspc.json").values
    assert set(pspc_scales) <= set(ej.reproduce.preset("smoke").candidates)
    assert res["calibration"]["others"]["pspc"]["scales"] == list(pspc_scales)
    # creativity measures for the network, IS and every evaluated machine
    assert set(res["creativity"]) == {"network", "is", *evals}
    # IS lies closest to the training set (it converges to training images); its distance recomputed here
    creat = res["creativity"]
    assert min(creat, key=lambda k: creat[k]["nn_rms"]) == "is"
    assert all(row["near_copy"] * n in range(n + 1) for row in creat.values())
    nn_is = np.sqrt(((is_samples.reshape(n, 1, -1) - images.reshape(1, len(images), -1)) ** 2).mean(-1)).min(1)
    assert abs(res["creativity"]["is"]["nn_rms"] - np.mean(nn_is)) < 1e-4
    assert "## Creativity" in report and "| network |" in report
    grid = ScaleSchedule.load(smoke / "scales_grid.json")
    assert grid.kind == "size" and grid.nsteps == ej.reproduce.preset("smoke").nsteps
    soft = ScaleSchedule.load(smoke / "scales_soft_box.json")
    assert soft.kind == "width" and soft.options["support"] == ej.reproduce.preset("smoke").soft_support
    assert soft.options["window"] == "box"


def test_cli_evaluate_on_trained_network(smoke, tmp_path):
    out = tmp_path / "ev"
    code = cli.main(["evaluate", "--model", str(smoke / "net"), "--machine", "els", "--scales",
                     str(smoke / "scales_grid.json"), "--n", "3", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["machine"] == "els" and len(res["per_seed"]["machine"]["pearson_r"]) == 3
    assert len(res["per_seed"]["baseline"]["pearson_r"]) == 3
    _valid_png(out / "scatter.png")
    _valid_png(out / "grid.png")
    soft = tmp_path / "evs"
    assert cli.main(["evaluate", "--model", str(smoke / "net"), "--machine", "soft-els", "--scales",
                     str(smoke / "scales_soft_box.json"), "--n", "2", "--out", str(soft)]) == 0
    assert len(json.loads((soft / "results.json").read_text())["scales"]) == ej.reproduce.preset("smoke").nsteps


def test_cli_evaluate_other_denoisers(smoke, tmp_path):
    # PSPC takes its grid-calibrated patch sizes; Wiener takes none (only the schedule's times)
    assert cli.main(["evaluate", "--model", str(smoke / "net"), "--machine", "pspc", "--scales",
                     str(smoke / "scales_grid_pspc.json"), "--n", "2", "--out", str(tmp_path / "p")]) == 0
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert res["machine"] == "pspc" and res["scales"] == res_scales(smoke / "scales_grid_pspc.json")
    assert cli.main(["evaluate", "--model", str(smoke / "net"), "--machine", "wiener", "--scales",
                     str(smoke / "scales_grid.json"), "--n", "2", "--out", str(tmp_path / "w")]) == 0
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert res["scales"] is None and len(res["ts"]) == ej.reproduce.preset("smoke").nsteps + 1


def test_cli_calibrate_grid_and_soft(smoke, tmp_path):
    net = str(smoke / "net")
    assert cli.main(["calibrate", "--model", net, "--machine", "els", "--n", "2", "--steps", "4", "--candidates",
                     "3,5", "--out", str(tmp_path / "g.json")]) == 0
    grid = ScaleSchedule.load(tmp_path / "g.json")
    scales = grid.values
    assert len(grid.ts) == 5 and len(scales) == 4 and set(scales) <= {3, 5}
    assert json.loads((tmp_path / "g.json").read_text())["machine"] == "els"
    assert cli.main(["calibrate", "--model", net, "--machine", "soft-els", "--n", "2", "--steps", "4", "--support",
                     "5", "--iterations", "2", "--batch", "2", "--out", str(tmp_path / "s.json")]) == 0
    soft = ScaleSchedule.load(tmp_path / "s.json")
    assert soft.kind == "width" and soft.nsteps == 4 and soft.options["support"] == 5 and soft.options["window"] == "box"
    # the line search started from the grid schedule: one evaluation keeps exactly its widths
    assert cli.main(["calibrate", "--model", net, "--machine", "soft-els", "--n", "2", "--steps", "4", "--support",
                     "5", "--iterations", "1", "--init", str(tmp_path / "g.json"), "--out", str(tmp_path / "s1.json")]) == 0
    ells1 = ScaleSchedule.load(tmp_path / "s1.json").values
    assert np.allclose(ells1, ej.calibration.widths_from_sizes(scales, "box"))
    for bad, msg in (("0", "positive width"), (str(tmp_path / "nope.json"), "neither"),
                     (str(tmp_path / "s.json"), "width schedule")):
        with pytest.raises(SystemExit, match=msg):
            cli.main(["calibrate", "--model", net, "--machine", "soft-els", "--steps", "4", "--init", bad])
    # what it wrote, evaluate reads
    assert cli.main(["evaluate", "--model", net, "--machine", "soft-els", "--scales", str(tmp_path / "s.json"),
                     "--n", "2", "--out", str(tmp_path / "ev")]) == 0
    with pytest.raises(SystemExit, match="--candidates"):
        cli.main(["calibrate", "--model", net, "--machine", "els", "--candidates", "3,x"])
    with pytest.raises(SystemExit, match="--n must be positive"):
        cli.main(["calibrate", "--model", net, "--n", "0"])


def res_scales(path):
    return list(ScaleSchedule.load(path).values)


def test_cli_errors(smoke, tmp_path):
    net = str(smoke / "net")
    with pytest.raises(SystemExit, match="soft-window"):
        cli.main(["evaluate", "--model", net, "--machine", "els", "--scales", str(smoke / "scales_soft_box.json")])
    with pytest.raises(SystemExit, match="soft"):
        cli.main(["evaluate", "--model", net, "--machine", "soft-els", "--scales", str(smoke / "scales_grid.json")])
    with pytest.raises(SystemExit, match="--scales"):
        cli.main(["evaluate", "--model", net, "--machine", "bbels"])
    with pytest.raises(SystemExit, match="--scales"):
        cli.main(["evaluate", "--model", net, "--machine", "pspc"])
    with pytest.raises(SystemExit, match="--model"):
        cli.main(["evaluate", "--model", str(tmp_path / "nothing"), "--machine", "is"])
    with pytest.raises(SystemExit, match="--preset"):
        cli.main(["reproduce", "--preset", "nope", "--out", str(tmp_path / "x")])


def test_readme_figure_rows_are_network_machine_and_ideal_score(smoke, tmp_path, capsys):
    """scripts/readme_figure.py on the smoke run (the README's figure comes from an mnist-cpu run the same way):
    rows network | grid-calibrated ELS | IS, each sampled from the noise of jax.random.key(0)."""
    from tests.conftest import load_script

    out = tmp_path / "readme.png"
    assert load_script("readme_figure").main([str(smoke), "--out", str(out), "--seeds", "3", "--zoom", "1"]) == 0
    assert "network | els (grid-calibrated, 4 steps) | is" in capsys.readouterr().out
    img = np.rint(matplotlib.image.imread(out)[..., 0] * 255)           # grey: R = G = B
    side = 8 + 2                                                          # 8x8 samples, 2 px gaps
    assert img.shape == (3 * side + 2, 3 * side + 2)
    tiles = np.stack([[img[2 + r * side:r * side + side, 2 + c * side:c * side + side] for c in range(3)]
                      for r in range(3)])                                 # [row, seed, 8, 8]
    # the same samples from the library (the evaluation's programs: compiled already)
    network = ej.models.load(smoke / "net")
    images, _ = ej.training.load_data(*ej.training.load_run_config(smoke / "net"))
    grid = ScaleSchedule.load(smoke / "scales_grid.json")
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    rows = [ej.evaluation.sample(network, x, grid.times()),
            ej.evaluation.sample(ej.machines.els(images, schedule=network.schedule), x, grid.times(), scales=grid.values),
            ej.evaluation.sample(ej.machines.ideal(images, schedule=network.schedule), x, grid.times())]
    for row, expected in zip(tiles, rows, strict=True):
        assert np.abs(row - ej.plotting.to_uint8(expected)[..., 0]).max() <= 1
    assert np.abs(tiles[0] - tiles[2]).max() > 10                         # the rows differ
