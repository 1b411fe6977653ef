"""EDM conversions, the EDM Euler/Heun samplers, DDPM and the diffrax ODE/SDE samplers."""

import jax
import numpy as np
import pytest

import ellsjax as ej

SCHEDULES = [ej.schedules.cosine_legacy(), ej.schedules.cosine(0.008), ej.schedules.linear(), ej.schedules.exponential()]


def setup(shape=(4, 4, 1), n=6, b=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, *shape)).astype(np.float32), rng.normal(size=(b, *shape)).astype(np.float32)


# ------------------------------------------------------------------------------------ conversions
@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.kind)
def test_edm_vp_conversions_round_trip(sched):
    t = np.linspace(0, 1, 41).astype(np.float32)
    sig = np.asarray(ej.edm.to_sigma(t, sched), np.float64)
    a, s = (np.asarray(v, np.float64) for v in sched(t))
    ok = a > 0
    np.testing.assert_allclose(sig[ok] * a[ok], s[ok], rtol=1e-5, atol=1e-7)  # σ = s/a
    back = np.asarray(ej.edm.to_time(sig[ok], sched))
    np.testing.assert_allclose(back, t[ok], atol=3e-6)
    lo, hi = ej.edm.sigma_range(sched)
    levels = np.geomspace(max(lo, 1e-3), min(hi, 1e3), 25).astype(np.float32)
    np.testing.assert_allclose(ej.edm.to_sigma(ej.edm.to_time(levels, sched), sched), levels, rtol=1e-4)
    # a and s depend on σ alone
    aa, ss = ej.edm.signal_noise(sig[ok])
    np.testing.assert_allclose(aa, a[ok], atol=1e-6)
    np.testing.assert_allclose(ss, s[ok], atol=1e-6)
    x = np.ones((2, 2, 2, 1), np.float32)
    np.testing.assert_allclose(ej.edm.from_edm(ej.edm.to_edm(x, [0.5, 3.0]), [0.5, 3.0]), x, rtol=1e-6)
    with pytest.raises(ValueError, match="sigma: values in"):
        ej.edm.to_time(hi * 1.01 if np.isfinite(hi) else -1.0, sched)


def test_karras_grid():
    sig = ej.edm.karras_sigmas(18)
    assert sig.shape == (19,) and sig[-1] == 0 and np.all(np.diff(sig) < 0)
    np.testing.assert_allclose(sig[[0, 17]], [80.0, 0.002], rtol=1e-6)
    i = 5
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sig[i], want, rtol=1e-6)
    # the paper's schedule spans σ ∈ [0, 80.2]: the whole EDM grid is a VP time grid for it
    assert 80 < ej.edm.sigma_range("cosine_legacy")[1] < 81
    ts = ej.edm.karras_times(18, "cosine_legacy")
    assert ts[-1] == 0 and np.all(np.diff(ts) < 0) and 0.99 < ts[0] < 1
    with pytest.raises(ValueError, match="sigma: values in"):  # σ = 0 lies below σ(0) > 0
        ej.edm.karras_times(18, ej.schedules.cosine(0.008))
    with pytest.raises(ValueError, match="n: need an integer"):
        ej.edm.karras_sigmas(1)
    with pytest.raises(ValueError, match="sigma_min, sigma_max"):
        ej.edm.karras_sigmas(5, sigma_min=2.0, sigma_max=1.0)


# ---------------------------------------------------------------------------------- ODE samplers
def gaussian_flow(m, x, t0, t1):
    """The exact PF-ODE map of the Wiener machine's Gaussian from t0 to t1 > 0 (per eigen-direction
    (x̃ − μ)_k scales as √(λ_k + σ²); outside the kept span as σ)."""
    sig0, sig1 = (float(ej.edm.to_sigma(t, m.schedule)) for t in (t0, t1))
    mu, u, lam = (np.asarray(v, np.float64) for v in (m.mean, m.basis, m.eigvals))
    xe = x.reshape(len(x), -1).astype(np.float64) * np.sqrt(1 + sig0**2) - mu
    y = xe @ u
    out = mu + (y * np.sqrt((lam + sig1**2) / (lam + sig0**2))) @ u.T + (xe - y @ u.T) * sig1 / sig0
    return (out / np.sqrt(1 + sig1**2)).reshape(x.shape)


def log_sigma_grid(sched, t0, t1, n):
    sig = np.exp(np.linspace(np.log(float(ej.edm.to_sigma(t0, sched))), np.log(float(ej.edm.to_sigma(t1, sched))), n))
    ts = np.array(ej.edm.to_time(sig, sched))
    ts[0], ts[-1] = t0, t1
    return ts


def test_ode_and_heun_follow_the_exact_gaussian_flow():
    imgs, x = setup((3, 3, 1), n=40, b=4)
    m = ej.machines.wiener(imgs)
    ts = np.array([0.8, 0.4, 0.05], np.float32)
    want = gaussian_flow(m, x, 0.8, 0.05)
    out, traj, stats = ej.samplers.ode(m, x, ts, rtol=1e-6, atol=1e-6, return_trajectory=True, return_stats=True)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(traj.xs[1], gaussian_flow(m, x, 0.8, 0.4), atol=1e-5)
    assert traj.xs.shape == (3, 4, 3, 3, 1) and traj.x0s.shape == (2, 4, 3, 3, 1) and stats["num_steps"] > 2
    np.testing.assert_allclose(traj.x0s[1], m.denoise(traj.xs[1], 0.4), atol=1e-5)
    fine = log_sigma_grid(m.schedule, 0.8, 0.05, 120)
    np.testing.assert_allclose(ej.samplers.heun(m, x, fine), want, atol=2e-4)


def test_ode_agrees_with_fine_heun_on_a_nonlinear_machine():
    # PSPC with a per-step patch size: scale 3 on [0.8, 0.4], then 4 (one full window: IS) to t = 0
    imgs, x = setup()
    m = ej.machines.pspc(imgs)
    out, traj = ej.samplers.ode(m, x, [0.8, 0.4, 0.0], scales=[3, 4], rtol=1e-6, atol=1e-6, return_trajectory=True)
    ref = ej.samplers.heun(m, x, log_sigma_grid(m.schedule, 0.8, 0.4, 100), scales=[3] * 99)
    np.testing.assert_allclose(traj.xs[1], ref, atol=1e-4)
    # the solve to the noise-free end returns a training image (IS memorizes)
    d = ((np.asarray(out)[:, None] - imgs[None]) ** 2).reshape(3, 6, -1).sum(-1)
    assert np.all(d.min(1) < 1e-5)


def test_euler_equals_ddim_and_heun_scale_convention():
    imgs, x = setup()
    m = ej.machines.pspc(imgs)
    ts = np.array([0.9, 0.6, 0.3, 0.0], np.float32)
    scales = [4, 2, 2]
    np.testing.assert_allclose(ej.samplers.euler(m, x, ts, scales=scales), ej.samplers.ddim(m, x, ts, scales=scales),
                               atol=2e-5)
    # Heun step by step: predictor at σ_i with scales[i], corrector at σ_{i+1} with scales[i+1]
    sig = np.asarray(ej.edm.to_sigma(ts, m.schedule), np.float64)
    xe = x * np.sqrt(1 + sig[0] ** 2)

    def den(xe, i, k):
        return np.asarray(m.denoise(xe / np.sqrt(1 + sig[i] ** 2), ts[i], scale=k), np.float64)

    for i in range(3):
        d = (xe - den(xe, i, scales[i])) / sig[i]
        xn = xe + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] > 0:
            d2 = (xn - den(xn, i + 1, scales[min(i + 1, 2)])) / sig[i + 1]
            xn = xe + (sig[i + 1] - sig[i]) * (d + d2) / 2
        xe = xn
    seen = []
    got = ej.samplers.heun(m, x, ts, scales=scales, progress=seen.append)
    np.testing.assert_allclose(got, xe, atol=3e-5)
    assert seen == [0, 1, 2]
    # the same grid given as EDM noise levels
    np.testing.assert_allclose(ej.samplers.heun(m, x, sigmas=sig.astype(np.float32), scales=scales), got, atol=3e-5)


# ------------------------------------------------------------------------------ stochastic samplers
def test_ddpm_steps_and_keys():
    imgs, x = setup()
    m = ej.machines.ideal(imgs)
    ts = np.array([0.9, 0.6, 0.3, 0.1], np.float32)
    ddpm = lambda **kw: ej.samplers.ddpm(m, x, ts, return_trajectory=True, **kw)[0]  # noqa: E731  (one compile)
    np.testing.assert_allclose(ddpm(key=0, eta=0.0), ej.samplers.ddim(m, x, ts), atol=2e-5)
    got, traj = ej.samplers.ddpm(m, x, ts, key=5, return_trajectory=True)
    # step by step: the posterior q(x_{t'} | x_t, x̂0), with the key's noise fold_in(key, i)
    y = x.astype(np.float64)
    for i in range(3):
        (ab0, v0), (ab1, v1) = (np.asarray(u, np.float64) for u in m.schedule.variances(ts[i])), \
            (np.asarray(u, np.float64) for u in m.schedule.variances(ts[i + 1]))
        x0 = np.asarray(m.denoise(y, ts[i]), np.float64)
        z = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(5), i), x.shape), np.float64)
        mean = np.sqrt(ab1) * (1 - ab0 / ab1) / v0 * x0 + np.sqrt(ab0 / ab1) * v1 / v0 * y  # Ho et al. eq. 7
        y = mean + np.sqrt(v1 / v0 * (1 - ab0 / ab1)) * z
        np.testing.assert_allclose(traj.xs[i + 1], y, atol=5e-5)
    np.testing.assert_allclose(got, y, atol=5e-5)
    np.testing.assert_array_equal(ddpm(key=jax.random.key(5)), got)
    assert np.abs(np.asarray(ddpm(key=6)) - np.asarray(got)).max() > 1e-3


def test_reverse_sde_samples_the_data_gaussian():
    # Wiener = the exact posterior mean of N(μ, Σ): started from that Gaussian's marginal at t0, the
    # reverse SDE (ShARK) must return samples of N(μ, Σ) (Monte Carlo tolerance, 3000 samples)
    rng = np.random.default_rng(3)
    imgs = rng.uniform(-1, 1, (30, 2, 2, 1)).astype(np.float32)
    m = ej.machines.wiener(imgs)
    mu, cov = np.asarray(m.mean, np.float64), (np.asarray(m.basis) * np.asarray(m.eigvals)) @ np.asarray(m.basis).T
    n, t0 = 3000, 0.9
    a, s = (float(v) for v in m.schedule(t0))
    x0 = rng.multivariate_normal(mu, cov, n)
    x = (a * x0 + s * rng.normal(size=x0.shape)).astype(np.float32).reshape(n, 2, 2, 1)
    ts = np.linspace(t0, 0.0, 21).astype(np.float32)
    y = np.asarray(ej.samplers.sde(m, x, ts, key=1, substeps=2), np.float64).reshape(n, -1)
    np.testing.assert_allclose(y.mean(0), mu, atol=0.03)
    np.testing.assert_allclose(np.cov(y.T), cov, atol=0.03)
    # the starting distribution is far from it: the test can tell
    assert np.abs(np.cov(x.reshape(n, -1).T) - cov).max() > 0.2


def test_sde_keys_labels_and_trajectory():
    imgs, x = setup((3, 3, 1), n=12)
    labels = np.repeat([0, 1, 2], 4)
    m = ej.machines.wiener(imgs, labels)
    ts = [0.8, 0.4, 0.0]

    def run(key, label):
        return ej.samplers.sde(m, x, ts, key=key, label=label, solver="euler", substeps=2, return_trajectory=True)

    out, traj = run(2, [0, 1, 2])
    assert traj.xs.shape == (3, 3, 3, 3, 1) and traj.x0s.shape == (2, 3, 3, 3, 1)
    np.testing.assert_array_equal(traj.xs[-1], out)
    np.testing.assert_allclose(traj.x0s[1], m.denoise(traj.xs[1], 0.4, label=[0, 1, 2]), atol=1e-5)
    np.testing.assert_array_equal(run(jax.random.key(2), [0, 1, 2])[0], out)
    assert np.abs(np.asarray(run(3, [0, 1, 2])[0]) - np.asarray(out)).max() > 1e-3
    assert np.abs(np.asarray(run(2, [2, 1, 0])[0]) - np.asarray(out)).max() > 1e-3  # labels reach the denoiser


# ------------------------------------------------------------------------------------ bad input
class TestBadInput:
    imgs, x = setup()
    m = ej.machines.ideal(imgs)

    def test_grids(self):
        with pytest.raises(ValueError, match="ts, sigmas: give exactly one grid"):
            ej.samplers.heun(self.m, self.x)
        with pytest.raises(ValueError, match="ts, sigmas: give exactly one grid"):
            ej.samplers.euler(self.m, self.x, [0.5, 0.0], sigmas=[1.0, 0.0])
        with pytest.raises(ValueError, match="sigmas: noise levels must be strictly decreasing"):
            ej.samplers.heun(self.m, self.x, sigmas=[1.0, 2.0])
        with pytest.raises(ValueError, match="sigmas: sigma: values in"):
            ej.samplers.heun(self.m, self.x, sigmas=[100.0, 0.0])
        with pytest.raises(ValueError, match="sigmas: contains NaN or inf"):
            ej.samplers.heun(self.m, self.x, sigmas=[np.inf, 0.0])
        with pytest.raises(ValueError, match="ts: times must be strictly decreasing"):
            ej.samplers.ode(self.m, self.x, [0.2, 0.5])
        mc = ej.machines.ideal(self.imgs, schedule=ej.schedules.linear(0.0, 1.0))  # a(1) = 0
        with pytest.raises(ValueError, match=r"ts: ts\[0\] has no signal"):
            ej.samplers.sde(mc, self.x, [1.0, 0.5], key=0)

    def test_options(self):
        with pytest.raises(ValueError, match="solver: unknown ODE solver 'rk4'"):
            ej.samplers.ode(self.m, self.x, [0.5, 0.0], solver="rk4")
        with pytest.raises(ValueError, match="solver: unknown SDE solver"):
            ej.samplers.sde(self.m, self.x, [0.5, 0.0], key=0, solver="milstein")
        with pytest.raises(ValueError, match="substeps: expected a positive int"):
            ej.samplers.sde(self.m, self.x, [0.5, 0.0], key=0, substeps=0)
        with pytest.raises(ValueError, match="rtol: expected a positive finite float"):
            ej.samplers.ode(self.m, self.x, [0.5, 0.0], rtol=0)
        with pytest.raises(ValueError, match="eta: expected a float in"):
            ej.samplers.ddpm(self.m, self.x, [0.5, 0.0], key=0, eta=1.5)
        with pytest.raises(TypeError, match="key: expected an int seed"):
            ej.samplers.ddpm(self.m, self.x, [0.5, 0.0], key="k")
        with pytest.raises(TypeError, match="denoiser"):
            ej.samplers.heun(lambda x, t: x, self.x, [0.5, 0.0])
        with pytest.raises(ValueError, match="scales: this denoiser needs"):
            ej.samplers.sde(ej.machines.pspc(self.imgs), self.x, [0.5, 0.0], key=0)
        with pytest.raises(ValueError, match="x_start: expected images of shape"):
            ej.samplers.ddpm(self.m, self.x[:, :2], [0.5, 0.0], key=0)
        with pytest.raises(ValueError, match="label: this machine was built without labels"):
            ej.samplers.ode(self.m, self.x, [0.5, 0.0], label=0)
