"""The locality protocol: its times, and the smoke preset end to end through the CLI."""

import json

import jax
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
        assert r["step_s"] > 0 and r["peak_bytes"] > 0
    # the Optimal, Wiener and calibrated ELS rows recomputed here: the protocol's DDIM (x̂0 clipped to [-1, 1]) written
    # out in numpy around each denoiser's x̂0, and R² / MSE against the network's samples
    p = ej.locality.preset("locality-smoke")
    images, _ = ej.training.load_data(p.net, p.train)
    network = ej.models.load(out / "net")
    sched = network.schedule
    ts = np.asarray(res["ts"], np.float32)
    x_start = np.asarray(jax.random.normal(jax.random.key(0), (p.seeds, *network.image_shape)))

    def ddim(den, scales=None):
        x = x_start
        for i in range(len(ts) - 1):
            (a, s), (a1, s1) = (np.float64(v) for v in sched(ts[i])), (np.float64(v) for v in sched(ts[i + 1]))
            kw = {} if scales is None else {"scale": scales[i]}
            x0 = np.clip(np.asarray(den.denoise(x, float(ts[i]), **kw), np.float64), -1, 1)
            x = (a1 * x0 + s1 * (x - a * x0) / s).astype(np.float32)
        return x.astype(np.float64)

    ref = ddim(network)
    dens = {"Optimal (ideal score)": (ej.machines.ideal(images, schedule=sched), None),
            "Wiener": (ej.machines.wiener(images, schedule=sched), None)}
    els_row = next(n for n in names if n.startswith("Kamb & Ganguli"))
    dens[els_row] = (ej.machines.build(ej.machines.for_network(p.net.padding).name, images, schedule=sched),
                     res["els_scales"])
    rows = {r["denoiser"]: r for r in res["rows"]}
    for name, (den, scales) in dens.items():
        got = ddim(den, scales)
        r2 = 1 - ((got - ref) ** 2).mean((1, 2, 3)) / ref.reshape(len(ref), -1).var(1)
        assert abs(rows[name]["r2_mean"] - r2.mean()) < 1e-4, (name, rows[name]["r2_mean"], r2.mean())
        assert abs(rows[name]["mse_mean"] - ((got - ref) ** 2).mean()) < 1e-5, name
    report = (out / "report.md").read_text()
    assert "| GoldDiff (published) |" in report and (out / "samples.png").stat().st_size > 0
