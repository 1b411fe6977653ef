import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from ellsjax.scales import ScaleSchedule


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
    raw = ej.presets.PAPER_SCALES["MNIST_ResNet_zeros"]
    sc = ScaleSchedule.paper("MNIST_ResNet_zeros")
    assert sc.values == ej.presets.paper_scales("MNIST_ResNet_zeros") and sc.source == "MNIST_ResNet_zeros"
    assert len(sc.values) == 19 and sc.values[0] == raw[19] and sc.values[-1] == raw[1]
    np.testing.assert_array_equal(sc.times(), ts)
    cal = ScaleSchedule.paper("MNIST_ResNet_zeros", convention="calibration").values
    assert cal[0] == raw[18] and cal[-1] == raw[0]
    assert len(ej.presets.PAPER_SCALES) == 10
    assert all(len(v) == 20 and all(k % 2 == 1 for k in v) for v in ej.presets.PAPER_SCALES.values())


def test_presets_match_shared_reference():
    from tests.conftest import SHARED_REFERENCE

    p = SHARED_REFERENCE / "kamb_ganguli_scales.json"
    if not p.exists():
        pytest.skip(f"needs the published scales {p} (the project's ../shared/reference next to the clone)")
    ref = json.loads(p.read_text())["scales"]
    assert {k: tuple(v) for k, v in ref.items()} == ej.presets.PAPER_SCALES
    # the released table reads as the bundled presets, under both index conventions
    for convention in ("sampler", "calibration"):
        table = ScaleSchedule.read_table(p, convention=convention)
        assert table == {k: ScaleSchedule.paper(k, convention=convention) for k in ej.presets.PAPER_SCALES}
    assert ScaleSchedule.load(p, name="CelebA_UNet_zeros") == ScaleSchedule.paper("CelebA_UNet_zeros")


def test_errors():
    with pytest.raises(ValueError, match="name: unknown scale preset"):
        ScaleSchedule.paper("MNIST_Transformer")
    with pytest.raises(ValueError, match="convention"):
        ScaleSchedule.paper("MNIST_ResNet_zeros", convention="other")
    with pytest.raises(ValueError, match="nsteps"):
        ej.schedules.paper_times(1)
    with pytest.raises(ValueError, match="schedule: unknown"):
        ej.schedules.get("sigmoid")
    with pytest.raises(ValueError, match="beta_min"):
        ej.schedules.linear(0.5, 0.1)
    with pytest.raises(ValueError, match="rate"):
        ej.schedules.exponential(-1.0)


def test_load_specs(tmp_path):
    s = ScaleSchedule.load("MNIST_UNet_zeros")
    assert s == ScaleSchedule.paper("MNIST_UNet_zeros") and len(s.ts) == 20
    s = ScaleSchedule.load("5,3", nsteps=3)
    assert s.values == (5, 3) and s.kind == "size" and np.allclose(s.ts, [2 / 3, 1 / 3, 0])
    assert ScaleSchedule.load(7, nsteps=4).values == (7, 7, 7)
    assert ScaleSchedule.load("9", nsteps=3).values == (9, 9)
    assert ScaleSchedule.load("2.5,1", nsteps=3).values == (2.5, 1.0)  # a fraction: widths
    with pytest.raises(ValueError, match="spec: expected 19 scales"):
        ScaleSchedule.load([3, 3])
    with pytest.raises(ValueError, match="neither a preset"):
        ScaleSchedule.load("mnist")
    bad = tmp_path / "bad.json"
    bad.write_text('{"ts": [0.5, 0.0], "scales": [3, 3]}')
    with pytest.raises(ValueError, match="needs len\\(scales\\) == len\\(ts\\) - 1"):
        ScaleSchedule.load(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        ScaleSchedule.load(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="values: need len"):
        ScaleSchedule((0.5, 0.0), (3, 3))
    with pytest.raises(ValueError, match="patch sizes must be positive"):
        ScaleSchedule((0.5, 0.0), (0,))
    with pytest.raises(ValueError, match="window widths ℓ must be positive"):
        ScaleSchedule((0.5, 0.0), (-1.0,), "width", options={"support": 3})


SIZE = ScaleSchedule((0.9, 0.5, 0.0), (5, 3), "size", source="test")
WIDTH = ScaleSchedule((0.9, 0.5, 0.0), (2.5, 0.75), "width", padding="zeros",
                      options={"support": 5, "window": "box", "edge": 0.2})


@pytest.mark.parametrize("schedule", [SIZE, WIDTH, ScaleSchedule.paper("MNIST_ResNet_circular"),
                                      ScaleSchedule.paper("CIFAR10_UNet_zeros_conditional", convention="calibration")],
                         ids=["size", "width", "paper", "paper-calibration"])
def test_every_kind_round_trips_through_its_file(schedule, tmp_path):
    p = tmp_path / "s.json"
    schedule.save(p, method="test", note=[1, 2])
    back = ScaleSchedule.load(p)
    assert back == schedule and back.source == str(p)  # source is where it came from, not compared
    assert back.meta == {**schedule.meta, "method": "test", "note": [1, 2]}
    assert ScaleSchedule.from_json(json.loads(p.read_text())) == schedule
    assert all(type(v) is (int if schedule.kind == "size" else float) for v in back.values)
    # kind= says how bare numbers read; a file says what it holds
    assert ScaleSchedule.load(p, kind="size") == schedule


def test_published_table_format(tmp_path):
    raw = {"MNIST_ResNet_zeros": list(ej.presets.PAPER_SCALES["MNIST_ResNet_zeros"]), "toy": [3, 5, 7, 9]}
    p = tmp_path / "table.json"
    p.write_text(json.dumps({"about": "x", "nsteps": 20, "scales": {"MNIST_ResNet_zeros": raw["MNIST_ResNet_zeros"]}}))
    assert ScaleSchedule.load(p, name="MNIST_ResNet_zeros") == ScaleSchedule.paper("MNIST_ResNet_zeros")
    with pytest.raises(ValueError, match=r"name: .* is a table of 1 schedules: pass name= one of \['MNIST_ResNet_zeros'\]"):
        ScaleSchedule.load(p)
    with pytest.raises(ValueError, match="name: selects a schedule from a published table file"):
        ScaleSchedule.load("MNIST_ResNet_zeros", name="MNIST_ResNet_zeros")
    # t = j/4 uses k_j (sampler) or k_{j-1} (calibration), j = 3, 2, 1
    toy = {"nsteps": 4, "scales": {"toy": raw["toy"]}}
    assert ScaleSchedule.read_table(toy)["toy"].values == (9, 7, 5)
    assert ScaleSchedule.read_table(toy, convention="calibration")["toy"].values == (7, 5, 3)
    np.testing.assert_allclose(ScaleSchedule.read_table(toy)["toy"].ts, [0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="toy has 4 values for nsteps = 5"):
        ScaleSchedule.read_table({"nsteps": 5, "scales": {"toy": raw["toy"]}})
    with pytest.raises(ValueError, match="not a published scale table"):
        ScaleSchedule.read_table({"ts": [0.5, 0.0], "scales": [3]})


def test_schedules_and_scales_import_no_cycle():
    import ast
    import inspect

    import ellsjax.presets
    import ellsjax.schedules

    for mod in (ellsjax.schedules, ellsjax.presets):  # the lower layers import neither scales nor each other back
        names = {n.module for n in ast.walk(ast.parse(inspect.getsource(mod))) if isinstance(n, ast.ImportFrom)}
        names |= {a.name for n in ast.walk(ast.parse(inspect.getsource(mod))) if isinstance(n, ast.Import) for a in n.names}
        assert not any("scales" in (n or "") for n in names), (mod.__name__, names)
    assert not hasattr(ellsjax.schedules, "resolve_scales") and not hasattr(ellsjax.schedules, "paper_scales")
