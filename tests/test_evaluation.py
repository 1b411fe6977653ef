"""Evaluation metrics (hand-computed values), evaluate/summarize, and `ellsjax evaluate`."""

import json

import jax
import numpy as np
import pytest

import ellsjax as ej
from ellsjax import evaluation as ev
from tests.conftest import unchecked_shapes


def test_metrics_hand_computed():
    pred = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 1.0]])
    ref = np.array([[1.0, 3.0, 2.0, 4.0], [2.0, 2.0, 2.0, 4.0]])
    # image 0: centered p = (-1.5, -.5, .5, 1.5), r the same permuted: <p, r> = 2.25+... = 4, |p|^2 = |r|^2 = 5
    r = ev.pearson_r(pred, ref)
    assert r[0] == pytest.approx(4.0 / 5.0)
    # image 1: p-p̄ = (-.5,.5,-.5,.5), r-r̄ = (-.5,-.5,-.5,1.5): <.,.> = .25-.25+.25+.75 = 1; |p|=1, |r|=sqrt(3)
    assert r[1] == pytest.approx(1.0 / np.sqrt(3.0))
    # MSE: image 0 (0+1+1+0)/4 = 0.5; image 1 (4+1+4+9)/4 = 4.5
    np.testing.assert_allclose(ev.mse(pred, ref), [0.5, 4.5])
    # R² = 1 - MSE / Var(ref): Var(ref0) = 1.25, Var(ref1) = 0.75
    np.testing.assert_allclose(ev.r_squared(pred, ref), [1 - 0.5 / 1.25, 1 - 4.5 / 0.75])
    m = ev.metrics(pred[:, None, :, None], ref[:, None, :, None])  # image batches [B, H, W, C]
    np.testing.assert_allclose(m["pearson_r"], r)


def test_pearson_invariances_and_sign():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5, 5, 1))
    np.testing.assert_allclose(ev.pearson_r(3.0 * a + 2.0, a), 1.0, rtol=1e-12)
    np.testing.assert_allclose(ev.pearson_r(-a, a), -1.0, rtol=1e-12)
    np.testing.assert_allclose(ev.r_squared(a, a), 1.0)


def test_metric_errors():
    with pytest.raises(ValueError, match="shape"), unchecked_shapes():
        ev.pearson_r(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="constant"):
        ev.pearson_r(np.ones((1, 4)), np.arange(4.0)[None])
    with pytest.raises(ValueError, match="constant"):
        ev.r_squared(np.arange(4.0)[None], np.ones((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        ev.mse(np.array([[np.nan, 1.0]]), np.array([[0.0, 1.0]]))


def test_evaluate_and_summarize(tmp_path):
    imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    ts = [0.8, 0.5, 0.2, 0.0]
    net = ej.machines.els(imgs)
    res = ev.evaluate(net, ej.machines.els(imgs), x, ts, scales=(5, 3, 3), network_scales=(5, 3, 3),
                      baseline=ej.machines.ideal(imgs))
    np.testing.assert_allclose(res.machine_metrics["pearson_r"], 1.0, atol=1e-5)
    np.testing.assert_allclose(res.machine_metrics["mse"], 0.0, atol=1e-8)
    s = ev.summarize(res)
    assert s["n"] == 4 and set(s["machine"]) == {"pearson_r", "r_squared", "mse"}
    expected = float(np.mean(res.machine_metrics["pearson_r"] > res.baseline_metrics["pearson_r"]))
    assert s["frac_beats_baseline"] == expected
    assert s["baseline"]["pearson_r"]["median"] == pytest.approx(float(np.median(res.baseline_metrics["pearson_r"])))
    figs = ev.save_figures(res, tmp_path, name="els")
    for p in figs.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = ev.save_results(tmp_path / "r.json", res, note="x")
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == out["summary"]
    with pytest.raises(TypeError, match="machine"):
        ev.evaluate(net, "els", x, ts, scales=(5, 3, 3), network_scales=(5, 3, 3))
