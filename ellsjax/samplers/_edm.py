r"""EDM-style probability-flow ODE samplers: Euler and Heun (Karras et al. 2022, Algorithm 1).

In EDM variables ``x̃ = x_t/a`` and ``σ = s/a`` (:mod:`ellsjax.edm`) the probability-flow ODE of any
VP schedule is

.. math::

    \frac{d\tilde x}{d\sigma} = \frac{\tilde x - D(\tilde x; \sigma)}{\sigma}, \qquad
    D(\tilde x; \sigma) = \mathrm{denoiser}\big(a\,\tilde x,\ t(\sigma)\big) = \hat x_0 ,

and the samplers step it along a decreasing grid ``σ_0 > σ_1 > … > σ_S ≥ 0``:

* Euler: ``x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i)·d_i``, ``d_i = (x̃_i − D(x̃_i; σ_i))/σ_i``;
* Heun: the Euler step, then, where ``σ_{i+1} > 0``, the trapezoidal correction
  ``x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i)·(d_i + d'_{i+1})/2`` with ``d'`` evaluated at the Euler point.

A step to ``σ = 0`` is the Euler step, i.e. ``x̃ = D(x̃; σ_{S−1})``. Euler on this ODE is exactly
DDIM (:func:`ellsjax.samplers.ddim`) on the same grid.

Grids and states: give ``ts`` (VP times, as for DDIM) or ``sigmas`` (EDM levels, e.g.
:func:`ellsjax.edm.karras_sigmas`). ``x_start`` and the result are VP states ``x_t`` (what DDIM takes
and returns), so samplers are interchangeable; ``ej.edm.from_edm(x̃, σ)`` converts an EDM state.

Scales: ``scales[i]`` is the patch size of step ``i`` and belongs to the grid point ``σ_i``: Euler
evaluates step ``i`` at ``σ_i`` with ``scales[i]``; Heun's correction of step ``i`` is evaluated at
``σ_{i+1}`` with ``scales[i+1]`` (the last step's with ``scales[-1]``), as the PSPC release looks the
patch size up by the noise level.

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.pspc(imgs)
    >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    >>> ej.samplers.heun(m, x, sigmas=ej.edm.karras_sigmas(3), scales=[8, 3, 3]).shape
    (2, 8, 8, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ellsjax import _checks
from ellsjax import edm as _edm
from ellsjax._typing import TimeGrid
from ellsjax.denoiser import Denoiser
from ellsjax.samplers._driver import Method, Trajectory, check_denoiser, check_scales, check_times, run

__all__ = ["euler", "heun", "check_sigmas", "resolve_grid", "EULER", "HEUN", "edm_denoise"]


def check_sigmas(sigmas: Any, denoiser: Denoiser, name: str = "sigmas") -> jax.Array:
    """Check an EDM noise-level grid: 1-D, at least 2 levels, finite, strictly decreasing, ``≥ 0``,
    positive at every step's start, and inside the denoiser schedule's range. Returns float32."""
    arr = jnp.asarray(sigmas, jnp.float32) if not isinstance(sigmas, jax.Array) else sigmas.astype(jnp.float32)
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-D grid of at least 2 decreasing noise levels, got shape {arr.shape}")
    if _checks.is_concrete(arr):
        v = np.asarray(arr)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name}: contains NaN or inf")
        if v.min() < 0:
            raise ValueError(f"{name}: noise levels must be >= 0, got {v.min()}")
        if not np.all(np.diff(v) < 0):
            raise ValueError(f"{name}: noise levels must be strictly decreasing (sigmas[0] is the start), got {v}")
        try:
            _edm.to_time(arr, denoiser.schedule)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return arr


def resolve_grid(denoiser: Denoiser, ts: Any, sigmas: Any) -> tuple[jax.Array, jax.Array]:
    """From exactly one of ``ts`` (VP times) and ``sigmas`` (EDM levels), the checked pair
    ``(ts, sigmas)`` (float32, one per grid point). The start must have a finite ``σ``."""
    if (ts is None) == (sigmas is None):
        raise ValueError("ts, sigmas: give exactly one grid (VP times ts or EDM noise levels sigmas)")
    if ts is not None:
        ts = check_times(ts, denoiser)
        sig = _edm.to_sigma(ts, denoiser.schedule)
        if _checks.is_concrete(sig) and not bool(jnp.isfinite(sig[0])):
            raise ValueError("ts: ts[0] has no signal (σ = inf); EDM-variable samplers need a start with a(t) > 0")
        return ts, sig
    sig = check_sigmas(sigmas, denoiser)
    return _edm.to_time(sig, denoiser.schedule), sig


def edm_denoise(ctx, xe, t, sig, k):
    """``D(x̃; σ)``: the denoiser's ``x̂0`` at the VP state ``a·x̃`` and time ``t`` (scalars ``t``,
    ``σ``), as ``(x̂0, aux)``."""
    a, _ = _edm.signal_noise(sig)
    return ctx.x0(xe * a, t, k)


def _init(ctx, x):
    return _edm.to_edm(x, ctx.grid[1][0])


def _finish(ctx, xe, keys):
    return _edm.from_edm(xe, ctx.grid[1][-1])


def _step(second_order, ctx, xe, i, key):
    ts, sig = ctx.grid
    k, k_next = key
    s0, s1 = sig[i], sig[i + 1]
    x0, aux = edm_denoise(ctx, xe, ts[i], s0, k)
    d = (xe - x0) / s0
    xn = xe + (s1 - s0) * d
    if second_order:
        def corrected():
            d2 = (xn - edm_denoise(ctx, xn, ts[i + 1], s1, k_next)[0]) / s1
            return xe + (s1 - s0) * 0.5 * (d + d2)

        xn = jax.lax.cond(s1 > 0, corrected, lambda: xn)
    return xn, (_edm.from_edm(xn, s1), x0, aux)


def _keys(second_order, scales, nsteps):
    # Heun's correction of step i is evaluated at σ_{i+1} with the next step's scale
    ks = scales if scales is not None else (None,) * nsteps
    return tuple((ks[i], ks[min(i + 1, nsteps - 1)] if second_order else None) for i in range(nsteps))


#: Euler and Heun steps as :class:`~ellsjax.samplers.Method`\ s (grid: ``(ts, sigmas)``; state ``x̃``).
EULER = Method(step=partial(_step, False), init=_init, finish=_finish, keys=partial(_keys, False))
HEUN = Method(step=partial(_step, True), init=_init, finish=_finish, keys=partial(_keys, True))


def _run_edm(method, denoiser, x_start, ts, sigmas, scales, label, return_trajectory, progress):
    x, label = check_denoiser(denoiser, x_start, label)
    ts, sig = resolve_grid(denoiser, ts, sigmas)
    scales = check_scales(scales, denoiser, ts.shape[0] - 1)
    x, traj, _ = run(method, denoiser, x, (ts, sig), scales=scales, label=label, progress=progress,
                     return_trajectory=return_trajectory, checked=True)
    return (x, traj) if return_trajectory else x


def euler(
    denoiser: Denoiser,
    x_start: Float[ArrayLike, "b h w c"],
    ts: TimeGrid | None = None,
    *,
    sigmas: TimeGrid | None = None,
    scales: Sequence[Any] | None = None,
    label: Any = None,
    return_trajectory: bool = False,
    progress: bool | Callable[[int], None] = False,
) -> Float[Array, "b h w c"] | tuple[Float[Array, "b h w c"], Trajectory]:
    """Euler PF-ODE sampling in EDM variables (module docstring), one jitted program.

    Args:
        denoiser: a machine or a trained network.
        x_start: ``[B, H, W, C]`` the VP state ``x_t`` at the first grid point.
        ts: decreasing VP times (as for :func:`ellsjax.samplers.ddim`) ...
        sigmas: ... or decreasing EDM noise levels (exactly one of the two).
        scales: ``len(grid) − 1`` patch sizes, ``scales[i]`` for step ``i`` (static).
        label: ``None``, a class id, or ``[B]`` ids, for a conditional denoiser.
        return_trajectory: also return a :class:`~ellsjax.samplers.Trajectory` (VP states, ``x̂0``).
        progress: ``True`` shows a tqdm bar; a callable receives each finished step's index.

    Returns:
        The VP state at the last grid point (the sample where it is noise-free).
    """
    return _run_edm(EULER, denoiser, x_start, ts, sigmas, scales, label, return_trajectory, progress)


def heun(
    denoiser: Denoiser,
    x_start: Float[ArrayLike, "b h w c"],
    ts: TimeGrid | None = None,
    *,
    sigmas: TimeGrid | None = None,
    scales: Sequence[Any] | None = None,
    label: Any = None,
    return_trajectory: bool = False,
    progress: bool | Callable[[int], None] = False,
) -> Float[Array, "b h w c"] | tuple[Float[Array, "b h w c"], Trajectory]:
    """Heun (2nd order) PF-ODE sampling in EDM variables: Karras et al. 2022, Algorithm 1.

    ``2S − 1`` denoiser evaluations for ``S`` steps ending at ``σ = 0`` (the last step is Euler).
    Arguments as for :func:`euler`; Heun's correction of step ``i`` uses ``scales[i+1]`` (see the
    module docstring for an example).
    """
    return _run_edm(HEUN, denoiser, x_start, ts, sigmas, scales, label, return_trajectory, progress)
