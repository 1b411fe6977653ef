r"""DDPM ancestral sampling (Ho et al. 2020) on any time grid, for any denoiser.

From ``t_i`` to ``t_{i+1} < t_i`` with ``ᾱ_i = ᾱ(t_i)``, ``x̂0 = denoiser(x_{t_i}, t_i)`` and
``ε̂ = (x_{t_i} − a_i x̂0)/s_i``, the step samples the forward posterior ``q(x_{t_{i+1}} | x_{t_i}, x̂0)``:

.. math::

    \beta_i = 1 - \frac{\bar\alpha_i}{\bar\alpha_{i+1}}, \qquad
    \tilde\beta_i = \frac{1-\bar\alpha_{i+1}}{1-\bar\alpha_i}\,\beta_i, \qquad
    x_{t_{i+1}} = a_{i+1}\hat x_0 + \sqrt{s_{i+1}^2 - \eta^2\tilde\beta_i}\;\hat\varepsilon + \eta\sqrt{\tilde\beta_i}\; z,

``z ~ N(0, I)``. ``η = 1`` is DDPM's ancestral step (its mean and variance ``β̃``, Ho et al. eqs. 6–7),
``η = 0`` deterministic DDIM, values between interpolate (Song et al. 2021, eq. 16). A step onto a
noise-free time returns ``x̂0``. ``β_i = (s_i² − s_{i+1}²)/ᾱ_{i+1}`` is computed from the schedule's
accurate noise variances.

Randomness: ``z`` of step ``i`` is ``normal(fold_in(key, i))``: deterministic given ``key``.

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (8, 6, 6, 1), minval=-1, maxval=1)
    >>> x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))
    >>> ej.samplers.ddpm(ej.machines.ideal(imgs), x, [0.9, 0.6, 0.3, 0.0], key=0).shape
    (2, 6, 6, 1)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ellsjax._typing import TimeGrid
from ellsjax.denoiser import Denoiser
from ellsjax.samplers._driver import Method, Trajectory, check_denoiser, check_scales, check_times, run

__all__ = ["ddpm", "as_key", "DDPM"]


def as_key(key: Any, name: str = "key") -> jax.Array:
    """An int seed or a ``jax.random`` key (typed or raw ``uint32[2]``) as a typed key."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
        return key
    if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"{name}: expected an int seed or a single jax.random key, got {key!r}")


def _step(ctx, x, i, k):
    key, eta = ctx.args
    ab, var = ctx.denoiser.schedule.variances(ctx.grid)
    a, s = jnp.sqrt(ab), jnp.sqrt(var)
    x0, aux = ctx.x0(x, ctx.grid[i], k)
    eps = (x - a[i] * x0) / s[i]
    beta = (var[i] - var[i + 1]) / ab[i + 1]
    noise_var = jnp.clip(eta**2 * var[i + 1] / var[i] * beta, 0.0, var[i + 1])
    z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    x_next = a[i + 1] * x0 + jnp.sqrt(var[i + 1] - noise_var) * eps + jnp.sqrt(noise_var) * z
    return x_next, (x_next, x0, aux)


#: The ancestral step as a :class:`~ellsjax.samplers.Method` (grid: the times; args: ``(key, eta)``).
DDPM = Method(step=_step)


def ddpm(
    denoiser: Denoiser,
    x_start: Float[ArrayLike, "b h w c"],
    ts: TimeGrid,
    *,
    key: jax.Array | int,
    eta: float = 1.0,
    scales: Sequence[Any] | None = None,
    label: Any = None,
    return_trajectory: bool = False,
    progress: bool | Callable[[int], None] = False,
) -> Float[Array, "b h w c"] | tuple[Float[Array, "b h w c"], Trajectory]:
    """Ancestral (stochastic) sampling from ``x_start`` at ``ts[0]`` down to ``ts[-1]``.

    Args:
        denoiser: a machine or a trained network.
        x_start: ``[B, H, W, C]`` starting noise, taken to be ``x_{ts[0]}``.
        ts: strictly decreasing times in ``[0, 1]`` (e.g. ``paper_times`` or a fine uniform grid).
        key: int seed or ``jax.random`` key for the injected noise.
        eta: ``η ∈ [0, 1]``: 1 is DDPM, 0 deterministic DDIM.
        scales: ``len(ts) − 1`` scales, ``scales[i]`` used at ``ts[i]`` (static).
        label: ``None``, a class id, or ``[B]`` ids, for a conditional denoiser.
        return_trajectory: also return a :class:`~ellsjax.samplers.Trajectory`.
        progress: ``True`` shows a tqdm bar; a callable receives each finished step's index.
    """
    x, label = check_denoiser(denoiser, x_start, label)
    ts = check_times(ts, denoiser)
    scales = check_scales(scales, denoiser, ts.shape[0] - 1)
    key = as_key(key)
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
        raise ValueError(f"eta: expected a float in [0, 1], got {eta!r}")
    x, traj, _ = run(DDPM, denoiser, x, ts, scales=scales, label=label, args=(key, jnp.float32(eta)),
                     progress=progress, return_trajectory=return_trajectory, checked=True)
    return (x, traj) if return_trajectory else x
