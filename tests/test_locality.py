"""The locality protocol: its times, and the smoke preset end to end through the CLI."""

import json

import numpy as np
import pytest

import ellsjax as ej
from ellsjax.cli import main


def test_protocol_times_are_the_release_steps():
    ts = ej.locality.protocol_times()
    assert len(ts) == 11 and ts[-1] == 0.0
    sched = ej.schedules.ddpm_linear()
    want = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.arange(900, -1, -100)]
    np.testing.assert_allclose(np.asarray(sched.alpha_bar(ts[:-1])), want, rtol=1e-5)
    assert float(sched.alpha_bar(0.0)) == 1.0  # DDIM's last step lands on the clean image
    with pytest.raises(ValueError, match="t_idx"):
        ej.locality.protocol_times((0, 100))


def test_locality_smoke_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["reproduce", "--preset", "locality-smoke", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    names = [r["denoiser"] for r in res["rows"]]
    assert names[0].startswith("Network") and any(n.startswith("GoldDiff (certified") for n in names)
    assert {"Optimal (ideal score)", "Wiener", "PCA locality", "GoldDiff (published)"} <= set(names)
    net = res["rows"][0]
    assert net["r2_mean"] == 1.0 and net["mse_mean"] == 0.0
    for r in res["rows"]:
        assert np.isfinite(r["r2_mean"]) and r["step_s"] > 0 and r["peak_bytes"] >= 0
    report = (out / "report.md").read_text()
    assert "| GoldDiff (published) |" in report and (out / "samples.png").stat().st_size > 0
