"""Soft-window machines and calibration: recovering known schedules from machine "networks"."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from ellsjax import calibration as cal
from ellsjax.scales import ScaleSchedule


@pytest.fixture(scope="module")
def imgs():
    return jax.random.uniform(jax.random.key(0), (10, 8, 8, 1), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def noise():
    return jax.random.normal(jax.random.key(1), (3, 8, 8, 1))


# -- soft-window machines -------------------------------------------------------------------------

def test_window_weights_hand_values():
    w = np.asarray(ej.machines.soft.window_weights(2.0, 3)).reshape(3, 3)
    assert w[1, 1] == pytest.approx(1.0)
    assert w[0, 1] == pytest.approx(np.exp(-1 / 8))
    assert w[0, 0] == pytest.approx(np.exp(-2 / 8))


def test_box_window_hand_values():
    w = np.asarray(ej.machines.soft.window_weights(1.0, 5, "box", 0.25)).reshape(5, 5)
    s = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    assert w[2, 2] == pytest.approx(s(1.5 / 0.25), rel=1e-5)  # center: Chebyshev distance 0
    assert w[1, 3] == pytest.approx(s(0.5 / 0.25), rel=1e-5)  # distance 1: inside the 3x3 box
    assert w[0, 2] == pytest.approx(s(-0.5 / 0.25), rel=1e-5)  # distance 2: outside
    m = ej.machines.soft_els(jnp.zeros((2, 8, 8, 1)), support=7, window="box", edge=0.15)
    assert [m.window_size(v) for v in (0.0, 1.0, 1.3, 5.0)] == [3, 5, 5, 7]
    with pytest.raises(ValueError, match="window"):
        ej.machines.soft_els(jnp.zeros((2, 8, 8, 1)), window="disk")


@pytest.mark.parametrize("optimizer", ["line_search", "adam"])
def test_box_window_recovers_known_half_side(imgs, noise, optimizer):
    ts = [0.7, 0.4, 0.0]
    truth = (1.6, 0.8)
    m = ej.machines.soft_els(imgs, support=5, window="box", edge=0.3)
    res = cal.differentiable_calibrate(m, m, noise, ts, init=1.2, iterations=50 if optimizer == "adam" else 8,
                                       learning_rate=0.08, network_scales=truth, optimizer=optimizer)
    np.testing.assert_allclose(res.ells, truth, rtol=0.1)
    assert res.window == "box" and res.optimizer == optimizer


@pytest.mark.parametrize("padding", ["circular", "zeros"])
def test_soft_matches_explicit_weighted_distance(imgs, padding):
    """x̂0 equals a direct numpy evaluation of the Gaussian-weighted patch posterior (ELS bank)."""
    m = ej.machines.soft_els(imgs, padding=padding, support=3)
    x = np.asarray(jax.random.normal(jax.random.key(5), (1, 8, 8, 1)))
    ell, t = 0.9, 0.4
    got = np.asarray(m.denoise(x, t, scale=ell))[0, :, :, 0]
    a, s = (float(v) for v in m.schedule(t))
    w = np.asarray(ej.machines.soft.window_weights(ell, 3), np.float64)
    tr = np.asarray(imgs, np.float64)[..., 0]
    # bank: every 3x3 patch fully inside a training image (interior pixels of both ELS and bbELS)
    patches = np.stack([tr[:, i:i + 3, j:j + 3].reshape(len(tr), 9) for i in range(6) for j in range(6)], 1).reshape(-1, 9)
    xpad = np.pad(x[0, :, :, 0].astype(np.float64), 1, mode="wrap" if padding == "circular" else "constant")
    for p, q in [(3, 4), (1, 6), (6, 2)]:  # interior pixels
        qw = xpad[p:p + 3, q:q + 3].reshape(9)
        logits = -np.sum(w * (qw - a * patches) ** 2, axis=1) / (2 * s * s)
        wt = np.exp(logits - logits.max())
        assert got[p, q] == pytest.approx(float(np.sum(wt * patches[:, 4]) / wt.sum()), abs=2e-5)


@pytest.mark.parametrize("padding", ["circular", "zeros"])
def test_soft_large_ell_is_hard_machine_and_paths_agree(imgs, noise, padding):
    hard = ej.machines.els(imgs, padding=padding)
    soft = ej.machines.soft_els(imgs, padding=padding, support=5)
    streamed = ej.machines.soft_els(imgs, padding=padding, support=5, bank_budget=1)  # no prebuilt bank
    a = soft.denoise(noise, 0.5, scale=1e5)
    np.testing.assert_allclose(a, hard.denoise(noise, 0.5, scale=5), atol=2e-5)
    np.testing.assert_allclose(soft.denoise(noise, 0.3, scale=1.2), streamed.denoise(noise, 0.3, scale=1.2), atol=2e-5)


def test_soft_conditional_matches_hard(imgs, noise):
    labels = np.arange(10) % 3
    soft = ej.machines.soft_els(imgs, labels, support=3)
    hard = ej.machines.els(imgs, labels)
    np.testing.assert_allclose(soft.denoise(noise, 0.5, scale=1e5, label=[0, 2, 1]),
                               hard.denoise(noise, 0.5, scale=3, label=[0, 2, 1]), atol=2e-5)


def test_soft_window_truncates_at_small_ell(imgs, noise):
    wide = ej.machines.soft_els(imgs, support=7)
    assert [wide.window_size(v) for v in (0.3, 0.5, 1.0, 100.0)] == [3, 5, 7, 7]
    np.testing.assert_allclose(wide.denoise(noise, 0.3, scale=0.3),
                               ej.machines.soft_els(imgs, support=3).denoise(noise, 0.3, scale=0.3), atol=1e-6)
    assert set(wide.prepare((0.3, 0.5)).banks) == {"k3", "k5"}


def test_soft_gradient_matches_finite_difference(imgs, noise):
    m = ej.machines.soft_els(imgs, support=5).prepare()
    t = jnp.full((3,), 0.4)

    @jax.jit
    def f(ell):
        return jnp.sum(m.denoise_ell(noise, t, None, ell) ** 2)

    g = float(jax.jit(jax.grad(f))(1.1))
    fd = float((f(1.1 + 1e-2) - f(1.1 - 1e-2)) / 2e-2)
    assert g == pytest.approx(fd, rel=2e-2)
    assert abs(g) > 1e-3


def test_soft_machine_samples_and_registry(imgs, noise):
    m = ej.machines.build("soft-bbels", imgs, support=3)
    assert m.padding == "zeros" and "soft-els" in ej.machines.MACHINES
    x = ej.samplers.ddim(m, noise, [0.8, 0.4, 0.0], scales=[2.0, 0.7])
    assert x.shape == noise.shape and bool(jnp.all(jnp.isfinite(x)))


def test_soft_machine_errors(imgs):
    m = ej.machines.soft_els(imgs, support=3)
    with pytest.raises(ValueError, match="scale"):
        m.denoise(imgs[:1], 0.5, scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        m.denoise(imgs[:1], 0.5, scale=float("nan"))
    with pytest.raises(ValueError, match="scale"):
        m.denoise(imgs[:1], 0.5)
    with pytest.raises(TypeError, match="patch size"):
        ej.samplers.ddim(m, imgs[:1], [0.5, 0.0], scales=[3])
    with pytest.raises(ValueError, match="support"):
        ej.machines.soft_els(imgs, support=4)
    with pytest.raises(ValueError, match="support"):
        ej.machines.soft_els(imgs, support=9)
    with pytest.raises(ValueError, match="support"):
        ej.machines.soft_bbels(imgs, support=9)


# -- grid calibration -----------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_grid_recovers_true_schedule(imgs, noise, metric, tmp_path):
    ts = [0.8, 0.6, 0.4, 0.2, 0.0]
    truth = (7, 5, 3, 3)
    target = ej.machines.els(imgs)
    res = cal.grid_calibrate(target, ej.machines.els(imgs), noise, ts, candidates=(1, 3, 5, 7),
                             metric=metric, network_scales=truth)
    assert res.scales == truth
    assert res.best.shape == (4, 3) and res.similarity.shape == (4, 4, 3)
    assert np.all(res.best == np.asarray(truth)[:, None])
    assert res.schedule.kind == "size" and res.schedule.values == truth and np.allclose(res.schedule.ts, ts)
    res.save(tmp_path / "s.json")
    back = ScaleSchedule.load(tmp_path / "s.json")
    assert back == res.schedule and back.meta == {"method": "grid", "metric": metric, "candidates": [1, 3, 5, 7]}


def test_grid_takes_the_lower_median_over_seeds_that_disagree(imgs):
    # a "network" whose x̂0 is the ELS machine at a different patch size per seed: the best candidate
    # of seed b is truth[:, b], and the schedule is the lower median of each step's row
    ts = [0.7, 0.4, 0.0]
    truth = np.array([[5, 1, 5, 3], [3, 5, 1, 1]])
    m = ej.machines.els(imgs)
    xs = jax.random.normal(jax.random.key(5), (3, 4, 8, 8, 1))
    x0s = jnp.stack([jnp.concatenate([m.denoise(xs[i, b : b + 1], ts[i], scale=int(truth[i, b])) for b in range(4)])
                     for i in range(2)])
    for seeds, want in ((4, (3, 1)), (3, (5, 3))):  # even: sorted 1 3|5 5 and 1 1|3 5; odd: 1 5 5 and 1 3 5
        traj = ej.samplers.Trajectory(jnp.asarray(ts), xs[:, :seeds], x0s[:, :seeds])
        res = cal.grid_calibrate(m, m, None, candidates=(1, 3, 5), trajectory=traj)
        np.testing.assert_array_equal(res.best, truth[:, :seeds])
        assert res.scales == want, (seeds, res.scales)


def test_trajectory_loss_zero_for_the_target_itself(imgs, noise):
    target = ej.machines.els(imgs)
    traj = cal.network_trajectory(target, noise, [0.8, 0.5, 0.0], scales=(5, 3))
    own = cal.trajectory_loss(ej.machines.els(imgs), traj, (5, 3), batch_size=2)
    other = cal.trajectory_loss(ej.machines.els(imgs), traj, (1, 7))
    assert own.shape == (2,) and np.all(own < 1e-8) and np.all(other > 1e-4)
    with pytest.raises(ValueError, match="scales"):
        cal.trajectory_loss(target, traj, (5,))


def test_grid_errors(imgs, noise):
    m = ej.machines.els(imgs)
    with pytest.raises(ValueError, match="metric"):
        cal.grid_calibrate(m, m, noise, [0.5, 0.0], candidates=(3,), metric="dot", network_scales=(3,))
    with pytest.raises(ValueError, match="candidates"):
        cal.grid_calibrate(m, m, noise, [0.5, 0.0], candidates=(), network_scales=(3,))
    with pytest.raises(ValueError, match="scale"):
        cal.grid_calibrate(m, m, noise, [0.5, 0.0], candidates=(4,), network_scales=(3,))
    other = ej.machines.els(jnp.zeros((3, 6, 6, 1)))
    with pytest.raises(ValueError, match="image shape"):
        cal.grid_calibrate(m, other, noise, [0.5, 0.0], candidates=(3,), network_scales=(3,))


# -- differentiable calibration -------------------------------------------------------------------

@pytest.mark.parametrize("curve,optimizer", [("per_step", "auto"), ("per_step", "adam"), ("quadratic", "auto")])
def test_differentiable_recovers_known_ell(imgs, noise, curve, optimizer, tmp_path):
    ts = [0.7, 0.5, 0.3, 0.0]
    truth = (1.6, 1.6, 1.6) if curve == "quadratic" else (1.8, 1.2, 0.7)
    target = ej.machines.soft_els(imgs, support=5)
    res = cal.differentiable_calibrate(target, ej.machines.soft_els(imgs, support=5), noise, ts, init=1.0,
                                       iterations=None if optimizer == "auto" else 60, learning_rate=0.08,
                                       curve=curve, network_scales=truth, optimizer=optimizer)
    assert res.optimizer == ("adam" if optimizer == "adam" or curve == "quadratic" else "line_search")
    np.testing.assert_allclose(res.ells, truth, rtol=0.1 if res.optimizer == "adam" else 0.03)
    assert res.losses[-1] < 0.05 * res.losses[0]
    res.save(tmp_path / "soft.json")
    back = ScaleSchedule.load(tmp_path / "soft.json")
    assert back == res.schedule and back.kind == "width" and back.padding == "circular"
    assert back.options == {"support": 5, "window": "gaussian", "edge": 0.15}
    assert np.allclose(back.values, res.ells) and np.allclose(back.ts, ts)


def test_differentiable_errors(imgs, noise):
    soft = ej.machines.soft_els(imgs, support=3)
    hard = ej.machines.els(imgs)
    with pytest.raises(TypeError, match="soft-window"):
        cal.differentiable_calibrate(hard, hard, noise, [0.5, 0.0], network_scales=(3,))
    with pytest.raises(ValueError, match="init"):
        cal.differentiable_calibrate(soft, soft, noise, [0.5, 0.0], init=-1.0, network_scales=(1.0,))
    with pytest.raises(ValueError, match="batch"):
        cal.differentiable_calibrate(soft, soft, noise, [0.5, 0.0], batch=9, network_scales=(1.0,))
    with pytest.raises(ValueError, match="curve"):
        cal.differentiable_calibrate(soft, soft, noise, [0.5, 0.0], curve="cubic", network_scales=(1.0,))
    with pytest.raises(ValueError, match="optimizer"):
        cal.differentiable_calibrate(soft, soft, noise, [0.5, 0.0], optimizer="lbfgs", network_scales=(1.0,))
    with pytest.raises(ValueError, match="optimizer"):
        cal.differentiable_calibrate(soft, soft, noise, [0.5, 0.0], curve="quadratic", optimizer="line_search",
                                     network_scales=(1.0,))
    with pytest.raises(ValueError, match="iterations"):
        cal.differentiable_calibrate(soft, soft, noise, [0.5, 0.0], iterations=0, network_scales=(1.0,))


def test_hermite_argmin_and_line_search_on_known_functions():
    """The search finds the minimiser of smooth 1-D functions from values and slopes, keeps its best
    point, never leaves its bounds, and stops early where the slope vanishes or at a bound."""
    tau, value = cal._hermite_argmin(1.0, 1.0, -1.0, 1.0)  # symmetric: minimum in the middle, below 1
    assert tau == pytest.approx(0.5, abs=0.011) and value == pytest.approx(0.75, abs=1e-3)
    fs = [lambda u: (u - 0.7) ** 2, lambda u: np.cosh(u + 1.3), lambda u: -u, lambda u: 0.0 * u,
          lambda u: (u - 0.2) ** 4 + 0.3 * u, lambda u: 1 - np.exp(-(u - 1.5) ** 2 / 0.1)]
    gs = [lambda u: 2 * (u - 0.7), lambda u: np.sinh(u + 1.3), lambda u: -1.0 + 0 * u, lambda u: 0.0 * u,
          lambda u: 4 * (u - 0.2) ** 3 + 0.3, lambda u: 20 * (u - 1.5) * np.exp(-(u - 1.5) ** 2 / 0.1)]
    search = cal._LineSearch(np.zeros(len(fs)), lo=-3.0, hi=2.0)
    for _ in range(12):
        todo = search.pending()
        if not todo:
            break
        u = search.propose()
        search.update({i: (float(fs[i](u[i])), float(gs[i](u[i]))) for i in todo})
    assert search.best_u[0] == pytest.approx(0.7, abs=0.02)
    assert search.best_u[1] == pytest.approx(-1.3, abs=0.02)
    assert search.best_u[2] == 2.0 and search.done[2]  # pushed to the upper bound
    assert search.best_u[3] == 0.0 and search.done[3]  # flat: stops at once
    assert search.best_u[4] == pytest.approx(0.2 - (0.3 / 4) ** (1 / 3), abs=0.03)
    assert search.best_u[5] == pytest.approx(1.5, abs=0.05)  # a plateau (slope ~1e-8) before the valley
    assert np.all(search.best_f <= np.array([f(0.0) for f in fs]))


def test_schedule_file_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"ts": [0.5, 0.0], "ells": [1.0, 2.0], "support": 3}))
    with pytest.raises(ValueError, match="len"):
        ScaleSchedule.load(p)
    assert cal.calibration_times(2).tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="nsteps"):
        cal.calibration_times(0)


def test_calibration_gradient_equals_one_program_and_finite_differences(imgs, noise):
    """The per-step programs of the calibration give the gradient of the whole objective (one
    program over all steps at the same fixed sides), which matches finite differences in log ℓ."""
    m = ej.machines.soft_els(imgs, support=5)
    ts = [0.7, 0.4, 0.0]
    traj = cal.network_trajectory(m, noise, ts, scales=(1.5, 0.8))
    ells = np.array([1.2, 0.3])
    sides = [m.window_size(v) for v in ells]
    assert sides == [5, 3]  # two programs
    xs, targets, tt = traj.xs[:2], traj.x0s, jnp.asarray(ts[:2], jnp.float32)
    norms = np.asarray(jnp.mean(targets.reshape(2, 3, -1) ** 2, axis=(1, 2)))
    progs = cal._StepPrograms(m, False, {"prepare": 0.0, "compile": 0.0})
    vals, grads = zip(*(progs.value_and_grad(float(ells[i]), xs[i], targets[i], tt[i], norms[i], None)
                        for i in range(2)), strict=True)
    new = np.asarray(grads) * ells  # d loss / d log ℓ_i
    ready = m.prepare(sides=sides)

    def total(log_ells):  # the objective as one program (what the previous calibration step compiled)
        out = 0.0
        for i in range(2):
            x0 = ready.denoise_ell(xs[i], jnp.full((3,), tt[i]), None, jnp.exp(log_ells[i]), side=sides[i])
            out = out + jnp.mean((x0 - targets[i]) ** 2) / norms[i]
        return out

    log_ells = jnp.log(jnp.asarray(ells, jnp.float32))
    old = np.asarray(jax.jit(jax.grad(total))(log_ells))
    np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-7)
    assert float(np.sum(vals)) == pytest.approx(float(jax.jit(total)(log_ells)), rel=1e-5)
    h = 1e-2  # central differences in log ℓ, inside each step's side
    for i in range(2):
        e = jnp.zeros(2).at[i].set(h)
        fd = float((jax.jit(total)(log_ells + e) - jax.jit(total)(log_ells - e)) / (2 * h))
        assert new[i] == pytest.approx(fd, rel=2e-2, abs=1e-6)
    assert np.all(np.abs(new) > 1e-6)
