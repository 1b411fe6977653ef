"""Provenance (kernel statistics, machines, replay), creativity measures, figures and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from ellsjax import cli, explain, kernel
from tests.conftest import unchecked_shapes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- kernel: provenance statistics against a dense float64 softmax ---------------------------------------------


def _dense(q, keys, counts, a, tau):
    """Per-copy weights p_j = e^{z_j}/Σ c e^z; argmax, max weight, entropy over the original patches."""
    d2 = ((q[..., :, None, :].astype(np.float64) - a[..., None, None] * keys[..., None, :, :]) ** 2).sum(-1)
    if np.isinf(tau):
        near = d2 == d2.min(-1, keepdims=True)
        z = np.where(near, 0.0, -np.inf)
    else:
        z = -d2 * tau
    e = np.exp(z - z.max(-1, keepdims=True))
    p = e / (counts[..., None, :] * e).sum(-1, keepdims=True)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return z.argmax(-1), p.max(-1), -(counts[..., None, :] * plogp).sum(-1)


def _chunked(bank, ids, c, packed):
    n = bank.keys.shape[-2]

    def fn(i):
        idx = jnp.minimum(i * c + jnp.arange(c), n - 1)
        ok = i * c + jnp.arange(c) < n
        take = lambda x: jnp.take(x, idx, axis=1)  # noqa: E731
        b = kernel.Bank(take(bank.keys), take(bank.values), jnp.where(ok, take(bank.log_count), -jnp.inf), take(bank.sq_norm))
        return (kernel.pack_bank(b) if packed else b), take(ids)

    return fn, -(-n // c)


@pytest.mark.parametrize("packed,tile", [(True, None), (False, 3)])
def test_provenance_stats_match_dense_softmax(packed, tile):
    rng = np.random.default_rng(1)
    g, m, n, d = 2, 7, 29, 5
    q = rng.normal(size=(g, m, d)).astype(np.float32)
    keys = rng.normal(size=(g, n, d)).astype(np.float32)
    counts = rng.integers(1, 6, size=(g, n)).astype(np.float32)  # deduplicated entries (and single ones)
    a, tau = np.full((g, m), 0.8, np.float32), np.full((g, m), 0.6, np.float32)
    queries = kernel.Queries(jnp.asarray(q), jnp.asarray(a), jnp.asarray(tau))
    bank = kernel.make_bank(keys, rng.normal(size=(g, n, 2)).astype(np.float32), log_count=np.log(counts))
    ids = jnp.asarray(np.arange(n, dtype=np.int32)[None].repeat(g, 0) + 1000)
    fn, nch = _chunked(bank, ids, 6, packed)

    @jax.jit
    def run(queries):
        mean, stats = kernel.streaming_softmax(queries, fn, nch, provenance=True, query_tile=tile)
        plain, _ = kernel.streaming_softmax(queries, lambda i: fn(i)[0], nch)
        return mean, plain, kernel.summarize_provenance(stats, queries.inv_temp)

    mean, plain, p = run(queries)
    best, wmax, ent = _dense(q, keys, counts, a, 0.6)
    np.testing.assert_array_equal(np.asarray(p.ids), best + 1000)
    np.testing.assert_allclose(np.asarray(p.weight), wmax, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(p.entropy), ent, rtol=1e-5, atol=1e-5)
    # the means are those of the plain pass
    np.testing.assert_allclose(np.asarray(mean), np.asarray(plain), rtol=1e-6, atol=1e-6)


def test_merge_across_devices_matches_dense():
    # merge_across over a vmapped axis (the collectives of shard_map) of 3 bank slices
    rng = np.random.default_rng(3)
    n, d = 12, 4
    q = rng.normal(size=(1, 5, d)).astype(np.float32)
    keys = rng.normal(size=(1, n, d)).astype(np.float32)
    keys[0, 7] = keys[0, 2]  # an exact tie across slices: the lower id wins
    counts = rng.integers(1, 4, size=(1, n)).astype(np.float32)
    queries = kernel.Queries(jnp.asarray(q), jnp.full((1, 5), 0.9), jnp.full((1, 5), 0.5))
    bank = kernel.make_bank(keys, keys[..., :1], log_count=np.log(counts))
    parts = jax.tree.map(lambda x: jnp.stack(jnp.split(x, 3, axis=1)), bank)
    ids = jnp.arange(n).reshape(1, 3, 4).transpose(1, 0, 2)

    def per_device(b, i):
        return kernel.merge_across(kernel.chunk_stats(queries, b, i), queries.inv_temp, "dev")

    st = jax.jit(jax.vmap(per_device, axis_name="dev"))(parts, ids)
    p = kernel.summarize_provenance(jax.tree.map(lambda x: x[0], st), queries.inv_temp)
    best, wmax, ent = _dense(q, keys, counts, np.full((1, 5), 0.9), 0.5)
    np.testing.assert_array_equal(np.asarray(p.ids), best)
    np.testing.assert_allclose(np.asarray(p.weight), wmax, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p.entropy), ent, rtol=1e-5, atol=1e-5)


def test_dedup_counts_equal_duplicated_entries():
    # entropy over the original patches: an entry of count c is c copies of the patch
    rng = np.random.default_rng(2)
    keys = rng.normal(size=(4, 3)).astype(np.float32)
    counts = np.array([1, 3, 2, 1])
    q = kernel.Queries(jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), jnp.ones(5) * 0.9, jnp.ones(5) * 0.7)
    deduped = kernel.make_bank(keys, keys[:, :1], log_count=np.log(counts.astype(np.float32)))
    dup = kernel.make_bank(np.repeat(keys, counts, 0), np.repeat(keys, counts, 0)[:, :1])
    origin = np.repeat(np.arange(4), counts)

    @jax.jit
    def run(q, b1, b2):
        _, s1 = kernel.streaming_softmax(q, lambda i: (b1, jnp.arange(4)), 1, provenance=True)
        _, s2 = kernel.streaming_softmax(q, lambda i: (b2, jnp.asarray(origin)), 1, provenance=True)
        return kernel.summarize_provenance(s1, q.inv_temp), kernel.summarize_provenance(s2, q.inv_temp)

    p1, p2 = run(q, deduped, dup)
    np.testing.assert_array_equal(np.asarray(p1.ids), np.asarray(p2.ids))
    np.testing.assert_allclose(np.asarray(p1.entropy), np.asarray(p2.entropy), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p1.weight), np.asarray(p2.weight), rtol=1e-5)


def test_zero_noise_limit_and_large_jumps_of_the_max():
    # s = 0: uniform over the nearest copies (weight 1/S, entropy log S); the first chunk's entries are
    # far, so the running max jumps by ~1e4 on the second chunk
    keys = np.array([[5.0, 5.0], [4.0, 4.0], [0.1, 0.0], [0.1, 0.0], [0.1, 0.0]], np.float32)
    bank = kernel.make_bank(keys, keys[:, :1])
    ids = jnp.arange(5)
    fn, nch = _chunked(kernel.Bank(*(x[None] for x in bank)), ids[None], 2, False)
    tau = jnp.array([[np.inf, 1e4]], jnp.float32)  # two queries: s = 0 and a small s
    q = kernel.Queries(jnp.zeros((1, 2, 2)), jnp.ones((1, 2)), tau)
    p = jax.jit(lambda q: kernel.summarize_provenance(
        kernel.streaming_softmax(q, fn, nch, provenance=True)[1], q.inv_temp))(q)
    np.testing.assert_array_equal(np.asarray(p.ids), [[2, 2]])  # the first of the three nearest
    np.testing.assert_allclose(np.asarray(p.weight), [[1 / 3, 1 / 3]], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p.entropy), [[np.log(3)] * 2], rtol=1e-4)


def test_bank_fn_must_return_pairs_and_stats_must_agree():
    q = kernel.Queries(jnp.zeros((1, 2)), jnp.ones(1), jnp.ones(1))
    bank = kernel.make_bank(jnp.ones((3, 2)), jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="bank_fn"):
        kernel.streaming_softmax(q, lambda i: bank, 1, provenance=True)
    _, plain = kernel.streaming_softmax(q, lambda i: bank, 1)
    with pytest.raises(ValueError, match="stats"):
        kernel.summarize_provenance(plain, q.inv_temp)
    with_p = kernel.chunk_stats(q, bank, jnp.arange(3))
    with pytest.raises(ValueError, match="merge_stats"):
        kernel.merge_stats(plain, with_p, q.inv_temp)


# -- machines and replay -----------------------------------------------------------------------------------


def _flat_images(values, size=8):
    return jnp.stack([jnp.full((size, size, 1), v, jnp.float32) for v in values])


@pytest.mark.parametrize("name", ["els", "bbels", "ls", "is"])
def test_provenance_names_the_right_constant_image(name):
    values = (-0.9, -0.3, 0.3, 0.9)
    m = ej.machines.build(name, _flat_images(values))
    x = jnp.stack([jnp.full((8, 8, 1), 0.28), jnp.full((8, 8, 1), -0.85)])  # near images 2 and 0
    sc = None if name == "is" else 3
    x0, p = jax.jit(lambda x: m._denoise_provenance(x, jnp.full((2,), 0.02), None, sc))(x)
    np.testing.assert_array_equal(np.asarray(p.image[0]), 2)
    np.testing.assert_array_equal(np.asarray(p.image[1]), 0)
    np.testing.assert_allclose(np.asarray(x0), np.asarray(m.denoise(x, 0.02, scale=sc)), atol=1e-6)
    # at small t one source image carries all the weight; the constant image's patches are all
    # equal, so the weight spreads uniformly over that image's patches of the bank
    rows = np.asarray(p.row)
    if name == "is":
        np.testing.assert_allclose(np.asarray(p.weight), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(p.entropy), 0.0, atol=1e-5)
        np.testing.assert_array_equal(rows[0], np.arange(8)[:, None].repeat(8, 1))
    elif name == "ls":  # one window per image at the pixel itself
        np.testing.assert_allclose(np.asarray(p.weight), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(p.entropy), 0.0, atol=1e-4)
    elif name == "els":  # 6x6 interior patches of image 2, all equal: weight 1/36, entropy log 36
        np.testing.assert_allclose(np.asarray(p.weight), 1 / 36, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(p.entropy), np.log(36), rtol=1e-4)
        assert rows.min() >= 1 and rows.max() <= 6  # centers of patches lying inside the image


def test_weight_concentrates_as_noise_vanishes_on_random_data():
    imgs = jax.random.uniform(jax.random.key(0), (5, 8, 8, 1), minval=-1, maxval=1)
    m = ej.machines.bbels(imgs)
    x = jnp.concatenate([imgs[3:4]] * 2)  # a training image: at small t each pixel's own patch wins
    _, p = jax.jit(lambda x: m._denoise_provenance(x, jnp.array([0.01, 0.6]), None, 3))(x)
    lo, hi = (jax.tree.map(lambda v, i=i: v[i : i + 1], p) for i in (0, 1))
    np.testing.assert_array_equal(np.asarray(lo.image), 3)
    rr, cc = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    np.testing.assert_array_equal(np.asarray(lo.row[0]), rr)
    np.testing.assert_array_equal(np.asarray(lo.col[0]), cc)
    assert float(lo.weight.min()) > 0.99 and float(lo.entropy.max()) < 0.05
    assert float(hi.entropy.mean()) > 1.0 and float(hi.weight.mean()) < 0.5


@pytest.mark.parametrize("name", ["bbels", "els"])
def test_provenance_positions_on_non_square_images(name):
    # 6x10 images; the query is a mosaic: columns 0-4 from training image 1, 5-9 from image 4. At
    # small t every pixel whose 3x3 window lies in one half draws from that image at its own
    # position, so (image, row, col) are known there; row and col decode with the width, 10
    imgs = jax.random.uniform(jax.random.key(4), (5, 6, 10, 1), minval=-1, maxval=1)
    x = jnp.concatenate([imgs[1:2, :, :5], imgs[4:5, :, 5:]], axis=2)
    m = ej.machines.build(name, imgs, padding="zeros") if name == "els" else ej.machines.build(name, imgs)
    _, p = jax.jit(lambda x: m._denoise_provenance(x, jnp.array([0.01]), None, 3))(x)
    rr, cc = np.meshgrid(np.arange(6), np.arange(10), indexing="ij")
    clear = np.abs(cc - 4.5) > 1  # windows away from the seam (columns 0-3 and 6-9)
    if name == "els":  # zero-padded ELS: its bank holds interior windows only (centers 1..4, 1..8)
        clear &= (rr >= 1) & (rr <= 4) & (cc >= 1) & (cc <= 8)
    np.testing.assert_array_equal(np.asarray(p.image[0])[clear], np.where(cc < 5, 1, 4)[clear])
    np.testing.assert_array_equal(np.asarray(p.row[0])[clear], rr[clear])
    np.testing.assert_array_equal(np.asarray(p.col[0])[clear], cc[clear])
    assert float(p.weight[0][clear].min()) > 0.99


def test_conditional_replay_and_bad_arguments():
    # (the CLI test checks that an unconditional replay reproduces `ellsjax sample`'s ddim samples)
    imgs = jax.random.uniform(jax.random.key(2), (6, 8, 8, 1), minval=-1, maxval=1)
    labels = np.array([0, 1, 0, 1, 0, 1])
    m = ej.machines.els(imgs, labels, padding="zeros")
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
    ts, scales = [0.3, 0.0], [3]
    p = explain.provenance(m, x, ts, scales=scales, label=[0, 1])
    # the last step's x̂0 is the sample (a(0) = 1, s(0) = 0) and is the class-restricted posterior mean
    np.testing.assert_allclose(np.asarray(p.samples), np.asarray(p.x0s[-1]), atol=1e-6)
    assert p.image.shape == (1, 2, 8, 8) and p.scales == (3,)
    assert set(np.unique(p.image[:, 0]).tolist()) <= {0, 2, 4}  # class 0 only
    assert set(np.unique(p.image[:, 1]).tolist()) <= {1, 3, 5}
    with pytest.raises(ValueError, match="denoiser"):
        explain.provenance(ej.machines.wiener(imgs), x, ts)
    with pytest.raises(ValueError, match="scales"):
        explain.provenance(m, x, ts, scales=[3, 3], label=0)


# -- creativity measures -------------------------------------------------------------------------------------


def test_creativity_measures_on_known_cases():
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1, 1, (6, 8, 8, 1)).astype(np.float32)
    copy = imgs[4:5] + 0.001
    # a mosaic: left half of image 0, right half of image 1 (every patch from the training set
    # except those straddling the seam)
    mosaic = np.concatenate([imgs[0:1, :, :4], imgs[1:2, :, 4:]], axis=2)
    r = explain.creativity(np.concatenate([copy, mosaic]), imgs, patch_size=3)
    assert r["nearest"][0] == 4 and r["near_copy"].tolist() == [True, False]
    assert r["nn_rms"][0] < 2e-3 and r["nn_rms"][1] > 0.2
    assert r["patch_rms"][0] < 5e-3 and 0 < r["patch_rms"][1] < r["nn_rms"][1]
    assert r["consistency"][0] == 1.0
    # pixels whose window does not straddle the seam (columns 0-2, 5-7) keep their own patch
    assert r["consistency"][1] >= 6 / 8
    # one pixel pushed by 0.5: its own patch stays the nearest, whose center it no longer equals;
    # its neighbours' nearest patch is still their own, whose center they equal
    poked = imgs[2:3].copy()
    poked[0, 3, 4, 0] += 0.5 if poked[0, 3, 4, 0] < 0 else -0.5
    np.testing.assert_allclose(explain.consistency(poked, ej.machines.bbels(imgs), scale=3), [63 / 64])
    # tolerance: a 0.01 shift breaks equality of every pixel at 2/255
    shifted = explain.consistency(imgs[:1] + 0.01, ej.machines.bbels(imgs), scale=3)
    loose = explain.consistency(imgs[:1] + 0.01, ej.machines.bbels(imgs), scale=3, tolerance=0.02)
    assert shifted[0] == 0.0 and loose[0] == 1.0
    with pytest.raises(ValueError, match="tolerance"):
        explain.consistency(imgs[:1], ej.machines.bbels(imgs), scale=3, tolerance=-1)
    with pytest.raises(ValueError, match="patch_size"):
        explain.patch_distance(imgs[:1], imgs, patch_size=9)


def test_mosaic_stats():
    m = np.zeros((2, 4, 4), np.int32)
    m[1, :2] = 5
    m[1, 3, 3] = 5  # a separate region of image 5
    r = explain.mosaic_stats(m)
    assert r["sources"].tolist() == [1, 2] and r["regions"].tolist() == [1, 3]
    np.testing.assert_allclose(r["region_size"], [16.0, 16 / 3])
    # low-weight pixels have no source: sample 1 row 3 split the zeros; sample 0 loses everything
    w = np.ones((2, 4, 4))
    w[0] = 0.2
    w[1, 2, :] = 0.1
    r = explain.mosaic_stats(m, w)
    assert r["sources"].tolist() == [0, 2] and r["regions"].tolist() == [0, 3]
    np.testing.assert_allclose(r["region_size"], [0.0, 12 / 3])
    np.testing.assert_allclose(r["attributed"], [0.0, 12 / 16])
    with pytest.raises(ValueError, match="image_map"), unchecked_shapes():
        explain.mosaic_stats(np.zeros((4, 4)))


def test_compare_is_memorizes_and_els_mixes():
    # (shapes as in test_creativity_measures_on_known_cases: its compiled measures are reused)
    imgs = jax.random.uniform(jax.random.key(4), (6, 8, 8, 1), minval=-1, maxval=1)
    ms = {"is": ej.machines.ideal(imgs), "els": ej.machines.els(imgs)}
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
    table = explain.compare(ms, x, [0.9, 0.6, 0.3, 0.1, 0.0], scales=[3, 3, 3, 3])
    assert table["is"]["near_copy"] == 1.0 and table["is"]["sources"] == 1.0
    assert table["els"]["sources"] > 1.0 and table["els"]["nn_rms"] > table["is"]["nn_rms"]
    text = explain.format_table(table)
    assert text.splitlines()[0].split()[:3] == ["machine", "nn_rms", "nn_ratio"] and len(text.splitlines()) == 3


# -- figures and CLI ----------------------------------------------------------------------------------------


def test_figure_is_a_valid_png(tmp_path):
    import matplotlib.image

    imgs = _flat_images((-0.9, 0.0, 0.9))
    x = jax.random.normal(jax.random.key(6), (2, 8, 8, 1))
    p = explain.provenance(ej.machines.els(imgs), x, [0.5, 0.1, 0.0], scales=[3, 3])
    path = explain.plot_provenance(p, imgs, tmp_path / "p.png", top=2)
    assert path.read_bytes()[:8] == PNG_MAGIC
    pic = matplotlib.image.imread(path)
    assert pic.ndim == 3 and pic.shape[0] > 50 and pic.shape[1] > 200
    with pytest.raises(ValueError, match="step"):
        explain.plot_provenance(p, imgs, tmp_path / "q.png", step=5)


def test_cli_explain_replays_a_sample_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["sample", "--n-train", "6", "--image-size", "8", "--num-samples", "2", "--steps", "2",
                     "--scales", "3", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["explain", "--samples", str(out / "samples.npz"), "--top", "2", "--compare", "is,bbels"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "machine" in text and "is " in text
    for stage in ("loading 6 mnist training images", "replaying 2 samples of bbels", "creativity measures",
                  "sampling is from the same noise", "writing"):  # a line per stage (issue 26)
        assert stage in captured.err, captured.err
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file, no lock left
    assert (out / "provenance.png").read_bytes()[:8] == PNG_MAGIC
    rep = json.loads((out / "creativity.json").read_text())
    assert rep["replay_max_abs_diff"] < 1e-3 and len(rep["per_sample"]["consistency"]) == 2
    assert set(rep["compare"]) == {"is", "bbels"} and rep["compare"]["is"]["sources"] == 1.0
    with np.load(out / "provenance.npz") as z:
        assert z["image"].shape == (1, 2, 8, 8)
    with pytest.raises(SystemExit, match="--samples"):
        cli.main(["explain", "--samples", str(tmp_path / "missing.npz")])
    with pytest.raises(SystemExit, match="already holds the results of an earlier run .*creativity.json"):
        cli.main(["explain", "--samples", str(out / "samples.npz")])  # without --overwrite
