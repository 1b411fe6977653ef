"""PSPC, Wiener, PCA locality and σ-CFDM against dense float64 references, and their special cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from tests import _reference as R

SCHED = ej.schedules.cosine_legacy()
T = np.array([0.25, 0.5, 1.0], np.float32)  # float32 logits resolve 1e-5 here (see test_machines)


def data(shape, n=6, b=3, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.uniform(-1, 1, (n, *shape)).astype(np.float32)
    x = rng.normal(size=(b, *shape)).astype(np.float32)
    return imgs, x


def ab(t):
    a, s = SCHED(jnp.asarray(t, jnp.float32))
    return np.asarray(a, np.float64), np.asarray(s, np.float64)


LABELS = np.array([0, 1, 0, 1, 2, 2])
LABEL = np.array([2, 0, 1])


# ------------------------------------------------------------------------------------------- PSPC
@pytest.mark.parametrize(
    "shape,conditional,ks",
    [((5, 4, 2), False, [2, 4]), ((5, 4, 2), True, [3])],  # even sizes included; 4 = the full width
)
def test_pspc_matches_reference(shape, conditional, ks):
    imgs, x = data(shape)
    m = ej.machines.pspc(imgs, LABELS if conditional else None)
    a, s = ab(T)
    for k in ks:
        got = m.denoise(x, T, scale=k, label=LABEL if conditional else None)
        if conditional:
            want = R.conditional(R.pspc, imgs, LABELS, x, LABEL, a, s, k)
        else:
            want = R.pspc(imgs, x, a, s, k)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"k={k}")


def test_pspc_one_window_is_ideal_score():
    imgs, x = data((4, 4, 1))
    got = ej.machines.pspc(imgs).denoise(x, T, scale=4)
    np.testing.assert_allclose(got, ej.machines.ideal(imgs).denoise(x, T), atol=1e-6)


def test_pspc_low_noise_returns_a_training_patch_average():
    # at t -> 0 every window picks its nearest training window: a training image is a fixed point
    imgs, _ = data((4, 4, 1))
    got = ej.machines.pspc(imgs).denoise(imgs[:3], 0.0, scale=3)
    np.testing.assert_allclose(got, imgs[:3], atol=1e-6)


def test_pspc_scale_checks():
    imgs, x = data((6, 5, 1))
    m = ej.machines.pspc(imgs)
    assert m.needs_scale and m.check_scale(np.int64(4)) == 4
    with pytest.raises(ValueError, match="scale: PSPC needs a patch size"):
        m.denoise(x, 0.5)
    with pytest.raises(ValueError, match=r"scale: PSPC windows must fit in the 6x5 image: need 1 <= k <= 5, got 6"):
        m.denoise(x, 0.5, scale=6)
    with pytest.raises(ValueError, match="got 0"):
        m.denoise(x, 0.5, scale=0)
    with pytest.raises(TypeError, match="scale: expected an int"):
        m.denoise(x, 0.5, scale=True)
    with pytest.raises(TypeError, match="scale: expected an int"):
        m.denoise(x, 0.5, scale=2.0)
    # the sampler reports the failing step
    with pytest.raises(ValueError, match=r"scales\[1\]: scale: PSPC windows"):
        ej.samplers.ddim(m, x, [0.9, 0.5, 0.0], scales=[3, 7])
    assert len(ej.machines.PSPC_CIFAR10_SCALES) == len(ej.edm.karras_sigmas(18)) - 1


# ----------------------------------------------------------------------------------------- Wiener
@pytest.mark.parametrize("ddof", [0, 1])
def test_wiener_is_the_gaussian_posterior_mean(ddof):
    # N > D and N < D take different decompositions (eigh of the covariance / SVD of the data)
    for n, shape in [(40, (3, 3, 1)), (6, (4, 4, 1))]:
        imgs, x = data(shape, n=n)
        a, s = ab(T)
        got = ej.machines.wiener(imgs, ddof=ddof).denoise(x, T)
        np.testing.assert_allclose(got, R.wiener(imgs, x, a, s, ddof=ddof), atol=2e-5, rtol=0, err_msg=f"n={n}")


def test_wiener_on_gaussian_data_is_bayes_optimal():
    # data drawn from a known Gaussian: with many samples the machine approaches the true posterior
    # mean E[x0 | x_t] of N(mu, cov), which the empirical machine cannot do on a small set
    rng = np.random.default_rng(1)
    d = 4
    mu = np.array([0.3, -0.2, 0.1, 0.0])
    lmat = rng.normal(size=(d, d)) * 0.4
    cov = lmat @ lmat.T + 0.05 * np.eye(d)
    imgs = rng.multivariate_normal(mu, cov, size=100_000).astype(np.float32).reshape(-1, 2, 2, 1)
    x = rng.normal(size=(3, 2, 2, 1)).astype(np.float32)
    a, s = ab(T)
    m = ej.machines.wiener(imgs, image_range=None)  # Gaussian samples, not images in [-1, 1]
    got = m.denoise(x, T)
    np.testing.assert_allclose(got, R.gaussian_posterior_mean(mu, cov, x, a, s), atol=2e-2)
    # and it is the posterior mean: the average of x0 over a thin slab of x_t around a point
    x0 = imgs.reshape(-1, d).astype(np.float64)
    aa, ss = ab(np.array([0.6]))
    xt = aa[0] * x0 + ss[0] * rng.normal(size=x0.shape)
    near = np.linalg.norm(xt - xt[0], axis=1) < 0.7
    est = np.asarray(m.denoise(xt[near].reshape(-1, 2, 2, 1).astype(np.float32), 0.6))
    resid = x0[near] - est.reshape(-1, d)
    assert near.sum() > 400 and np.all(np.abs(resid.mean(0)) < 4 * resid.std(0) / np.sqrt(near.sum()) + 1e-3)


def test_wiener_rank_and_limits():
    imgs, x = data((3, 3, 1), n=30)
    full = ej.machines.wiener(imgs)
    low = ej.machines.wiener(imgs, rank=2)
    mu, cov = R.moments(imgs, 0)
    lam, u = np.linalg.eigh(cov)
    cov2 = (u[:, -2:] * lam[-2:]) @ u[:, -2:].T  # the top-2 covariance
    a, s = ab(T)
    # the top-2 Gaussian: in the span the posterior mean, off it the mean (no variance there)
    np.testing.assert_allclose(low.denoise(x, T), R.gaussian_posterior_mean(mu, cov2, x, a, s), atol=2e-5)
    # t -> 0 on training data: the projection of x onto the data's affine span (here all of R^9)
    np.testing.assert_allclose(full.denoise(imgs[:2], 0.0), imgs[:2], atol=1e-4)
    # a(1) = 0 (cosine schedule): the mean
    m1 = ej.machines.wiener(imgs, schedule=ej.schedules.cosine())
    np.testing.assert_allclose(m1.denoise(x, 1.0), np.broadcast_to(imgs.mean(0), x.shape), atol=1e-5)


def test_wiener_conditional_uses_class_moments():
    imgs, x = data((3, 3, 1), n=12)
    labels = np.repeat([0, 1, 2], 4)
    m = ej.machines.wiener(imgs, labels)
    a, s = ab(T)
    got = m.denoise(x, T, label=LABEL)
    want = R.conditional(R.wiener, imgs, labels, x, LABEL, a, s)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(m.denoise(x, T), R.wiener(imgs, x, a, s), atol=2e-5)  # label=None: all images
    with pytest.raises(ValueError, match="ddof: class 2 has 1 image"):
        ej.machines.wiener(imgs[:9], np.array([0, 0, 0, 0, 1, 1, 1, 1, 2]), ddof=1)
    with pytest.raises(ValueError, match="rank: expected a positive int"):
        ej.machines.wiener(imgs, rank=0)


# ---------------------------------------------------------------------------------- PCA locality
def mask_margin(imgs, t, threshold, relative_to, ddof=1):
    """Smallest relative distance of a Wiener entry to its threshold (float32 masks can flip below ~1e-5)."""
    _, cov = R.moments(imgs, ddof)
    out = []
    for tt in np.atleast_1d(t):
        a, _ = ab(tt)
        wm = np.abs(R.wiener_matrix(cov, a**2))
        if relative_to == "row":
            ref = threshold * wm.max(1, keepdims=True)
        else:
            wm = np.abs(wm / np.diag(wm)[:, None])
            ref = threshold * wm.max()
        out.append(np.min(np.abs(wm - ref) / np.maximum(ref, 1e-12)))
    return min(out)


@pytest.mark.parametrize("relative_to,threshold", [("row", 0.15), ("global", 0.05), (None, 0.05)])
def test_pca_matches_reference(relative_to, threshold):
    imgs, x = data((4, 4, 1))
    kw = {} if relative_to is None else {"relative_to": relative_to}
    relative_to = relative_to or "global"  # the default is the authors' release's rule
    assert mask_margin(imgs, T, threshold, relative_to) > 1e-4  # float32 resolves every mask entry
    m = ej.machines.pca(imgs, threshold=threshold, chunk_size=4, **kw)
    a, s = ab(T)
    got = m.denoise(x, T)
    want = R.pca(imgs, x, a, s, threshold, relative_to)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # a batch at one t (the samplers' case) takes the one-mask path: same as image by image
    t1 = np.full(3, T[1], np.float32)
    a1, s1 = ab(t1)
    np.testing.assert_allclose(m.denoise(x, t1), R.pca(imgs, x, a1, s1, threshold, relative_to), atol=1e-5, rtol=0)
    # the neighbourhoods really are local: some entries read only part of the image
    nb = ej.machines.pca_neighbourhoods(m.basis, m.eigvals, 0.5, threshold=threshold, relative_to=relative_to)
    assert 0 < float(nb.mean()) < 1


def test_pca_conditional_and_temperature():
    imgs, x = data((4, 4, 1))
    assert mask_margin(imgs, T, 0.25, "row") > 1e-4
    m = ej.machines.pca(imgs, LABELS, threshold=0.25, temperature=2.0, relative_to="row")
    a, s = ab(T)
    got = m.denoise(x, T, label=LABEL)
    want = np.concatenate([
        R.pca(imgs[LABELS == LABEL[b]], x[b : b + 1], a[b : b + 1], s[b : b + 1], 0.25, temperature=2.0, stats_images=imgs)
        for b in range(3)
    ])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_pca_threshold_zero_is_ideal_score():
    imgs, x = data((4, 4, 1))
    for rule in ("global", "row"):
        np.testing.assert_allclose(ej.machines.pca(imgs, threshold=0.0, relative_to=rule).denoise(x, T),
                                   ej.machines.ideal(imgs).denoise(x, T), atol=2e-6)


def test_pca_options_checked():
    imgs, _ = data((4, 4, 1))
    for kw, msg in [(dict(threshold=1.5), "threshold: expected"), (dict(relative_to="col"), "relative_to: must be"),
                    (dict(temperature=0.0), "temperature: expected"), (dict(ddof=-1), "ddof: expected")]:
        with pytest.raises(ValueError, match=msg):
            ej.machines.pca(imgs, **kw)


# ----------------------------------------------------------------------------------------- σ-CFDM
@pytest.mark.parametrize("conditional", [False, True])
def test_cfdm_matches_reference(conditional):
    imgs, x = data((4, 4, 1))
    m = ej.machines.cfdm(imgs, LABELS if conditional else None, sigma=0.3, num_noise=3, key=7, chunk_size=4)
    noise = np.asarray(m.noise, np.float64)
    a, s = ab(T)
    got = m.denoise(x, T, label=LABEL if conditional else None)
    if conditional:
        want = np.concatenate([R.cfdm(imgs[LABELS == LABEL[b]], x[b : b + 1], a[b : b + 1], s[b : b + 1], 0.3, noise)
                               for b in range(3)])
    else:
        want = R.cfdm(imgs, x, a, s, 0.3, noise)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_cfdm_sigma_zero_is_ideal_score_and_noise_is_keyed():
    imgs, x = data((4, 4, 1))
    np.testing.assert_allclose(ej.machines.cfdm(imgs, sigma=0.0).denoise(x, T), ej.machines.ideal(imgs).denoise(x, T),
                               atol=1e-6)
    m1 = ej.machines.cfdm(imgs, sigma=0.3, num_noise=3, key=3)
    m2 = ej.machines.cfdm(imgs, sigma=0.3, num_noise=3, key=jax.random.key(3))
    np.testing.assert_array_equal(m1.noise, m2.noise)
    np.testing.assert_array_equal(m1.denoise(x, T), m2.denoise(x, T))
    m3 = m1.resample(4)
    assert m3.noise.shape == m1.noise.shape and not np.allclose(m3.noise, m1.noise)
    assert np.abs(np.asarray(m3.denoise(x, T)) - np.asarray(m1.denoise(x, T))).max() > 1e-4
    with pytest.raises(ValueError, match="sigma: expected a finite float >= 0"):
        ej.machines.cfdm(imgs, sigma=-0.1)
    with pytest.raises(ValueError, match="num_noise: expected a positive int"):
        ej.machines.cfdm(imgs, num_noise=0)
    with pytest.raises(TypeError, match="key: expected an int seed"):
        ej.machines.cfdm(imgs, key="a")


@pytest.mark.parametrize("sched", [ej.schedules.cosine_legacy(), ej.schedules.linear(0.0, 1.0), ej.schedules.exponential()])
def test_cfdm_time_map(sched):
    t = np.array([0.0, 0.1, 0.5, 0.9], np.float32)
    tau = np.asarray(ej.machines.cfdm_time(t, sched), np.float64)
    a, s = (np.asarray(v, np.float64) for v in sched(t))
    # same signal-to-noise ratio: tau/(1 - tau) = a/s, and z = x_t/(a+s) has coefficients (tau, 1 - tau)
    np.testing.assert_allclose(tau * (a + s), a, atol=1e-6)
    np.testing.assert_allclose((1 - tau) * (a + s), s, atol=1e-6)
    assert tau[0] == 1.0 and np.all(np.diff(tau) < 0)
    np.testing.assert_allclose(ej.machines.from_cfdm_time(tau, sched), t, atol=2e-5)
    with pytest.raises(ValueError, match="tau: σ-CFDM times must lie in"):
        ej.machines.from_cfdm_time(0.0, sched)


# ------------------------------------------------------------------------------- shared behaviour
EXTRA = {
    "pspc": (dict(), 3),
    "wiener": (dict(), None),
    "pca": (dict(threshold=0.1), None),
    "cfdm": (dict(sigma=0.2, num_noise=2), None),
}


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_registry_chunking_jit_and_batching(name):
    opts, k = EXTRA[name]
    imgs, x = data((4, 4, 1))
    assert ej.machines.MACHINES[name] is getattr(ej.machines, name)
    m = ej.machines.build(name, imgs, **opts)
    whole = m.denoise(x, T, scale=k)
    if name != "wiener":  # streamed machines: chunking does not change the result
        got = ej.machines.build(name, imgs, chunk_size=4, **opts).denoise(x, T, scale=k)
        np.testing.assert_allclose(got, whole, atol=5e-6)
    if name == "cfdm":  # the perturbations are shared, not tied to batch positions
        np.testing.assert_allclose(m.denoise(x[1:2], T[1], scale=k), whole[1:2], atol=5e-6)
    # a pytree: the user's own jit (values checked there too: tests/test_jit_checks.py)
    user = jax.jit(lambda mm, xx, tt: mm.denoise(xx, tt, scale=k))(m, x, jnp.asarray(T))
    np.testing.assert_allclose(user, whole, atol=1e-6)
    # score / eps follow from x̂0; the noise-free end gives finite x̂0 and raises for the score
    a, s = (np.asarray(v)[:, None, None, None] for v in SCHED(T))
    np.testing.assert_allclose(m.score(x, T, scale=k), (a * whole - x) / s**2, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(m.denoise(x, 0.0, scale=k))))
    with pytest.raises(ValueError, match="t: the score diverges"):
        m.score(x, 0.0, scale=k)
    with pytest.raises(ValueError, match="label: this machine was built without labels"):
        m.denoise(x, 0.5, scale=k, label=1)
