"""The four machines against dense float64 references, and the properties the theory predicts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from ellsjax.machines.search import CertifiedSubset, Exact, TopK
from tests import _reference as R
from tests.conftest import unchecked_shapes

SCHED = ej.schedules.cosine_legacy()
BUILD = {
    "is": lambda im, lab=None, **kw: ej.machines.ideal(im, lab, **kw),
    "ls": lambda im, lab=None, **kw: ej.machines.local(im, lab, **kw),
    "els": lambda im, lab=None, **kw: ej.machines.els(im, lab, padding="circular", **kw),
    "bbels": lambda im, lab=None, **kw: ej.machines.els(im, lab, padding="zeros", **kw),
}
#: The per-call scale of a machine kind: IS has none (and refuses any).
def sc(kind, k):
    return None if kind == "is" else k


REF = {"is": R.ideal, "ls": R.local, "els": R.els, "bbels": R.bbels}
# Every kind once, the class-conditional path on two of them (each pair compiles its own programs;
# test_matches_dense_reference covers the full kind x conditional matrix against the references).
KIND_COND = pytest.mark.parametrize("kind,conditional", [("is", True), ("ls", False), ("els", False), ("bbels", True)])


def data(shape, n=6, b=3, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.uniform(-1, 1, (n, *shape)).astype(np.float32)
    x = rng.normal(size=(b, *shape)).astype(np.float32)
    return imgs, x


def ab(t):
    a, s = SCHED(jnp.asarray(t, jnp.float32))
    return np.asarray(a, np.float64), np.asarray(s, np.float64)


def run_ref(kind, imgs, x, t, k, labels=None, label=None):
    a, s = ab(t)
    extra = () if kind == "is" else (k,)
    if labels is None:
        return REF[kind](imgs, x, a, s, *extra)
    return R.conditional(REF[kind], imgs, labels, x, label, a, s, *extra)


@pytest.mark.parametrize("kind", ["is", "ls", "els", "bbels"])
@pytest.mark.parametrize("conditional", [False, True])
def test_matches_dense_reference(kind, conditional):
    # one non-square, multi-channel shape covers rows ≠ columns and channels in every window
    imgs, x = data((9, 10, 2))
    # one time per image. At smaller t float32 logits (error ~ u·√d·‖q‖‖k‖·a/s², u = 6e-8) no longer
    # resolve 1e-5 on random data, for this kernel and for a direct float32 evaluation alike; the
    # t → 0 limit is tested on resolvable pixels in test_consistency_condition_at_t0.
    t = np.array([0.25, 0.5, 1.0], np.float32)
    labels = np.array([0, 1, 0, 1, 2, 2]) if conditional else None
    label = np.array([2, 0, 1]) if conditional else None
    m = BUILD[kind](imgs, labels)
    for k in [1, 3, 5] if kind != "is" else [None]:
        got = np.asarray(m.denoise(x, t, scale=k, label=label))
        want = run_ref(kind, imgs, x, t, k, labels, label)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"{kind} k={k}")


def test_bbels_scale_at_least_image_is_local():
    imgs, x = data((8, 8, 1))
    for k in [9, 11]:
        bb = ej.machines.els(imgs, padding="zeros").denoise(x, 0.4, scale=k)
        ls = ej.machines.local(imgs).denoise(x, 0.4, scale=k)
        np.testing.assert_allclose(bb, ls, atol=1e-6)
    # the reference handles k >= size (=8 here) the same way
    np.testing.assert_allclose(
        ej.machines.els(imgs, padding="zeros").denoise(x, 0.4, scale=9), run_ref("bbels", imgs, x, np.full(3, 0.4), 9), atol=1e-5
    )


def test_bbels_interior_equals_els_interior():
    imgs, x = data((10, 10, 1))
    k, hk = 5, 2
    bb = np.asarray(ej.machines.els(imgs, padding="zeros").denoise(x, 0.3, scale=k))
    el = np.asarray(ej.machines.els(imgs).denoise(x, 0.3, scale=k))
    np.testing.assert_allclose(bb[:, hk:-hk, hk:-hk], el[:, hk:-hk, hk:-hk], atol=1e-6)
    assert np.abs(bb - el).max() > 1e-3  # the borders really differ


@KIND_COND
def test_chunked_equals_unchunked(kind, conditional):
    imgs, x = data((8, 8, 2), n=7)
    labels = np.array([0, 1, 0, 1, 0, 1, 1]) if conditional else None
    label = np.array([1, 0, 1]) if conditional else None
    whole = BUILD[kind](imgs, labels, chunk_size=7).denoise(x, 0.4, scale=sc(kind, 3), label=label)
    for c in [2, 3]:
        got = BUILD[kind](imgs, labels, chunk_size=c).denoise(x, 0.4, scale=sc(kind, 3), label=label)
        np.testing.assert_allclose(got, whole, atol=5e-6, err_msg=f"chunk_size={c}")
    # a memory budget too small for one image still works (one image per chunk)
    tiny = BUILD[kind](imgs, labels, memory_budget=1).denoise(x, 0.4, scale=sc(kind, 3), label=label)
    np.testing.assert_allclose(tiny, whole, atol=5e-6)


@pytest.mark.parametrize("kind", ["is", "ls", "els", "bbels"])
def test_jit_equals_no_jit_and_user_jit(kind):
    imgs, x = data((5, 5, 1), n=3)
    m = BUILD[kind](imgs)
    t = jnp.array([0.2, 0.6, 0.9])
    jitted = m.denoise(x, t, scale=sc(kind, 3))
    if kind in ("is", "els"):  # eager (op by op) once per code path: image bank, patch groups
        with jax.disable_jit():
            eager = m.denoise(x, t, scale=sc(kind, 3))
        np.testing.assert_allclose(jitted, eager, atol=1e-6)
    # the machine is a pytree: it can be an argument of the user's own jit (values still checked: test_jit_checks)
    user = jax.jit(lambda mm, xx, tt: mm.denoise(xx, tt, scale=sc(kind, 3)))(m, x, t)
    np.testing.assert_allclose(user, jitted, atol=1e-6)


@pytest.mark.parametrize("kind", ["is", "ls", "els", "bbels"])
def test_batched_equals_loop_and_vmap(kind):
    imgs, x = data((8, 8, 1), b=4)
    m = BUILD[kind](imgs)
    t = jnp.array([0.2, 0.4, 0.7, 1.0])
    batched = m.denoise(x, t, scale=sc(kind, 5))
    loop = jnp.concatenate([m.denoise(x[i : i + 1], t[i], scale=sc(kind, 5)) for i in range(4)])
    np.testing.assert_allclose(batched, loop, atol=5e-6)
    vm = jax.vmap(lambda xi, ti: m.denoise(xi[None], ti, scale=sc(kind, 5))[0])(x, t)
    np.testing.assert_allclose(vm, loop, atol=5e-6)


@pytest.mark.parametrize("conditional", [False, True])
def test_els_is_shift_equivariant(conditional):
    imgs, x = data((9, 11, 2), b=2)
    labels = np.array([0, 1, 0, 1, 1, 0]) if conditional else None
    m = ej.machines.els(imgs, labels)
    lab = 1 if conditional else None
    out = m.denoise(x, 0.35, scale=5, label=lab)
    for shift in [(1, 0), (3, 5), (-2, 7)]:
        shifted = m.denoise(jnp.roll(x, shift, axis=(1, 2)), 0.35, scale=5, label=lab)
        np.testing.assert_allclose(shifted, jnp.roll(out, shift, axis=(1, 2)), atol=1e-5)


def test_bbels_is_not_shift_equivariant():
    imgs, x = data((9, 9, 1), b=1)
    m = ej.machines.els(imgs, padding="zeros")
    out = m.denoise(x, 0.35, scale=5)
    shifted = m.denoise(jnp.roll(x, (2, 3), axis=(1, 2)), 0.35, scale=5)
    assert np.abs(shifted - jnp.roll(out, (2, 3), axis=(1, 2))).max() > 1e-3


def test_local_with_huge_window_equals_ideal():
    imgs, x = data((7, 9, 2))
    for k in [2 * 9 - 1, 2 * 9 + 5]:
        ls = ej.machines.local(imgs).denoise(x, [0.2, 0.5, 0.9], scale=k)
        is_ = ej.machines.ideal(imgs).denoise(x, [0.2, 0.5, 0.9])
        np.testing.assert_allclose(ls, is_, atol=1e-5)


def test_ideal_at_small_t_returns_nearest_training_image():
    imgs, _ = data((8, 8, 1), n=10)
    rng = np.random.default_rng(3)
    a, s = ab(0.02)
    target = imgs[[3, 7]]
    x_t = a * target + s * rng.normal(size=target.shape).astype(np.float32)
    np.testing.assert_allclose(ej.machines.ideal(imgs).denoise(x_t, 0.02), target, atol=1e-5)
    np.testing.assert_allclose(ej.machines.ideal(imgs).denoise(target, 0.0), target, atol=0)


def _nearest_centers(imgs, x, k, mode):
    """float64 nearest bank patch per pixel (ELS bank), and the gap to the second nearest."""
    n, h, w, ch = imgs.shape
    hk = k // 2
    pos = [(r, c) for r in range(hk, h - hk) for c in range(hk, w - hk)]
    wins = [R.windows(im, k, "zeros") for im in imgs]
    keys = np.array([wi[r, c].ravel() for wi in wins for (r, c) in pos])
    vals = np.array([im[r, c] for im in imgs for (r, c) in pos])
    xw = R.windows(x, k, mode).reshape(h, w, -1)
    d2 = ((xw[:, :, None, :] - keys[None, None]) ** 2).sum(-1)
    order = np.sort(d2, axis=-1)
    return vals[d2.argmin(-1)], order[..., 1] - order[..., 0]


@pytest.mark.parametrize("k", [3, 5])
def test_consistency_condition_at_t0(k):
    """Theorem 4.1: as t → 0 each ELS output pixel is the center of the l2-nearest bank patch."""
    imgs, x = data((8, 8, 1), b=2, seed=5)
    m = ej.machines.els(imgs)
    for t in [0.0, 1e-3]:
        out = np.asarray(m.denoise(x, t, scale=k))
        for b in range(2):
            centers, gap = _nearest_centers(imgs, x[b], k, "circular")
            ok = gap > 1e-3  # pixels whose nearest patch float32 can resolve
            assert ok.mean() > 0.9
            np.testing.assert_allclose(out[b][ok], centers[ok], atol=1e-5 if t == 0 else 1e-4)


@pytest.mark.parametrize("kind", ["is", "ls", "els", "bbels"])
def test_finite_over_whole_time_range(kind):
    imgs, x = data((8, 8, 1))
    m = BUILD[kind](imgs)
    for t in np.linspace(0, 1, 11):
        assert np.all(np.isfinite(m.denoise(x, t, scale=sc(kind, 3))))
        if t > 0:
            assert np.all(np.isfinite(m.score(x, t, scale=sc(kind, 3))))
            assert np.all(np.isfinite(m.eps(x, t, scale=sc(kind, 3))))
    with pytest.raises(ValueError, match="t: the score diverges"):
        m.score(x, 0.0, scale=sc(kind, 3))
    # t = 1 for a schedule with a(1) = 0 returns the bank mean (the softmax is uniform)
    m1 = BUILD[kind](imgs, schedule=ej.schedules.cosine(0.008))
    out = np.asarray(m1.denoise(x, 1.0, scale=sc(kind, 1)))
    assert np.all(np.isfinite(out))
    if kind == "els":
        np.testing.assert_allclose(out, np.full_like(out, imgs.mean()), atol=1e-5)


def test_score_and_eps_relations():
    imgs, x = data((8, 8, 1))
    m = ej.machines.els(imgs)
    t = 0.4
    a, s = ab(t)
    x0 = np.asarray(m.denoise(x, t, scale=3), np.float64)
    np.testing.assert_allclose(m.score(x, t, scale=3), (a * x0 - x) / s**2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.eps(x, t, scale=3), (x - a * x0) / s, rtol=1e-5, atol=1e-5)


def test_other_schedules_match_reference():
    imgs, x = data((8, 8, 1))
    for sched in [ej.schedules.linear(), ej.schedules.exponential(), ej.schedules.cosine()]:
        m = ej.machines.els(imgs, padding="zeros", schedule=sched)
        a, s = (np.asarray(v, np.float64) for v in sched(jnp.full((3,), 0.5)))
        np.testing.assert_allclose(m.denoise(x, 0.5, scale=3), R.bbels(imgs, x, a, s, 3), atol=1e-5)


class TestBadInput:
    imgs, x = data((8, 8, 1))

    @pytest.mark.parametrize("k", [0, -3, 4, 2.0, "3", True])
    def test_bad_scale(self, k):
        with pytest.raises((TypeError, ValueError), match="scale"):
            ej.machines.els(self.imgs).denoise(self.x, 0.5, scale=k)

    def test_missing_scale(self):
        with pytest.raises(ValueError, match="scale"):
            ej.machines.local(self.imgs).denoise(self.x, 0.5)

    def test_scale_larger_than_image_for_els(self):
        with pytest.raises(ValueError, match="scale: patch size 9 is larger"):
            ej.machines.els(self.imgs).denoise(self.x, 0.5, scale=9)

    def test_wrong_rank_channels_dtype(self):
        with unchecked_shapes():  # the library's own errors, not the annotations' check
            m = ej.machines.els(self.imgs)
            with pytest.raises(ValueError, match="x_t: expected rank 4"):
                m.denoise(self.x[0], 0.5, scale=3)
            with pytest.raises(ValueError, match="x_t: expected images of shape"):
                m.denoise(np.zeros((1, 8, 8, 3), np.float32), 0.5, scale=3)
            with pytest.raises(TypeError, match="x_t: expected a floating-point"):
                m.denoise(np.zeros((1, 8, 8, 1), np.uint8), 0.5, scale=3)
            with pytest.raises(TypeError, match="images: expected a floating-point"):
                ej.machines.els((self.imgs * 100).astype(np.int32))
            with pytest.raises(ValueError, match="images: expected rank 4"):
                ej.machines.ideal(self.imgs[0])

    def test_nan_inputs(self):
        bad = self.x.copy()
        bad[0, 1, 1, 0] = np.nan
        with pytest.raises(ValueError, match="x_t: contains NaN"):
            ej.machines.els(self.imgs).denoise(bad, 0.5, scale=3)
        imgs = self.imgs.copy()
        imgs[2, 0, 0, 0] = np.inf
        with pytest.raises(ValueError, match="images: contains NaN or inf"):
            ej.machines.local(imgs)

    @pytest.mark.parametrize("t", [-0.1, 1.5, np.nan, [0.5, 0.5]])
    def test_bad_t(self, t):
        with pytest.raises(ValueError, match="t: "):
            ej.machines.ideal(self.imgs).denoise(self.x, t)

    def test_labels(self):
        with unchecked_shapes():  # the library's own errors, not the annotations' check
            labels = np.array([0, 0, 1, 1, 3, 3])
            m = ej.machines.els(self.imgs, labels)
            with pytest.raises(ValueError, match=r"label: no training images of class \[2\]"):
                m.denoise(self.x, 0.5, scale=3, label=2)
            with pytest.raises(ValueError, match=r"label: no training images of class \[7\]"):
                m.denoise(self.x, 0.5, scale=3, label=[0, 1, 7])
            with pytest.raises(ValueError, match="label: this machine was built without labels"):
                ej.machines.els(self.imgs).denoise(self.x, 0.5, scale=3, label=0)
            with pytest.raises(ValueError, match="labels: expected shape"):
                ej.machines.els(self.imgs, labels[:3])
            with pytest.raises(ValueError, match="labels: class ids must be >= 0"):
                ej.machines.els(self.imgs, -labels)
            with pytest.raises(TypeError, match="labels: expected integer"):
                ej.machines.els(self.imgs, labels.astype(float))

    def test_bad_padding_and_options(self):
        with pytest.raises(ValueError, match="padding"):
            ej.machines.els(self.imgs, padding="reflect")
        with pytest.raises(ValueError, match="chunk_size"):
            ej.machines.els(self.imgs, chunk_size=0)
        with pytest.raises(ValueError, match="schedule: unknown"):
            ej.machines.els(self.imgs, schedule="quadratic")


def _dup_data():
    imgs, x = data((8, 8, 2), n=7)
    imgs[3] = imgs[1]  # a duplicated image
    imgs[:, :4, :4] = -1.0  # shared background: many identical windows
    return imgs, x


@KIND_COND
def test_prebuilt_deduplicated_banks_equal_streamed_images(kind, conditional):
    imgs, x = _dup_data()
    labels = np.array([0, 1, 0, 1, 0, 1, 1]) if conditional else None
    label = np.array([1, 0, 1]) if conditional else None
    m = BUILD[kind](imgs, labels)
    lazy = BUILD[kind](imgs, labels, bank_budget=1)  # too small: windows gathered from the images
    t = jnp.array([0.3, 0.6, 1.0])
    for k in [3, 5]:
        assert not lazy.prepare((sc(kind, k),), conditional=conditional).banks
        ready = m.prepare((sc(kind, k),), conditional=conditional)
        assert ready.banks
        want = lazy.denoise(x, t, scale=sc(kind, k), label=label)
        # same math; float32 rounding differs (c·exp(l) vs c separate terms, GEMM blocking)
        np.testing.assert_allclose(ready.denoise(x, t, scale=sc(kind, k), label=label), want, atol=1e-5)
        # chunking of the prebuilt bank (3 does not divide the bank: a ragged last chunk)
        chunked = BUILD[kind](imgs, labels, chunk_size=3).prepare((sc(kind, k),), conditional=conditional)
        assert chunked.banks
        np.testing.assert_allclose(chunked.denoise(x, t, scale=sc(kind, k), label=label), want, atol=1e-5)


@pytest.mark.parametrize("kind,conditional", [("els", False), ("bbels", True)])
def test_streamed_packed_groups_match_reference(kind, conditional):
    # 12x12, k=3: 100 bank positions per image, enough for the streamed path's packed layout (one
    # gather of windows and window norms); chunks of 2 of 5 images leave a padded last chunk
    imgs, x = data((12, 12, 2), n=5, b=2)
    labels = np.array([0, 1, 1, 0, 1]) if conditional else None
    label = np.array([1, 0]) if conditional else None
    m = BUILD[kind](imgs, labels, bank_budget=1, chunk_size=2)
    assert not m.prepare((3,), conditional=conditional).banks
    t = np.array([0.3, 0.7], np.float32)
    got = np.asarray(m.denoise(x, t, scale=3, label=label))
    np.testing.assert_allclose(got, run_ref(kind, imgs, x, t, 3, labels, label), atol=1e-5)


@pytest.mark.parametrize("kind,prebuilt", [("els", True), ("bbels", False)])
def test_large_batches_stream_in_query_tiles(kind, prebuilt):
    # 12 images of 12x12: 1200-1728 queries per group, too many for chunks of >= 512 bank entries in
    # a 4 MiB budget, so the queries are streamed in tiles; same result
    imgs, x = data((12, 12, 1), n=5, b=12)
    mq = 12 * (100 if kind == "bbels" else 144)
    assert ej.machines.base.query_tile(4 * 2**20, 1, mq, 12, 2) is not None
    m = BUILD[kind](imgs, memory_budget=4 * 2**20, **({} if prebuilt else {"bank_budget": 1}))
    t = np.linspace(0.2, 1.0, 12).astype(np.float32)
    np.testing.assert_allclose(m.denoise(x, t, scale=3), run_ref(kind, imgs, x, t, 3), atol=1e-5)


def test_bank_deduplication_counts_are_exact():
    imgs, _ = _dup_data()
    m = ej.machines.els(imgs).prepare((3,))
    bank = m.banks["k3"]["all"]
    counts_all = np.asarray(bank.vv)[0, 0, :, 0]
    present = counts_all > 0
    counts = counts_all[present]
    np.testing.assert_array_equal(counts, np.round(counts))
    assert round(counts.sum()) == 7 * 6 * 6  # every interior window of every image, counted once
    assert present.sum() < 7 * 6 * 6  # and duplicates were merged
    keys_t = np.asarray(bank.keys_t)[0, 0]
    keys = keys_t[:-1].T[present]
    np.testing.assert_allclose(keys_t[-1][present], (keys**2).sum(1), rtol=1e-6)  # |k|^2 row
    assert np.all(keys_t[-1][~present] == ej.kernel.PAD_SQ_NORM) and len(present) % 8 == 0  # padding
    assert len(np.unique(keys, axis=0)) == len(keys)
    # the background window (-1 everywhere) is among the most frequent
    bg = np.all(keys == -1.0, axis=1)
    assert bg.sum() == 1 and counts[bg][0] >= 7 * 2 * 2


def test_prepare_returns_a_machine_carrying_its_banks():
    # banks are an explicit value: prepare returns a new machine, the original is unchanged, banks
    # accumulate on the returned machine and nothing already carried is rebuilt
    imgs, x = _dup_data()
    m = ej.machines.els(imgs, padding="zeros")
    p1 = m.prepare((3, 5))
    assert p1 is not m and not m.banks and set(p1.banks) == {"k3", "k5"}
    assert p1.prepare((5, 3)) is p1  # nothing new to build
    p2 = m.prepare((3,)).prepare((5,))
    assert set(p2.banks) == {"k3", "k5"}
    assert "_bank_memo" not in vars(m) and "_bank_memo" not in vars(p1)
    np.testing.assert_allclose(p1.denoise(x, 0.5, scale=5), m.denoise(x, 0.5, scale=5), atol=1e-6)


@KIND_COND
def test_approximate_search_stays_within_its_bound(kind, conditional):
    imgs, _ = _dup_data()
    labels = np.array([0, 1, 0, 1, 0, 1, 1]) if conditional else None
    label = np.array([1, 0]) if conditional else None
    m = BUILD[kind](imgs, labels)
    rng = np.random.default_rng(1)
    for t in [0.1, 0.5]:
        a, s = ab(t)
        x = (a * imgs[[1, 2]] + s * rng.normal(size=imgs[:2].shape)).astype(np.float32)
        exact = np.asarray(m.denoise(x, t, scale=sc(kind, 3), label=label))
        for scoring in ["float32", "bfloat16"]:
            s = m.with_search(TopK(1e-3, k=8, scoring=scoring)).prepare((sc(kind, 3),), conditional=conditional)
            x0, bound = s.denoise_with_bound(x, t, scale=sc(kind, 3), label=label)
            err = np.abs(np.asarray(x0) - exact).max(-1)
            assert np.all(err <= np.asarray(bound) + 2e-5), (t, scoring, float(err.max()))
            assert np.asarray(bound).max() <= 1e-3
            # one rule: denoise returns exactly the estimate whose bound denoise_with_bound states
            np.testing.assert_array_equal(np.asarray(s.denoise(x, t, scale=sc(kind, 3), label=label)), np.asarray(x0))


def test_approximate_search_options():
    imgs, x = _dup_data()
    m = ej.machines.els(imgs)
    with pytest.raises(ValueError, match="tolerance: TopK needs a finite tolerance > 0"):
        TopK(0.0)
    with pytest.raises(ValueError, match="k: expected a positive int"):
        TopK(1e-3, k=0)
    with pytest.raises(ValueError, match="scoring"):
        TopK(1e-3, scoring="int8")
    assert isinstance(m.with_search(TopK(1e-3)).with_search(Exact()).search, Exact)
    with pytest.raises(TypeError, match="search: expected a search strategy"):
        m.with_search(1e-3)
    with pytest.raises(TypeError, match="CertifiedSubset is not a search of EquivariantLocalScore"):
        m.with_search(CertifiedSubset(1e-3))
    # no prebuilt bank (unprepared, or too large to prebuild): the exact streamed path, bound 0
    for lazy in (ej.machines.els(imgs, bank_budget=1).with_search(TopK(1e-6)).prepare((3,)),
                 m.with_search(TopK(1e-6))):
        assert not lazy.banks
        x0, bound = lazy.denoise_with_bound(x, 0.3, scale=3)
        np.testing.assert_allclose(x0, m.denoise(x, 0.3, scale=3), atol=1e-5)
        assert not np.asarray(bound).any()
    # the exact search: its own estimate, bound 0
    x0, bound = m.prepare((3,)).denoise_with_bound(x, 0.3, scale=3)
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(m.prepare((3,)).denoise(x, 0.3, scale=3)))
    assert not np.asarray(bound).any()


@pytest.mark.parametrize("kind", ["els", "bbels"])
def test_conditional_batches_stream_image_by_image(kind):
    # a budget too small for the batch's chunks to keep >= 512 entries: each image streams its own
    # class bank in turn (lax.map); same result as the dense reference
    imgs, x = data((8, 8, 1), n=6, b=4)
    labels = np.array([0, 1, 0, 1, 1, 0])
    label = np.array([0, 1, 1, 0], np.int32)
    budget = 4 * 2**10
    m = BUILD[kind](imgs, labels, memory_budget=budget)
    t = np.array([0.3, 0.5, 0.7, 0.9], np.float32)
    np.testing.assert_allclose(m.denoise(x, t, scale=3, label=label), run_ref(kind, imgs, x, t, 3, labels, label),
                               atol=1e-5)
