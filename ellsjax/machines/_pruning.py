r"""Pruned streaming: skip the bank blocks that float32 (or a tolerance) cannot see, with a proof.

A prebuilt bank ordered by :func:`ellsjax.machines._banks.block_order` comes in blocks of entries
lying in balls (center ``c``, radius ``r``). For a query ``q`` at signal ``a``, every entry ``k`` of a
block satisfies ``‖q − a k‖ ≥ ‖q − a c‖ − a r`` (triangle inequality), so its raw score is at most

.. math::

    U = \|q\|^2 - \max(0,\ \|q - a c\| - a r)^2 \;\ge\; \|q\|^2 - \|q - a k\|^2 = l_k .

Queries are sorted along the bank's principal direction and cut into tiles of similar queries; per
tile, blocks are visited best-bound-first (by ``max_q τ(U_b(q) − max_b' U_b'(q))``) through the same
chunk statistics and exact merges as :func:`ellsjax.kernel.streaming_softmax`, and the pass stops
once every remaining block is provably invisible to every query of the tile:

* **exact** (``tolerance = 0``): every remaining entry's scaled score is more than
  :data:`UNDERFLOW_MARGIN` below the query's running maximum, ``τ(U + δ) − m < −104``, so its float32
  weight ``exp(τ l − m)`` is exactly 0 (``exp`` underflows below ``e^{−103.3}``); ``δ`` is a bound on
  the float32 rounding of the logits and of ``U`` itself. The result equals the unpruned pass up to
  float32 summation order.
* **tolerance** ``ε > 0``: the remaining mass ``R = Σ_b C_b e^{τ(U_b + δ) − m}`` (block counts
  ``C_b``) satisfies ``R ≤ ε/(2·max|v|)·Z`` (``Z`` the mass seen), so
  ``|x̂ − x̂_exact| ≤ R/(Z + R)·(max|v| + |x̂|) ≤ ε``; that bound is returned per query.

At ``s = 0`` (``τ = ∞``) the weights are the nearest-entry indicator: a block is invisible once its
bound is below the running maximum raw score. Groups of several sub-banks (bbELS edges and corners,
LS pixels) and banks of one block stream exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ellsjax import kernel as _kernel
from ellsjax.machines import _banks

__all__ = ["UNDERFLOW_MARGIN", "prunable", "pruned_stats", "error_bound", "suffix_bounds", "block_score_bounds"]

#: float32 ``exp(x)`` is 0 for ``x < ln(2^-149) ≈ −103.3``: an entry this far below the running
#: maximum has weight exactly 0.
UNDERFLOW_MARGIN = 104.0
_U32 = 2.0**-24

#: When a list (benchmarks only; see ``scripts/bench_machines.py``), every pruned pass traced
#: afterwards appends the fraction of blocks it visited, per tile, through a host callback.
visit_log: list | None = None


def prunable(queries: _kernel.Queries, bank: _banks.DeviceBank) -> bool:
    """Whether this group's pass can be pruned: a block index, one sub-bank, more than one block."""
    return bank.blocks is not None and bank.keys_t.shape[1] == 1 and bank.blocks.radii.shape[-1] > 1


def pruned_stats(queries: _kernel.Queries, bank: _banks.DeviceBank, label, *, tolerance: float, tile: int):
    """``(stats, rest)`` of one group's queries (leading dims ``[1]``, or ``[B, 1]`` with ``label``)
    over a block-indexed bank (see the module docstring): the streaming statistics of the blocks
    visited, and ``rest`` ``[*lead, m]``, a bound on the mass of the blocks skipped in the units of
    ``stats.total`` (``inf`` where unbounded)."""
    keys_t, vv = bank.keys_t[:, 0], bank.vv[:, 0]  # [Kb, D+1, U], [Kb, U, V1]
    blocks = jax.tree.map(lambda v: v[:, 0], bank.blocks)

    def one(q: _kernel.Queries, kb):
        bk = jax.tree.map(lambda v: v[kb], blocks)
        return _pruned_group(q, keys_t[kb], vv[kb], bk, value_bound(vv[kb]), tolerance=tolerance, tile=tile)

    if label is None:
        st, rest = one(jax.tree.map(lambda v: v[0], queries), 0)
        return jax.tree.map(lambda v: v[None], st), rest[None]
    st, rest = jax.lax.map(lambda args: one(*args), (jax.tree.map(lambda v: v[:, 0], queries), label))
    return jax.tree.map(lambda v: v[:, None], st), rest[:, None]


def suffix_bounds(maxes, lses, *, axis: int):
    """What is left after visiting the first ``i`` items along ``axis``: the suffix maximum of
    ``maxes`` and the suffix log-sum-exp of ``lses`` (index ``i`` covers items ``i, i+1, …``), each with
    one more entry at the end, ``-inf`` (nothing left)."""
    smax = jnp.flip(jax.lax.cummax(jnp.flip(maxes, axis), axis=axis), axis)
    slse = jnp.flip(jax.lax.cumlogsumexp(jnp.flip(lses, axis), axis=axis), axis)
    tail = jnp.full_like(jnp.take(maxes, jnp.array([0]), axis=axis), -jnp.inf)
    return jnp.concatenate([smax, tail], axis), jnp.concatenate([slse, tail], axis)


def value_bound(vv) -> jax.Array:
    """``max |v|`` over a packed bank's ``[c, c·v]`` rows (``[..., U, 1+V]`` → ``[...]``)."""
    return jnp.max(jnp.abs(vv[..., 1:]) / jnp.maximum(vv[..., :1], 1.0), axis=(-1, -2))


def error_bound(stats: _kernel.SoftmaxStats, rest, vmax) -> jax.Array:
    """``max_v |mean − exact| ≤ R/(Z + R)·(max|v| + |mean|)`` from the skipped mass ``R`` (``rest``)."""
    mean = _kernel.finalize(stats)
    frac = jnp.where(jnp.isinf(rest), 1.0, rest / (stats.total + rest))
    return frac * (vmax + jnp.max(jnp.abs(mean), -1))


def block_score_bounds(q, a, blocks: _banks.BlockIndex) -> jax.Array:
    """``[T, nb]`` upper bounds on the raw score ``‖q‖² − ‖q − a·k‖²`` of every entry ``k`` of each block,
    for queries ``q`` ``[T, D]`` at signal ``a`` ``[T]``: the larger of the ball and the box-plus-rest
    lower bounds on ``‖q − a·k‖²`` (see :class:`~ellsjax.machines._banks.BlockIndex`), plus the float32
    rounding slack of the kernel's logits and of this bound."""
    d = q.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    qn2 = jnp.sum(q * q, -1)
    qn = jnp.sqrt(qn2)
    c2 = jnp.sum(blocks.centers * blocks.centers, -1)
    dist2 = qn2[:, None] - 2 * a[:, None] * jnp.matmul(q, blocks.centers.T, precision=hi) + (a * a)[:, None] * c2
    ball = jnp.maximum(jnp.sqrt(jnp.maximum(dist2, 0.0)) - a[:, None] * blocks.radii, 0.0)
    # the box in the principal subspace, and the range of the rest's norm
    qp = jnp.matmul(q, blocks.basis.T, precision=hi)  # [T, r]
    qperp = jnp.sqrt(jnp.maximum(qn2 - jnp.sum(qp * qp, -1), 0.0))
    ah = a[:, None, None]
    box = jnp.maximum(jnp.maximum(ah * blocks.lo[None] - qp[:, None], qp[:, None] - ah * blocks.hi[None]), 0.0)
    an = a[:, None]
    perp = jnp.maximum(jnp.maximum(qperp[:, None] - an * blocks.perp_hi, an * blocks.perp_lo - qperp[:, None]), 0.0)
    gap2 = jnp.maximum(ball * ball, jnp.sum(box * box, -1) + perp * perp)
    # rounding slack of the logits (as in kernel.topk_softmax) and of this bound, both float32
    big = (qn + a * blocks.key_norm) ** 2
    slack = 16.0 * (d + 2) * _U32 * big
    return qn2[:, None] - gap2 + slack[:, None]


def _pruned_group(q: _kernel.Queries, keys_t, vv, blocks: _banks.BlockIndex, vmax, *, tolerance, tile):
    m, d = q.q.shape
    t = int(min(tile, m))
    ntiles = -(-m // t)
    pad = ntiles * t - m
    a = jnp.broadcast_to(q.a, (m,))
    tau = jnp.broadcast_to(q.inv_temp, (m,))
    # similar queries together: sorted along the bank's principal direction
    perm = jnp.argsort(q.q @ blocks.basis[0])
    qq = jnp.pad(q.q[perm], ((0, pad), (0, 0)))
    qa = jnp.pad(a[perm], (0, pad))
    qt = jnp.pad(tau[perm], (0, pad), constant_values=1.0)
    valid = jnp.arange(ntiles * t) < m

    def run(args):
        return _pruned_tile(_kernel.Queries(*args[:3]), args[3], keys_t, vv, blocks, vmax, tolerance)

    st, rest, visits = jax.lax.map(run, (qq.reshape(ntiles, t, d), qa.reshape(ntiles, t), qt.reshape(ntiles, t),
                                 valid.reshape(ntiles, t)))
    if visit_log is not None:
        log = visit_log  # the list of this trace (later calls of the compiled program append too)
        jax.debug.callback(lambda v: log.append(float(v.mean())), visits / blocks.radii.shape[0])
    inverse = jnp.argsort(perm)
    back = lambda v: v.reshape(ntiles * t, *v.shape[2:])[:m][inverse]  # noqa: E731
    return jax.tree.map(back, st), back(rest)


def _pruned_tile(q: _kernel.Queries, valid, keys_t, vv, blocks: _banks.BlockIndex, vmax, tolerance):
    nb = blocks.radii.shape[0]
    n = keys_t.shape[-1] // nb
    a, tau = q.a, q.inv_temp
    finite = jnp.isfinite(tau)
    kappa = jnp.where(finite, tau, 1.0)  # scores are raw where τ = ∞ (nearest-entry limit)
    upper = block_score_bounds(q.q, a, blocks)
    zu = jnp.where(blocks.counts > 0, kappa[:, None] * upper, -jnp.inf)  # [T, nb] scaled upper bounds
    rel = jnp.where(valid[:, None], zu - jnp.max(zu, -1, keepdims=True), -jnp.inf)
    order = jnp.argsort(-jnp.max(rel, 0))
    zo = zu[:, order]
    lm = jnp.log(blocks.counts[order])[None] + zo
    # suffix max and suffix log-sum-exp over the visiting order (column nb: nothing left)
    smax, slse = suffix_bounds(zo, lm, axis=1)
    eps = tolerance / (2.0 * jnp.maximum(vmax, 1e-30))

    def block(i):
        start = order[i] * n
        return _kernel.PackedBank(jax.lax.dynamic_slice_in_dim(keys_t, start, n, axis=1),
                                  jax.lax.dynamic_slice_in_dim(vv, start, n, axis=0))

    def invisible(i, st):
        # τ = ∞: nothing left can reach the running maximum raw score
        nearest = smax[:, i] < st.max
        if tolerance == 0:
            ok = jnp.where(finite, smax[:, i] - st.max < -UNDERFLOW_MARGIN, nearest)
        else:
            ok = jnp.where(finite, jnp.exp(slse[:, i] - st.max) <= eps * st.total, nearest)
        return jnp.all(ok | ~valid)

    def cond(carry):
        i, st = carry
        return (i < nb) & ~invisible(i, st)

    def body(carry):
        i, st = carry
        return i + 1, _kernel.merge_stats(st, _kernel.chunk_stats(q, block(i)), tau)

    i, st = jax.lax.while_loop(cond, body, (jnp.int32(1), _kernel.chunk_stats(q, block(0))))
    rest = jnp.where(finite, jnp.exp(slse[:, i] - st.max), jnp.where(smax[:, i] < st.max, 0.0, jnp.inf))
    return st, rest, i
