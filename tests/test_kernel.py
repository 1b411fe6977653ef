"""The streaming softmax: chunked == dense == float64, exact merges, limits and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ellsjax import kernel as K


def problem(g=2, m=5, n=23, d=7, v=3, seed=0, t_scale=2.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(g, m, d)).astype(np.float32)
    keys = rng.normal(size=(g, n, d)).astype(np.float32)
    vals = rng.normal(size=(g, n, v)).astype(np.float32)
    a = rng.uniform(0.2, 1.0, (g, m)).astype(np.float32)
    it = (t_scale * rng.uniform(0.5, 1.5, (g, m))).astype(np.float32)
    return q, keys, vals, a, it


def ref(q, keys, vals, a, it, counts=None):
    q, keys, vals, a, it = (np.asarray(x, np.float64) for x in (q, keys, vals, a, it))
    d2 = ((q[:, :, None, :] - a[..., None, None] * keys[:, None]) ** 2).sum(-1)
    logit = -d2 * it[..., None]
    if counts is not None:
        logit = logit + np.log(counts)[:, None, :]
    w = np.exp(logit - logit.max(-1, keepdims=True))
    return np.einsum("gmn,gnv->gmv", w, vals) / w.sum(-1)[..., None]


def stream(q, keys, vals, a, it, chunk, counts=None, remat=True):
    """The kernel over ``chunk``-entry chunks, as one compiled program (reused across calls)."""
    return _stream(q, keys, vals, a, it, counts, chunk=chunk, remat=remat)


@functools.partial(jax.jit, static_argnames=("chunk", "remat"))
def _stream(q, keys, vals, a, it, counts, *, chunk, remat):
    n = keys.shape[1]
    nch = -(-n // chunk)
    pad = nch * chunk - n
    kp = jnp.pad(keys, ((0, 0), (0, pad), (0, 0)))
    vp = jnp.pad(vals, ((0, 0), (0, pad), (0, 0)))
    present = jnp.arange(nch * chunk) < n
    lc = None if counts is None else jnp.log(jnp.pad(jnp.asarray(counts, jnp.float32), ((0, 0), (0, pad)), constant_values=1))

    def bank_fn(i):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)  # noqa: E731
        return K.make_bank(sl(kp), sl(vp), jax.lax.dynamic_slice_in_dim(present, i * chunk, chunk)[None].repeat(keys.shape[0], 0),
                           None if lc is None else sl(lc))

    return K.streaming_softmax(K.Queries(jnp.asarray(q), jnp.asarray(a), jnp.asarray(it)), bank_fn, nch, remat=remat)[0]


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 50])
def test_streaming_matches_float64(chunk):
    args = problem()
    np.testing.assert_allclose(stream(*args, chunk), ref(*args), atol=2e-6)


def test_dense_helper_matches():
    q, keys, vals, a, it = problem()
    dense = K.softmax_mean(K.Queries(q, a, it), K.make_bank(keys, vals))
    np.testing.assert_allclose(dense, ref(q, keys, vals, a, it), atol=2e-6)


def test_merge_is_exact_in_any_order():
    q, keys, vals, a, it = problem(n=30)
    Q = K.Queries(q, a, it)
    chunk_stats, merge = jax.jit(K.chunk_stats), jax.jit(K.merge_stats)  # one program each, not op by op
    parts = [chunk_stats(Q, K.make_bank(keys[:, s], vals[:, s])) for s in (slice(0, 9), slice(9, 20), slice(20, 30))]
    left = merge(merge(parts[0], parts[1], it), parts[2], it)
    right = merge(parts[2], merge(parts[1], parts[0], it), it)
    whole = chunk_stats(Q, K.make_bank(keys, vals))
    for x in (left, right):
        np.testing.assert_allclose(K.finalize(x), K.finalize(whole), atol=1e-6)
        np.testing.assert_allclose(x.max, whole.max, rtol=1e-6)
    # merging with an empty bank changes nothing
    e = K.empty_stats(Q, vals.shape[-1])
    np.testing.assert_allclose(K.finalize(K.merge_stats(e, whole, it)), K.finalize(whole), atol=0)


def test_multiplicity_equals_duplicated_entries():
    q, keys, vals, a, it = problem(n=10)
    counts = np.array([[1, 3, 1, 2, 1, 1, 5, 1, 1, 2]] * 2)
    dup_k = np.stack([np.repeat(keys[g], counts[g], axis=0) for g in range(2)])
    dup_v = np.stack([np.repeat(vals[g], counts[g], axis=0) for g in range(2)])
    with_counts = stream(q, keys, vals, a, it, 4, counts=counts)
    np.testing.assert_allclose(with_counts, stream(q, dup_k, dup_v, a, it, 4), atol=2e-6)
    np.testing.assert_allclose(with_counts, ref(q, keys, vals, a, it, counts), atol=2e-6)


def test_zero_noise_limit_is_average_of_nearest():
    keys = np.array([[[0.0], [1.0], [1.0], [3.0]]], np.float32)
    vals = np.array([[[10.0], [20.0], [40.0], [80.0]]], np.float32)
    q = np.array([[[1.2], [2.9], [-5.0]]], np.float32)
    Q = K.Queries(q, np.ones((1, 3), np.float32), np.full((1, 3), np.inf, np.float32))
    out = K.streaming_softmax(Q, lambda i: K.make_bank(keys[:, i * 2 : i * 2 + 2] if False else jax.lax.dynamic_slice_in_dim(keys, i * 2, 2, 1),
                                                      jax.lax.dynamic_slice_in_dim(vals, i * 2, 2, 1)), 2)[0]
    np.testing.assert_allclose(np.asarray(out)[0, :, 0], [30.0, 80.0, 10.0])
    # with multiplicities, ties are weighted by count
    out = K.softmax_mean(Q, K.make_bank(keys, vals, log_count=jnp.log(jnp.array([[1.0, 3.0, 1.0, 1.0]]))))
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0], (3 * 20 + 40) / 4)


def test_absent_entries_and_empty_chunks_are_ignored():
    q, keys, vals, a, it = problem(n=8)
    present = np.array([True, False, False, False, True, True, False, True])
    got = K.streaming_softmax(
        K.Queries(q, a, it),
        lambda i: K.make_bank(jax.lax.dynamic_slice_in_dim(keys, i * 2, 2, 1), jax.lax.dynamic_slice_in_dim(vals, i * 2, 2, 1),
                              jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(jnp.asarray(present), i * 2, 2), (2, 2))),
        4,
    )[0]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref(q, keys[:, present], vals[:, present], a, it), atol=2e-6)


def test_gradients_match_dense_and_are_finite():
    q, keys, vals, a, it = problem(n=12)

    def loss_stream(qq):
        return jnp.sum(stream(qq, keys, vals, a, it, 5) ** 2)

    def loss_dense(qq):
        return jnp.sum(K.softmax_mean(K.Queries(qq, a, it), K.make_bank(keys, vals)) ** 2)

    def loss_naive(qq):  # plain softmax of direct distances: obviously correct, no tricks
        d2 = jnp.sum((qq[:, :, None, :] - a[..., None, None] * keys[:, None]) ** 2, -1)
        w = jax.nn.softmax(-d2 * it[..., None], axis=-1)
        return jnp.sum(jnp.einsum("gmn,gnv->gmv", w, vals) ** 2)

    grad = lambda f: jax.jit(jax.grad(f))  # noqa: E731  (one program each, not op by op)
    g1, g2 = grad(loss_stream)(jnp.asarray(q)), grad(loss_dense)(jnp.asarray(q))
    assert np.all(np.isfinite(g1))
    np.testing.assert_allclose(g1, g2, atol=1e-5)
    np.testing.assert_allclose(g1, grad(loss_naive)(jnp.asarray(q)), atol=1e-4, rtol=1e-4)
    g3 = grad(lambda qq: jnp.sum(stream(qq, keys, vals, a, it, 5, remat=False) ** 2))(jnp.asarray(q))
    np.testing.assert_allclose(g1, g3, atol=1e-6)


def test_bad_group_names():
    q, keys, vals, a, it = problem()
    with pytest.raises(ValueError, match="bank_fn: returned groups"):
        K.streaming_softmax({"x": K.Queries(q, a, it)}, lambda i: {"y": K.make_bank(keys, vals)}, 1)
    with pytest.raises(ValueError, match="num_chunks"):
        K.streaming_softmax(K.Queries(q, a, it), lambda i: K.make_bank(keys, vals), 0)


@pytest.mark.parametrize("tile", [None, 2, 3, 64])
def test_query_tiles_are_exact(tile):
    args = problem(m=7, n=31)
    got = jax.jit(lambda *a: _stream_opts(*a, tile=tile))(*args)
    np.testing.assert_allclose(got, ref(*args), atol=2e-6)


def _stream_opts(q, keys, vals, a, it, tile, chunk=4):
    n = keys.shape[1]
    nch = -(-n // chunk)
    kp = jnp.pad(keys, ((0, 0), (0, nch * chunk - n), (0, 0)))
    vp = jnp.pad(vals, ((0, 0), (0, nch * chunk - n), (0, 0)))
    present = jnp.broadcast_to(jnp.arange(nch * chunk) < n, (keys.shape[0], nch * chunk))

    def bank_fn(i):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)  # noqa: E731
        return K.make_bank(sl(kp), sl(vp), sl(present))

    return K.streaming_softmax(K.Queries(q, a, it), bank_fn, nch, query_tile=tile)[0]


def test_large_jumps_of_the_running_max_and_zero_noise():
    # keys ordered so that the running max keeps jumping by far more than exp's range
    keys = np.array([[[5.0], [4.0], [3.0], [2.0], [1.0], [0.5], [0.1], [0.0]]], np.float32)
    vals = np.arange(8, dtype=np.float32).reshape(1, 8, 1)
    q = np.zeros((1, 2, 1), np.float32)
    a = np.ones((1, 2), np.float32)
    for it in [0.5, 50.0, 1e4]:
        itv = np.full((1, 2), it, np.float32)
        got = np.asarray(_stream_opts(q, keys, vals, a, itv, tile=None, chunk=2))
        np.testing.assert_allclose(got, ref(q, keys, vals, a, itv), atol=1e-6)
    got = np.asarray(_stream_opts(q, keys, vals, a, np.full((1, 2), np.inf, np.float32), tile=None, chunk=2))
    np.testing.assert_allclose(got[0, :, 0], 7.0, atol=1e-6)  # the nearest key (0.0) has value 7


@functools.partial(jax.jit, static_argnames=("k", "scoring", "chunk"))
def _topk(q, keys, vals, a, it, k, scoring, chunk=5):
    g, n, d = keys.shape
    nch = -(-n // chunk)
    kp = jnp.pad(keys, ((0, 0), (0, nch * chunk - n), (0, 0)))
    vp = jnp.pad(vals, ((0, 0), (0, nch * chunk - n), (0, 0)))
    present = jnp.broadcast_to(jnp.arange(nch * chunk) < n, (g, nch * chunk))
    full = K.make_bank(kp, vp, present)

    def bank_fn(i):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)  # noqa: E731
        return K.Bank(sl(full.keys), sl(full.values), sl(full.log_count), sl(full.sq_norm)), jnp.broadcast_to(
            i * chunk + jnp.arange(chunk), (g, chunk))

    def fetch(ids):
        gi = jnp.arange(g)[:, None, None]
        return K.Bank(full.keys[gi, ids], full.values[gi, ids], full.log_count[gi, ids], full.sq_norm[gi, ids])

    return K.topk_softmax(
        K.Queries(jnp.asarray(q), jnp.asarray(a), jnp.asarray(it)), bank_fn, fetch, nch, k=k,
        total_count=jnp.full((g,), float(n)), key_norm_max=jnp.sqrt(full.sq_norm.max(-1)),
        value_abs_max=jnp.abs(vals).max((-1, -2)), scoring=scoring,
    )


@pytest.mark.parametrize("scoring", ["float32", "bfloat16"])
def test_topk_covering_the_bank_is_exact(scoring):
    args = problem(n=12)
    res = _topk(*args, k=12, scoring=scoring)
    np.testing.assert_allclose(res.mean, ref(*args), atol=2e-6)
    np.testing.assert_array_equal(res.mass_left_out, 0.0)


@pytest.mark.parametrize("scoring", ["float32", "bfloat16"])
@pytest.mark.parametrize("t_scale", [0.05, 0.5, 5.0, 50.0])
def test_topk_error_stays_within_its_bound(scoring, t_scale):
    for seed in range(3):
        args = problem(n=40, d=6, seed=seed, t_scale=t_scale)
        res = _topk(*args, k=6, scoring=scoring)
        # against the exact float32 stream: the bound is about truncation, not float32 rounding
        err = np.abs(np.asarray(res.mean) - np.asarray(stream(*args, 7))).max(-1)
        bound = np.asarray(res.error_bound)
        # the bound covers the entries left out; float32 rounding of the mean itself comes on top
        # + float32 rounding of both evaluations, which grows with the inverse temperature
        assert np.all(err <= bound + 2e-6 + 1e-7 * args[4].max()), (err.max(), bound.min())
        assert np.all((res.mass_left_out >= 0) & (res.mass_left_out <= 1))
    # concentrated softmax (large inverse temperature): tight bounds
    if t_scale >= 50 and scoring == "float32":
        assert float(np.median(bound)) < 1e-3
