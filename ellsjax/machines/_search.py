"""Approximate patch search with a rigorous bound: top-K candidates from a low-precision GEMM,
exact re-scoring, and a bound on the softmax mass left out (:func:`ellsjax.kernel.topk_softmax`).

A machine switches it on with :meth:`Machine.with_search` (its :class:`ExecutionPolicy` then carries
the tolerance); :meth:`Machine.denoise_with_bound` returns the estimate and its bound.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ellsjax import kernel as _kernel
from ellsjax.machines import _banks

if TYPE_CHECKING:
    from ellsjax.machines.base import Machine

__all__ = ["with_search", "denoise_with_bound", "topk_bank", "exact_or_search"]


def with_search(machine: Machine, *, tolerance: float | None, top_k: int = 64, scoring: str = "bfloat16") -> Machine:
    """``machine`` with approximate search on (``tolerance`` a float) or off (``None``)."""
    if tolerance is not None and not (float(tolerance) > 0):
        raise ValueError(f"tolerance: must be positive (or None for exact search), got {tolerance!r}")
    policy = dataclasses.replace(machine.policy, tolerance=tolerance, top_k=top_k, scoring=scoring,
                                 prune=None if tolerance is not None else machine.policy.prune)
    return dataclasses.replace(machine, policy=policy)


def denoise_with_bound(machine: Machine, x_t: Any, t: Any, *, scale: Any = None, label: Any = None):
    """The top-``top_k`` estimate and its per-pixel error bound (see :meth:`Machine.denoise_with_bound`)."""
    from ellsjax.machines.base import bank_key

    x_t, t, label, scale = machine.check_inputs(x_t, t, scale=scale, label=label)
    if machine._bank_layout(scale) is None:
        raise ValueError(f"{type(machine).__name__} has no patch bank to search; approximate search needs one")
    ready = machine.prepare((scale,), conditional=label is not None)
    if bank_key(scale if machine.needs_scale else None, label is not None) not in ready.banks:
        raise ValueError("scale: the bank of this scale exceeds bank_budget; approximate search needs a prebuilt bank")
    return _jit_topk(ready, x_t, t, label, scale)


@partial(jax.jit, static_argnums=(4,))
def _jit_topk(d, x_t, t, label, scale):
    return d._denoise_bounded(x_t, t, label, scale)


def exact_or_search(machine: Machine, queries, bank: _banks.DeviceBank, label, exact):
    """``exact()`` or, with a tolerance, the top-k estimate wherever its bound meets the tolerance
    for every output value (else ``exact()``)."""
    if machine.policy.tolerance is None:
        return exact()
    approx = topk_bank(machine, queries, bank, label)
    return jax.lax.cond(jnp.all(approx.error_bound <= machine.policy.tolerance), lambda: approx.mean, exact)


def topk_bank(machine: Machine, queries, bank: _banks.DeviceBank, label):
    """:func:`ellsjax.kernel.topk_softmax` of one group's queries over its prebuilt bank."""
    policy = machine.policy
    kb, ng, d1, u = bank.keys_t.shape
    d = d1 - 1
    mq = queries.q.shape[-2]
    lead = int(np.prod(queries.q.shape[:-2]))
    c = int(min(max(policy.budget // (4 * lead * (2 * mq + d + 2)), policy.top_k, 1), u))
    nchunks = -(-u // c)
    pick = (lambda x: x[label]) if label is not None else (lambda x: x[0])
    counts = bank.vv[..., 0]
    keys = jnp.swapaxes(bank.keys_t[..., :d, :], -1, -2)  # [Kb, G, U, D]
    sq = bank.keys_t[..., d, :]
    values = keys if bank.values is None else bank.values
    log_count = jnp.log(counts)  # -inf for padding
    present = counts > 0
    kmax = jnp.sqrt(jnp.max(jnp.where(present, sq, 0.0), axis=-1))
    vmax = jnp.max(jnp.where(present[..., None], jnp.abs(values), 0.0), axis=(-1, -2))

    def bank_fn(i):
        start = jnp.minimum(i * c, u - c)
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, c, axis=2)  # noqa: E731
        ids = start + jnp.arange(c, dtype=jnp.int32)
        lc = jnp.where(ids >= i * c, sl(log_count), -jnp.inf)
        chunk = _kernel.Bank(pick(sl(keys)), pick(sl(values)), pick(lc), pick(sl(sq)))
        return chunk, jnp.broadcast_to(ids, chunk.log_count.shape)

    def fetch_fn(ids):  # ids [*lead, m, K] -> entries of each query's own bank
        g = jnp.arange(ng).reshape((ng, 1, 1))
        b = 0 if label is None else label.reshape((-1, 1, 1, 1))
        return _kernel.Bank(keys[b, g, ids], values[b, g, ids], log_count[b, g, ids], sq[b, g, ids])

    return _kernel.topk_softmax(
        queries, bank_fn, fetch_fn, nchunks, k=min(policy.top_k, u), total_count=pick(jnp.sum(counts, axis=-1)),
        key_norm_max=pick(kmax), value_abs_max=pick(vmax), scoring=policy.scoring,
    )
