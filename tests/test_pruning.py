"""Pruned streaming (block bounds): same results as the exact pass, and a bound that holds."""

import jax
import numpy as np
import pytest

import ellsjax as ej
from ellsjax.machines.search import Exact, Pruned
from tests import _reference as R
from tests.conftest import load_script

SCHED = ej.schedules.cosine_legacy()


def noisy(imgs, idx, t, seed=0):
    a, s = (float(v) for v in SCHED(t))
    rng = np.random.default_rng(seed)
    return (a * imgs[idx] + s * rng.normal(size=imgs[idx].shape)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    imgs, labels = ej.data.load("mnist", limit=60, image_size=12)
    return imgs, labels


@pytest.mark.parametrize("kind,conditional", [("els", False), ("bbels", True), ("is", False), ("ls", False)])
def test_exact_pruning_equals_the_exact_pass(data, kind, conditional):
    imgs, labels = data
    lab = labels if conditional else None
    label = labels[[2, 5]] if conditional else None
    k = None if kind == "is" else 5
    base = ej.machines.build(kind, imgs, lab)
    exact = base.prepare((k,), conditional=conditional)
    pruned = base.with_search(Pruned(0.0, block=16, tile=8)).prepare((k,), conditional=conditional)
    if kind != "ls":  # LS groups have one bank per pixel: they stream exactly
        assert next(iter(pruned.banks.values()))[next(iter(pruned.banks[next(iter(pruned.banks))]))].blocks is not None
    for t in [1.0, 0.6, 0.3, 0.1, 0.02, 0.0]:
        x = noisy(imgs, [2, 5], t)
        want = np.asarray(exact.denoise(x, t, scale=k, label=label))
        got = np.asarray(pruned.denoise(x, t, scale=k, label=label))
        # same entries up to float32: the block order changes the summation order only
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"t={t}")


@pytest.mark.parametrize("kind", ["els", "is"])
def test_tolerance_mode_bound_holds(data, kind):
    imgs, _ = data
    k = None if kind == "is" else 3
    m = ej.machines.build(kind, imgs).with_search(Pruned(1e-3, block=16, tile=8)).prepare((k,))
    ref64 = (lambda x, t: R.ideal(imgs, x, *ab(t))) if kind == "is" else (lambda x, t: R.els(imgs, x, *ab(t), k))
    for t in [0.5, 0.2, 0.05]:
        x = noisy(imgs, [1, 4], t, seed=3)
        x0, bound = m.denoise_with_bound(x, t, scale=k)
        want = ref64(x, np.full(2, t, np.float32))
        err = np.abs(np.asarray(x0, np.float64) - want).max(-1)
        exact32 = np.asarray(ej.machines.build(kind, imgs).prepare((k,)).denoise(x, t, scale=k), np.float64)
        rounding = np.abs(exact32 - want).max(-1)
        assert np.all(err <= np.asarray(bound) + rounding + 1e-6), (t, float(err.max()), float(np.max(bound)))
        assert np.all(np.asarray(bound) <= 1e-3 + 1e-9)


def ab(t):
    a, s = SCHED(np.asarray(t, np.float32))
    return np.asarray(a, np.float64), np.asarray(s, np.float64)


def test_pruned_sampler_and_options(data):
    imgs, _ = data
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 1))
    ts = [0.9, 0.5, 0.2, 0.0]
    base = ej.machines.bbels(imgs)
    want = ej.samplers.ddim(base, x, ts, scales=[5, 3, 3])
    got = ej.samplers.ddim(base.with_search(Pruned(0.0, block=32)), x, ts, scales=[5, 3, 3])
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert isinstance(base.with_search(Pruned()).with_search(Exact()).search, Exact)
    with pytest.raises(ValueError, match="block: must be a power of two"):
        Pruned(0.0, block=24)
    with pytest.raises(ValueError, match="tolerance: Pruned needs a finite tolerance >= 0"):
        Pruned(-1.0)


def test_pruning_headroom_script_orders_its_fractions():
    # scripts/pruning_headroom.py: entries within the margin ≤ blocks holding one ≤ blocks the bound
    # cannot rule out (≤ 1), on a tiny bank; its own assert checks every bound against the block's best logit
    headroom = load_script("pruning_headroom")
    imgs, _ = ej.data.load("mnist", source="bundled", limit=21, image_size=8)
    imgs = np.asarray(imgs)
    rows = headroom.headroom(imgs[:20], imgs[20], 3, [0.05, 0.5], [8, 32], [104.0, 27.0], 16)
    assert [r["t"] for r in rows] == [0.05, 0.5]
    for r in rows:
        for mg in ("104", "27"):
            e = r[f"entries_within_{mg}"]
            for b in (8, 32):
                assert 0 < e <= r[f"blocks{b}_true_within_{mg}"] <= r[f"blocks{b}_bound_within_{mg}"] <= 1
    assert rows[0]["entries_within_104"] < rows[1]["entries_within_104"]  # more noise, more entries count


def test_exact_pruning_skips_the_far_cluster():
    # two tight clusters of 16 training images (near +0.5 and near -0.5); IS keys are whole images,
    # blocks of 4 split the clusters into 4 + 4 blocks. Queries near the first cluster at s ≈ 0.08:
    # the far blocks' scores lie ~τ·a²·‖Δ‖² ≈ 1300 below the maximum (far past the 104 of float32
    # underflow), the near ones within a few units: exactly half of the blocks are visited
    rng = np.random.default_rng(3)
    base = np.where(np.arange(32) < 16, 0.5, -0.5)[:, None, None, None]
    imgs = (base + 0.01 * rng.normal(size=(32, 4, 4, 1))).astype(np.float32)
    x = noisy(imgs, [0, 1], 0.05)
    exact = ej.machines.ideal(imgs).denoise(x, 0.05)
    pruned = ej.machines.ideal(imgs).with_search(Pruned(0.0, block=4, tile=2)).prepare()
    ej.machines._pruning.visit_log = []
    try:
        got = pruned.denoise(x, 0.05)
        jax.effects_barrier()
        visits = ej.machines._pruning.visit_log
    finally:
        ej.machines._pruning.visit_log = None
    np.testing.assert_allclose(np.asarray(got), np.asarray(exact), atol=1e-6)
    assert visits == [0.5], visits
