"""GoldDiff (published) and the PCA machine's certified search against the exact PCA-locality machine."""

import importlib

import numpy as np
import pytest

import ellsjax as ej
from ellsjax.machines.search import CertifiedSubset
from tests.conftest import load_script

gd = importlib.import_module("ellsjax.machines.golddiff")

SCHED = ej.schedules.ddpm_linear()


def bank(n=120, side=8, seed=0):
    imgs, _ = ej.data.load("mnist", source="bundled", limit=n + 3, image_size=side)
    imgs = np.asarray(imgs)
    return imgs[3:], imgs[:3]


def noised(x0, t, seed=0):
    a, s = (float(v) for v in SCHED(t))
    return (a * x0 + s * np.random.default_rng(seed).normal(size=x0.shape)).astype(np.float32)


@pytest.mark.parametrize("n,theta", [(60, 0.05), (90, 0.02)])
def test_certified_bound_holds_against_exact_pca(n, theta):
    imgs, x0 = bank(n)
    exact = ej.machines.pca(imgs, schedule=SCHED, threshold=theta)
    for tol in (0.0, 1e-3, 0.3):
        g = exact.with_search(CertifiedSubset(tol, chunk=8))
        for t in (0.02, 0.3, 0.9):
            x = noised(x0, t)
            ref = np.asarray(exact.denoise(x, t))
            out, bound = (np.asarray(v) for v in g.denoise_with_bound(x, t))
            err = np.abs(out - ref).max(-1)
            assert np.all(err <= bound + 2e-5), (tol, t, float((err - bound).max()))
            assert np.all(bound <= tol + 1e-7) or tol == 0
            if tol == 0:  # exact mode: the exact machine's result up to summation order
                assert err.max() <= 2e-5


def test_certified_skips_work_at_low_noise_and_not_at_high():
    # smooth random images: neighbourhoods of ~40 pixels, so at low noise the image nearest a query
    # owns every output's posterior, and the bounds see it
    z = np.random.default_rng(0).normal(size=(120, 8, 8, 1))
    for ax in (1, 2):
        z = 0.25 * np.roll(z, -1, axis=ax) + 0.5 * z + 0.25 * np.roll(z, 1, axis=ax)
    imgs = (z / np.abs(z).max()).astype(np.float32)
    exact = ej.machines.pca(imgs, schedule=SCHED, threshold=0.02)
    total = -(-imgs.shape[0] // 8)
    for tol in (0.05,):
        g = exact.with_search(CertifiedSubset(tol, chunk=8))
        x = noised(imgs[:2], 0.002)  # queries next to training images
        assert np.asarray(g.visited_chunks(x, 0.002)).max() == 1
        out, bound = g.denoise_with_bound(x, 0.002)
        assert float(np.abs(np.asarray(out) - np.asarray(exact.denoise(x, 0.002))).max()) <= max(tol, 2e-5)
    high = np.asarray(g.visited_chunks(noised(imgs[:2], 0.9), 0.9))
    assert high.min() == total


def test_published_mode_schedules_and_limits():
    n_pre, k_t = gd.subset_sizes(np.array([1.0, 0.5, 0.0]), 50000, 2500, 5000)
    np.testing.assert_array_equal(n_pre, [5000, 27500, 50000])
    np.testing.assert_array_equal(k_t, [5000, 3750, 2500])
    imgs, x0 = bank(60)
    x = noised(x0, 0.3)
    exact = ej.machines.pca(imgs, schedule=SCHED, threshold=0.05).denoise(x, 0.3)
    # a subset of everything is the exact machine
    full = ej.machines.golddiff(imgs, schedule=SCHED, threshold=0.05, k_min=60, k_max=60)
    np.testing.assert_allclose(full.denoise(x, 0.3), exact, atol=2e-5)
    # a real subset: deterministic per seed, random across seeds at high noise
    g0 = ej.machines.golddiff(imgs, schedule=SCHED, threshold=0.05, k_min=5, k_max=10, seed=0)
    g1 = ej.machines.golddiff(imgs, schedule=SCHED, threshold=0.05, k_min=5, k_max=10, seed=1)
    xh = noised(x0, 0.95)
    np.testing.assert_array_equal(g0.denoise(xh, 0.95), g0.denoise(xh, 0.95))
    assert float(np.abs(np.asarray(g0.denoise(xh, 0.95)) - np.asarray(g1.denoise(xh, 0.95))).max()) > 1e-3
    # the published machine bounds nothing: it has no such method (the certified search is PCA's)
    assert not hasattr(g0, "denoise_with_bound") and not hasattr(g0, "with_search")


def test_defaults_and_checks():
    imgs, _ = bank(40)
    g = ej.machines.golddiff(imgs)
    assert (g.k_min, g.k_max, g.proxy_side, g.threshold, g.pca.relative_to) == (2, 4, 4, 0.02, "global")
    assert gd.proxy_side_for(32, 16) == 16 and gd.proxy_side_for(28) == 14 and gd.proxy_side_for(32) == 16
    for kw, msg in [(dict(k_min=5, k_max=3), "k_min, k_max"), (dict(proxy_side=3), "proxy_side"),
                    (dict(threshold=2.0), "threshold")]:
        with pytest.raises(ValueError, match=msg):
            ej.machines.golddiff(imgs, **kw)
    for kw, msg in [(dict(tolerance=-1.0), "tolerance"), (dict(chunk=0), "chunk")]:
        with pytest.raises(ValueError, match=msg):
            CertifiedSubset(**kw)
    with pytest.raises(ValueError, match="proxy_side"):
        ej.machines.pca(imgs).with_search(CertifiedSubset(0.0, proxy_side=3))
    assert ej.machines.spec("golddiff").builder is ej.machines.golddiff


def test_conditional_certified_matches_class_pca():
    imgs, x0 = bank(60)
    labels = np.arange(60) % 3
    exact = ej.machines.pca(imgs, labels, schedule=SCHED, threshold=0.05)
    g = exact.with_search(CertifiedSubset(0.0, chunk=8))
    x, lab = noised(x0, 0.2), np.array([0, 2, 1])
    np.testing.assert_allclose(g.denoise(x, 0.2, label=lab), exact.denoise(x, 0.2, label=lab), atol=2e-5)


def test_pca_with_search_is_the_certified_mode():
    imgs, x0 = bank(60)
    m = ej.machines.pca(imgs, schedule=SCHED, threshold=0.05)
    s = m.with_search(CertifiedSubset(1e-2, chunk=8))
    assert isinstance(s, ej.machines.PCALocality) and s.search.tolerance == 1e-2 and s.threshold == m.threshold
    assert (s.search.chunk, s.search.k_max, s.search.proxy_side) == (8, 6, 4) and s.proxy.shape == (60, 16)
    x = noised(x0, 0.05)
    out, bound = (np.asarray(v) for v in s.denoise_with_bound(x, 0.05))
    err = np.abs(out - np.asarray(m.denoise(x, 0.05))).max(-1)
    assert np.all(err <= bound + 2e-5) and bound.max() <= 1e-2
    np.testing.assert_array_equal(out, np.asarray(s.denoise(x, 0.05)))  # one rule: denoise is the bounded estimate
    back = s.with_search(ej.machines.Exact())
    assert isinstance(back.search, ej.machines.Exact) and back.proxy is None
    # the exact machine itself: its own estimate, bound 0 (it scores every image)
    out, bound = (np.asarray(v) for v in m.denoise_with_bound(x, 0.05))
    np.testing.assert_array_equal(out, np.asarray(m.denoise(x, 0.05)))
    assert bound.shape == out.shape[:-1] and not bound.any()
    # a bank machine's search is refused, naming both
    with pytest.raises(TypeError, match="PCA-locality machine takes Exact"):
        m.with_search(ej.machines.TopK(1e-3))
    with pytest.raises(ValueError, match="visited_chunks reports the certified search"):
        m.visited_chunks(x, 0.05)


def test_certified_subset_oracle_sizes_against_brute_force():
    # scripts/certified_subset_oracle.py: k_m is the smallest prefix (≥ 1) of the weight order whose
    # complement U satisfies A/(1 + W_U) ≤ ε; checked by brute force on a tiny random problem
    oracle = load_script("certified_subset_oracle")
    rng = np.random.default_rng(0)
    n, d, eps = 12, 5, 0.05
    phi = rng.uniform(-1, 1, (n, d)).astype(np.float32)
    xt = rng.normal(size=d).astype(np.float32)
    mask = (rng.random((d, d)) < 0.6) | np.eye(d, dtype=bool)
    for inv_temp in (0.05, 2.0, 50.0):
        shared, union = oracle.oracle_sizes(phi, xt, mask.astype(np.float32), 0.8, inv_temp, eps)
        ks, sets = [], set()
        for m in range(d):
            logit = -inv_temp * ((xt[mask[m]][None] - 0.8 * phi[:, mask[m]]) ** 2).sum(1).astype(np.float64)
            w = np.exp(logit - logit.max())
            w /= w.sum()
            mean = w @ phi[:, m]
            order = np.argsort(-w, kind="stable")
            k = next((k for k in range(1, n + 1) if k == n or
                      (w[order[k:]] * np.abs(phi[order[k:], m] - mean)).sum() / (1 + w[order[k:]].sum()) <= eps), n)
            ks.append(k)
            sets |= set(order[:k].tolist())
        assert shared == max(ks) and union == len(sets), (inv_temp, shared, ks, union, len(sets))
    assert oracle.oracle_sizes(phi, xt, mask.astype(np.float32), 0.8, 1e4, eps)[0] == 1  # one image owns it
