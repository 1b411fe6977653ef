r"""Samplers that run any :class:`~ellsjax.machines.Denoiser` (machine or trained network).

The deterministic DDIM step (Song et al. 2021, η = 0) from ``t_i`` to ``t_{i+1}``:

.. math::

    \hat\varepsilon = \frac{x_{t_i} - a_i \hat x_0}{s_i}, \qquad
    x_{t_{i+1}} = a_{i+1} \hat x_0 + s_{i+1} \hat\varepsilon ,

with ``x̂0 = denoiser(x_{t_i}, t_i, scale=scales[i])``. The whole trajectory is one jitted program:
the per-step scales are static, and runs of equal scales become one ``lax.scan``.

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.els(imgs)
    >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    >>> ej.samplers.ddim(m, x, [0.9, 0.5, 0.2, 0.0], scales=[5, 3, 3]).shape
    (2, 8, 8, 1)
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ellsjax import _checks
from ellsjax.machines.base import Denoiser

__all__ = ["ddim", "Trajectory", "check_times", "check_scales"]


class Trajectory(NamedTuple):
    """A sampled trajectory.

    Attributes:
        ts: ``[S+1]`` the times.
        xs: ``[S+1, B, H, W, C]`` ``x_t`` at each time (``xs[0]`` is the start, ``xs[-1]`` the sample).
        x0s: ``[S, B, H, W, C]`` the denoiser's ``x̂0`` at each step's start time ``ts[i]``.
    """

    ts: Float[Array, " s1"]
    xs: Float[Array, "s1 b h w c"]
    x0s: Float[Array, "s b h w c"]


def check_times(ts: Any, denoiser: Denoiser, name: str = "ts") -> jax.Array:
    """Check a reverse-time grid: 1-D, at least 2 times, strictly decreasing, in [0, 1], and with
    positive noise at every step's start time. Returns it as float32."""
    arr = jnp.asarray(ts, jnp.float32) if not isinstance(ts, jax.Array) else ts.astype(jnp.float32)
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-D grid of at least 2 decreasing times, got shape {arr.shape}")
    if _checks.is_concrete(arr):
        v = np.asarray(arr)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name}: contains NaN or inf")
        if v.min() < 0 or v.max() > 1:
            raise ValueError(f"{name}: times must lie in [0, 1], got [{v.min()}, {v.max()}]")
        if not np.all(np.diff(v) < 0):
            raise ValueError(f"{name}: times must be strictly decreasing (ts[0] is the start time), got {v}")
        signal, var = (np.asarray(v) for v in denoiser.schedule.variances(arr[:-1]))
        if np.any(var <= 0):
            raise ValueError(f"{name}: a step starts where the noise level is 0; only the last time may be noise-free")
        if np.any(signal <= denoiser.min_signal_var):
            bad = v[:-1][signal <= denoiser.min_signal_var]
            raise ValueError(
                f"{name}: this denoiser's x̂0 is undefined where the signal level a(t) is 0, but steps start "
                f"at t = {bad.tolist()}; start the grid below it (e.g. ts[0] = 0.999)"
            )
    return arr


def check_scales(scales: Any, denoiser: Denoiser, nsteps: int, name: str = "scales") -> tuple | None:
    """Check per-step scales (one per step, ``len(ts) − 1``) for this denoiser; returns a tuple."""
    if scales is None:
        if denoiser.needs_scale:
            raise ValueError(f"{name}: this denoiser needs a patch size per step ({nsteps} values)")
        return None
    if isinstance(scales, (str, bytes)) or not isinstance(scales, (Sequence, np.ndarray, jax.Array)):
        raise TypeError(f"{name}: expected a sequence of {nsteps} odd ints, got {scales!r}")
    scales = [s.item() if hasattr(s, "item") else s for s in scales]
    if len(scales) != nsteps:
        raise ValueError(f"{name}: expected {nsteps} values (one per step, len(ts) - 1), got {len(scales)}")
    out = []
    for i, s in enumerate(scales):
        try:
            out.append(denoiser.check_scale(s))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}[{i}]: {e}") from None
    # all-None (a network given placeholder scales) is the same program as no scales: one compile
    return None if all(k is None for k in out) else tuple(out)


class _Progress:
    """Relays ``jax.debug.callback`` ticks from inside the compiled trajectory to a Python callable."""

    target: Callable[[int], None] | None = None

    @classmethod
    def tick(cls, i):
        if cls.target is not None:
            cls.target(int(i))


def _segments(scales: tuple | None, nsteps: int):
    """Runs of equal scales: ``(first step, length, scale)``."""
    keys = scales if scales is not None else (None,) * nsteps
    start = 0
    for k, grp in itertools.groupby(keys):
        n = len(list(grp))
        yield start, n, k
        start += n


@partial(jax.jit, static_argnames=("scales", "progress", "keep", "method"))
def _ddim(denoiser, x, ts, label, *, scales, progress, keep, method="_denoise"):
    """The DDIM trajectory. ``method`` names the denoiser's pure x̂0 method; one that returns
    ``(x̂0, aux)`` (e.g. ``_denoise_provenance``) has its ``aux`` stacked over the steps.

    Returns ``(x, (xs, x0s) | None, aux | None)``."""
    ab, var = denoiser.schedule.variances(ts)
    a, s = jnp.sqrt(ab), jnp.sqrt(var)
    b = x.shape[0]

    def step(x, i, k):
        x0 = getattr(denoiser, method)(x, jnp.full((b,), ts[i]), label, k)
        x0, aux = x0 if isinstance(x0, tuple) else (x0, None)
        eps = (x - a[i] * x0) / s[i]
        x_next = a[i + 1] * x0 + s[i + 1] * eps
        if progress:
            jax.debug.callback(_Progress.tick, i, ordered=True)
        return x_next, ((x_next, x0) if keep else None, aux)

    outs = []
    for start, n, k in _segments(scales, ts.shape[0] - 1):
        if n == 1:
            x, out = step(x, start, k)
            out = jax.tree.map(lambda v: v[None], out)
        else:
            x, out = jax.lax.scan(lambda c, i, k=k: step(c, i, k), x, jnp.arange(start, start + n))
        outs.append(out)
    traj, aux = jax.tree.map(lambda *v: jnp.concatenate(v), *outs)
    return x, traj, aux


def ddim(
    denoiser: Denoiser,
    x_start: Float[ArrayLike, "b h w c"],
    ts: Float[ArrayLike, " s1"],
    *,
    scales: Sequence[int] | None = None,
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
        scales: ``len(ts) − 1`` patch sizes, ``scales[i]`` used at ``ts[i]`` (static: one compile
            per distinct tuple). Required by the local machines.
        label: ``None``, a class id, or ``[B]`` ids, for a conditional denoiser.
        return_trajectory: also return a :class:`Trajectory` of every ``x_t`` and ``x̂0``.
        progress: ``True`` shows a tqdm bar; a callable receives each finished step's index.

    Returns:
        The sample ``x_{ts[-1]}`` (and the trajectory if asked).
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser: expected an ellsjax Denoiser (machine or model), got {type(denoiser).__name__}")
    x = _checks.as_image_batch(x_start, "x_start", shape=denoiser.image_shape)
    ts = check_times(ts, denoiser)
    scales = check_scales(scales, denoiser, ts.shape[0] - 1)
    label = _checks.as_labels(label, x.shape[0])
    if label is None or _checks.is_concrete(label):
        denoiser.check_label(label)

    nsteps = ts.shape[0] - 1
    if all(_checks.is_concrete(v) for v in jax.tree.leaves(denoiser)):
        denoiser = denoiser.prepare(scales if scales is not None else (None,), conditional=label is not None)
    with _progress_target(progress, nsteps) as has_progress:
        x, traj, _ = _ddim(denoiser, x, ts, label, scales=scales, progress=has_progress, keep=bool(return_trajectory))
        x = jax.block_until_ready(x)
        if has_progress:
            jax.effects_barrier()
    if return_trajectory:
        xs = jnp.concatenate([jnp.asarray(x_start, jnp.float32)[None], traj[0]])
        return x, Trajectory(ts, xs, traj[1])
    return x


@contextlib.contextmanager
def _progress_target(progress, total):
    if not progress:
        yield False
        return
    bar = None
    if callable(progress):
        target = progress
    else:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="sampling", unit="step")
        target = lambda i: bar.update(1)  # noqa: E731
    previous, _Progress.target = _Progress.target, target
    try:
        yield True
    finally:
        _Progress.target = previous
        if bar is not None:
            bar.close()
