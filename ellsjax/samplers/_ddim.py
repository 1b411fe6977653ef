r"""Deterministic DDIM (Song et al. 2021, η = 0) for any :class:`~ellsjax.denoiser.Denoiser`.

The step from ``t_i`` to ``t_{i+1}``:

.. math::

    \hat\varepsilon = \frac{x_{t_i} - a_i \hat x_0}{s_i}, \qquad
    x_{t_{i+1}} = a_{i+1} \hat x_0 + s_{i+1} \hat\varepsilon ,

with ``x̂0 = denoiser(x_{t_i}, t_i, scale=scales[i])``. The whole trajectory is one jitted program
(:mod:`ellsjax.samplers._driver`): the per-step scales are static, and runs of equal scales become
one ``lax.scan``.

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.els(imgs)
    >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    >>> ej.samplers.ddim(m, x, [0.9, 0.5, 0.2, 0.0], scales=[5, 3, 3]).shape
    (2, 8, 8, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ellsjax._typing import TimeGrid
from ellsjax.denoiser import Denoiser
from ellsjax.samplers._driver import Method, Trajectory, check_denoiser, check_scales, check_times, run

__all__ = ["ddim", "DDIM"]


def _step(ctx, x, i, k):
    ab, var = ctx.denoiser.schedule.variances(ctx.grid)
    a, s = jnp.sqrt(ab), jnp.sqrt(var)
    x0, aux = ctx.x0(x, ctx.grid[i], k)
    eps = (x - a[i] * x0) / s[i]
    x_next = a[i + 1] * x0 + s[i + 1] * eps
    return x_next, (x_next, x0, aux)


#: The DDIM step as a :class:`~ellsjax.samplers.Method` for :func:`ellsjax.samplers.run` (grid: the times).
DDIM = Method(step=_step)


def ddim(
    denoiser: Denoiser,
    x_start: Float[ArrayLike, "b h w c"],
    ts: TimeGrid,
    *,
    scales: Sequence[Any] | None = None,
    label: Any = None,
    return_trajectory: bool = False,
    progress: bool | Callable[[int], None] = False,
) -> Float[Array, "b h w c"] | tuple[Float[Array, "b h w c"], Trajectory]:
    """Deterministic DDIM sampling from ``x_start`` at time ``ts[0]`` down to ``ts[-1]``.

    Args:
        denoiser: a machine or a trained network (anything implementing :class:`Denoiser`).
        x_start: ``[B, H, W, C]`` starting noise, taken to be ``x_{ts[0]}``.
        ts: strictly decreasing times in ``[0, 1]``; ``ts[0]`` is the time of ``x_start``. The
            paper's grid is :func:`ellsjax.schedules.paper_times`.
        scales: ``len(ts) − 1`` scales (or a :class:`~ellsjax.scales.ScaleSchedule`'s values),
            ``scales[i]`` used at ``ts[i]`` (static: one compile per distinct tuple). Required by
            the local machines.
        label: ``None``, a class id, or ``[B]`` ids, for a conditional denoiser.
        return_trajectory: also return a :class:`Trajectory` of every ``x_t`` and ``x̂0``.
        progress: ``True`` shows a tqdm bar; a callable receives each finished step's index.

    Returns:
        The sample ``x_{ts[-1]}`` (and the trajectory if asked).
    """
    x, label = check_denoiser(denoiser, x_start, label)
    ts = check_times(ts, denoiser)
    scales = check_scales(scales, denoiser, ts.shape[0] - 1)
    x, traj, _ = run(DDIM, denoiser, x, ts, scales=scales, label=label, progress=progress,
                     return_trajectory=return_trajectory, checked=True)
    return (x, traj) if return_trajectory else x
