r"""The EDM (variance-exploding) parametrization and its exact conversions to and from VP times.

Karras et al. (EDM, "Elucidating the Design Space of Diffusion-Based Generative Models", 2022) write
the forward process as ``x̃ = x0 + σ·ε``. A variance-preserving state ``x_t = a·x0 + s·ε`` of any
:class:`~ellsjax.schedules.Schedule` is the same process, rescaled:

.. math::

    \sigma(t) = \frac{s(t)}{a(t)}, \qquad \tilde x = \frac{x_t}{a}, \qquad
    a = \frac{1}{\sqrt{1+\sigma^2}}, \qquad s = \frac{\sigma}{\sqrt{1+\sigma^2}},

so ``a`` and ``s`` depend on ``σ`` alone; only the clock ``t ↦ σ`` belongs to the schedule. Its inverse
``t(σ)`` is closed form for every schedule kind (``ᾱ = 1/(1+σ²)``):

* ``cosine_legacy``: ``t = 1.008 · (2/π) · arctan σ``;
* ``cosine(offset)``: ``t = (1 + offset) · (2/π) · arctan σ − offset``;
* ``linear``: ``t = (σ²/(1+σ²) − beta_min)/(beta_max − beta_min)``;
* ``ddpm_linear``: ``log(1 + σ²) = −log ᾱ(t)`` inverted on the schedule's piecewise-linear table;
* ``exponential``: ``t = log(1 + σ²)/rate``.

The Karras time grid (EDM eq. 5) is ``σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``,
``i = 0 … n−1``, then ``σ_n = 0``; EDM uses ``n = 18``, ``σ ∈ [0.002, 80]``, ``ρ = 7``. The paper's
``cosine_legacy`` schedule spans ``σ ∈ [0, 80.2]``, so the EDM grid fits inside it.

Example:
    >>> import numpy as np, ellsjax as ej
    >>> sched = ej.schedules.cosine_legacy()
    >>> sig = ej.edm.karras_sigmas(18)              # 18 noise levels from 80 to 0.002, then 0
    >>> ts = ej.edm.to_time(sig, sched)             # the same grid as VP times
    >>> bool(np.allclose(ej.edm.to_sigma(ts, sched), sig, rtol=1e-4))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ellsjax import _checks
from ellsjax import schedules as _schedules

__all__ = [
    "to_sigma",
    "to_time",
    "sigma_range",
    "signal_noise",
    "to_edm",
    "from_edm",
    "karras_sigmas",
    "karras_times",
]


def to_sigma(t: Float[ArrayLike, "*t"], schedule: _schedules.Schedule | str) -> Float[Array, "*t"]:
    """EDM noise level ``σ(t) = s(t)/a(t)`` of a VP schedule (``+inf`` where ``a(t) = 0``).

    Args:
        t: times in ``[0, 1]``.
        schedule: the VP schedule (object or name).
    """
    schedule = _schedules.get(schedule)
    ab, var = schedule.variances(jnp.asarray(t, jnp.float32))
    return jnp.sqrt(var / ab)  # var/0 = inf where the signal is gone


def sigma_range(schedule: _schedules.Schedule | str) -> tuple[float, float]:
    """``(σ(0), σ(1))``: the EDM noise levels a schedule covers (``σ(1)`` may be ``inf``)."""
    lo, hi = np.asarray(to_sigma(jnp.array([0.0, 1.0]), schedule), np.float64)
    return float(lo), float(hi)


def to_time(sigma: Float[ArrayLike, "*s"] | Sequence[Real], schedule: _schedules.Schedule | str) -> Float[Array, "*s"]:
    """The VP time ``t(σ)`` with ``σ(t(σ)) = σ``: the exact inverse of :func:`to_sigma`.

    Concrete values outside the schedule's range :func:`sigma_range` (beyond float32 rounding) raise;
    traced values are clipped to ``t ∈ [0, 1]``.

    Args:
        sigma: EDM noise levels ``≥ 0``.
        schedule: the VP schedule (object or name).
    """
    schedule = _schedules.get(schedule)
    sig = jnp.asarray(sigma, jnp.float32)
    if _checks.is_concrete(sig):
        v = np.asarray(sig, np.float64)
        if np.any(np.isnan(v)) or np.any(v < 0):
            raise ValueError(f"sigma: noise levels must be >= 0 and not NaN, got min {np.nanmin(v) if v.size else v}")
        lo, hi = sigma_range(schedule)
        tol = 1e-4
        if v.size and (v.min() < lo * (1 - tol) - 1e-12 or v.max() > hi * (1 + tol)):
            raise ValueError(
                f"sigma: values in [{v.min():.6g}, {v.max():.6g}] leave the range [{lo:.6g}, {hi:.6g}] "
                f"that schedule {schedule.kind!r} covers for t in [0, 1]"
            )
    two_over_pi = 2.0 / math.pi
    if schedule.kind == "cosine_legacy":
        t = 1.008 * two_over_pi * jnp.arctan(sig)
    elif schedule.kind == "cosine":
        t = (1.0 + schedule.offset) * two_over_pi * jnp.arctan(sig) - schedule.offset
    elif schedule.kind == "linear":
        var = 1.0 / (1.0 + 1.0 / jnp.square(sig))  # σ²/(1+σ²), exact at σ = 0 and σ = inf
        t = (var - schedule.beta_min) / (schedule.beta_max - schedule.beta_min)
    elif schedule.kind == "ddpm_linear":
        # −log ᾱ = log(1 + σ²) is increasing in t; invert the schedule's piecewise-linear table
        neg = -schedule._ddpm_log_alpha_bar()
        grid = np.linspace(0.0, 1.0, schedule.steps + 1)
        t = jnp.interp(jnp.log1p(jnp.square(sig)), jnp.asarray(neg, jnp.float32), jnp.asarray(grid, jnp.float32))
    else:
        t = jnp.log1p(jnp.square(sig)) / schedule.rate
    return jnp.clip(t, 0.0, 1.0)


def signal_noise(sigma: Float[ArrayLike, "*s"] | Sequence[Real]) -> tuple[Float[Array, "*s"], Float[Array, "*s"]]:
    """``(a, s) = (1/√(1+σ²), σ/√(1+σ²))``: the VP coefficients of an EDM noise level (any schedule)."""
    sig = jnp.asarray(sigma, jnp.float32)
    a = jax.lax.rsqrt(1.0 + jnp.square(sig))
    s = jax.lax.rsqrt(1.0 + 1.0 / jnp.square(sig))  # 0 at σ = 0, 1 at σ = inf
    return a, s


def to_edm(x_t: Float[ArrayLike, "b *d"], sigma: Float[ArrayLike, "*s"] | Sequence[Real]) -> Float[Array, "b *d"]:  # noqa: F821 (jaxtyping shape)
    """The EDM state ``x̃ = x_t/a = x_t·√(1+σ²)`` of a VP state at noise level ``σ`` (scalar or ``[B]``)."""
    x = jnp.asarray(x_t, jnp.float32)
    sig = jnp.asarray(sigma, jnp.float32)
    scale = jnp.sqrt(1.0 + jnp.square(sig))
    return x * scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim))


def from_edm(x_edm: Float[ArrayLike, "b *d"], sigma: Float[ArrayLike, "*s"] | Sequence[Real]) -> Float[Array, "b *d"]:  # noqa: F821 (jaxtyping shape)
    """The VP state ``x_t = a·x̃ = x̃/√(1+σ²)`` of an EDM state at noise level ``σ`` (scalar or ``[B]``)."""
    x = jnp.asarray(x_edm, jnp.float32)
    a, _ = signal_noise(sigma)
    return x * a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def karras_sigmas(
    n: int = 18,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    append_zero: bool = True,
) -> np.ndarray:
    """The EDM noise-level grid (Karras et al. 2022, eq. 5), decreasing.

    ``σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ`` for ``i = 0 … n−1``, followed by
    ``σ_n = 0`` when ``append_zero`` (the EDM sampler's last step lands on the data).

    Args:
        n: number of positive noise levels (EDM: 18 for CIFAR-10, 40 for 64×64 data).
        sigma_min: smallest positive level.
        sigma_max: largest level.
        rho: the grid's warping exponent (7 in EDM).
        append_zero: end the grid with ``0``.

    Returns:
        float32 ``[n + 1]`` (or ``[n]``).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n: need an integer >= 2, got {n!r}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho: must be positive, got {rho}")
    i = np.arange(n, dtype=np.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (hi + i / (n - 1) * (lo - hi)) ** rho
    if append_zero:
        sig = np.append(sig, 0.0)
    return sig.astype(np.float32)


def karras_times(
    n: int,
    schedule: _schedules.Schedule | str,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    append_zero: bool = True,
) -> np.ndarray:
    """The Karras grid :func:`karras_sigmas` as VP times of ``schedule`` (float32, decreasing).

    With ``append_zero`` the last time is ``t(0)``: ``0`` for schedules that are noise-free at
    ``t = 0``; schedules with ``s(0) > 0`` (``cosine`` with an offset, ``linear`` with
    ``beta_min > 0``) cannot reach ``σ = 0`` and raise.

    Example:
        >>> import ellsjax as ej
        >>> ts = ej.edm.karras_times(18, "cosine_legacy")
        >>> len(ts), float(ts[-1])
        (19, 0.0)
    """
    sig = karras_sigmas(n, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, append_zero=append_zero)
    ts = np.asarray(to_time(sig, schedule), np.float32)
    if np.any(np.diff(ts) >= 0):
        raise ValueError(
            f"sigma_min, sigma_max: the grid is not strictly decreasing in VP time (float32 resolution); "
            f"got {ts}"
        )
    return ts
