import math

import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej


@pytest.mark.parametrize("sched", [ej.schedules.cosine_legacy(), ej.schedules.cosine(), ej.schedules.linear(), ej.schedules.exponential()])
def test_variance_preserving_and_monotone(sched):
    t = jnp.linspace(0, 1, 101)
    a, s = sched(t)
    np.testing.assert_allclose(a**2 + s**2, 1, atol=1e-6)
    assert np.all(np.diff(np.asarray(s)) >= 0) and np.all(np.diff(np.asarray(a)) <= 0)
    ab, var = sched.variances(t)
    np.testing.assert_allclose(ab + var, 1, atol=1e-6)


def test_formulas():
    t = np.linspace(0, 1, 11)
    ab = np.asarray(ej.schedules.cosine_legacy().alpha_bar(t))
    np.testing.assert_allclose(1 - ab, 1 - np.cos(t / 1.008 * math.pi / 2) ** 2, atol=1e-6)
    ab = np.asarray(ej.schedules.cosine(0.008).alpha_bar(t))
    np.testing.assert_allclose(1 - ab, 1 - np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2, atol=1e-6)
    np.testing.assert_allclose(1 - np.asarray(ej.schedules.linear().alpha_bar(t)), 0.01 + 0.97 * t, atol=1e-6)
    np.testing.assert_allclose(1 - np.asarray(ej.schedules.exponential().alpha_bar(t)), 1 - np.exp(-2 * t), atol=1e-6)
    # endpoints: noise-free at 0 for the paper's schedule; a small signal left at 1
    a, s = ej.schedules.cosine_legacy()(jnp.array([0.0, 1.0]))
    assert float(s[0]) == 0.0 and float(a[0]) == 1.0
    np.testing.assert_allclose(float(a[1]), math.cos(math.pi / 2 / 1.008), rtol=1e-4)
    # small-t accuracy of 1 - abar (computed as sin^2, not 1 - cos^2)
    var = float(ej.schedules.cosine_legacy().variances(1e-4)[1])
    np.testing.assert_allclose(var, math.sin(1e-4 / 1.008 * math.pi / 2) ** 2, rtol=1e-5)


def test_paper_grid_and_presets():
    ts = ej.schedules.paper_times(20)
    assert len(ts) == 20 and ts[0] == pytest.approx(0.95) and ts[-1] == 0.0
    raw = ej.schedules.PAPER_SCALES["MNIST_ResNet_zeros"]
    sc = ej.schedules.paper_scales("MNIST_ResNet_zeros")
    assert len(sc) == 19 and sc[0] == raw[19] and sc[-1] == raw[1]
    cal = ej.schedules.paper_scales("MNIST_ResNet_zeros", convention="calibration")
    assert cal[0] == raw[18] and cal[-1] == raw[0]
    assert len(ej.schedules.PAPER_SCALES) == 10
    assert all(len(v) == 20 and all(k % 2 == 1 for k in v) for v in ej.schedules.PAPER_SCALES.values())


def test_presets_match_shared_reference():
    import json

    from tests.conftest import SHARED_REFERENCE

    p = SHARED_REFERENCE / "kamb_ganguli_scales.json"
    if not p.exists():
        pytest.skip(f"needs the published scales {p} (the project's ../shared/reference next to the clone)")
    ref = json.loads(p.read_text())["scales"]
    assert {k: tuple(v) for k, v in ref.items()} == ej.schedules.PAPER_SCALES


def test_errors():
    with pytest.raises(ValueError, match="name: unknown scale preset"):
        ej.schedules.paper_scales("MNIST_Transformer")
    with pytest.raises(ValueError, match="convention"):
        ej.schedules.paper_scales("MNIST_ResNet_zeros", convention="other")
    with pytest.raises(ValueError, match="nsteps"):
        ej.schedules.paper_times(1)
    with pytest.raises(ValueError, match="schedule: unknown"):
        ej.schedules.get("sigmoid")
    with pytest.raises(ValueError, match="beta_min"):
        ej.schedules.linear(0.5, 0.1)
    with pytest.raises(ValueError, match="rate"):
        ej.schedules.exponential(-1.0)


def test_resolve_scales_specs(tmp_path):
    ts, sc = ej.schedules.resolve_scales("MNIST_UNet_zeros")
    assert sc == ej.schedules.paper_scales("MNIST_UNet_zeros") and len(ts) == 20
    ts, sc = ej.schedules.resolve_scales("5,3", nsteps=3)
    assert sc == (5, 3) and np.allclose(ts, [2 / 3, 1 / 3, 0])
    assert ej.schedules.resolve_scales(7, nsteps=4)[1] == (7, 7, 7)
    assert ej.schedules.resolve_scales("9", nsteps=3)[1] == (9, 9)
    p = tmp_path / "sched.json"
    ej.schedules.save_scales(p, [0.9, 0.5, 0.0], [5, 3], source="test")
    ts, sc = ej.schedules.resolve_scales(str(p))
    assert sc == (5, 3) and np.allclose(ts, [0.9, 0.5, 0.0])
    with pytest.raises(ValueError, match="spec: expected 19 scales"):
        ej.schedules.resolve_scales([3, 3])
    with pytest.raises(ValueError, match="neither a preset"):
        ej.schedules.resolve_scales("mnist")
    bad = tmp_path / "bad.json"
    bad.write_text('{"ts": [0.5, 0.0], "scales": [3, 3]}')
    with pytest.raises(ValueError, match="needs len\\(scales\\) == len\\(ts\\) - 1"):
        ej.schedules.resolve_scales(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        ej.schedules.resolve_scales(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="scales: expected len"):
        ej.schedules.save_scales(p, [0.5, 0.0], [3, 3])
