"""Noise schedules and the paper's time grid (the published patch-size schedules: :mod:`ellsjax.presets`;
per-step scale schedules: :class:`ellsjax.scales.ScaleSchedule`).

The forward process is variance preserving: ``x_t = a(t)·x0 + s(t)·ε`` with ``a = sqrt(ᾱ(t))`` and
``s = sqrt(1 − ᾱ(t))`` for ``t ∈ [0, 1]``. A :class:`Schedule` is a small frozen, hashable record, so it
can sit in the static part of a machine's pytree and in ``jax.jit`` static arguments.

Example:
    >>> import ellsjax as ej
    >>> sched = ej.schedules.cosine_legacy()
    >>> a, s = sched(0.5)
    >>> round(float(a**2 + s**2), 6)
    1.0
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

__all__ = [
    "Schedule",
    "cosine_legacy",
    "cosine",
    "linear",
    "exponential",
    "ddpm_linear",
    "get",
    "paper_times",
]

_Kind = Literal["cosine_legacy", "cosine", "linear", "exponential", "ddpm_linear"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A variance-preserving noise schedule ``t ↦ (a(t), s(t))`` with ``a² + s² = 1``.

    Build one with :func:`cosine_legacy` (the paper's), :func:`cosine`, :func:`linear`,
    :func:`exponential` or :func:`ddpm_linear`; the fields are the schedule's parameters and are
    hashable.

    Attributes:
        kind: which family.
        offset: cosine offset (``cosine`` only).
        beta_min: ``1 − ᾱ(0)`` (``linear``); the first step's ``β`` (``ddpm_linear``).
        beta_max: ``1 − ᾱ(1)`` (``linear``); the last step's ``β`` (``ddpm_linear``).
        rate: ``ᾱ(t) = exp(−rate·t)`` (``exponential`` only).
        steps: number of discrete steps ``T`` (``ddpm_linear`` only).
    """

    kind: _Kind = "cosine_legacy"
    offset: float = 0.0
    beta_min: float = 0.0
    beta_max: float = 0.0
    rate: float = 2.0
    steps: int = 1000

    def __post_init__(self):
        if self.kind not in ("cosine_legacy", "cosine", "linear", "exponential", "ddpm_linear"):
            raise ValueError(f"kind: unknown schedule {self.kind!r}")
        if self.kind == "cosine" and not (0.0 <= self.offset < 1.0):
            raise ValueError(f"offset: must lie in [0, 1), got {self.offset}")
        if self.kind == "linear" and not (0.0 <= self.beta_min < self.beta_max <= 1.0):
            raise ValueError(
                f"beta_min, beta_max: need 0 <= beta_min < beta_max <= 1, got {self.beta_min}, {self.beta_max}"
            )
        if self.kind == "ddpm_linear" and not (0.0 < self.beta_min <= self.beta_max < 1.0 and self.steps >= 2):
            raise ValueError(f"beta_min, beta_max, steps: need 0 < beta_min <= beta_max < 1 and steps >= 2, got "
                             f"{self.beta_min}, {self.beta_max}, {self.steps}")
        if self.kind == "exponential" and not self.rate > 0:
            raise ValueError(f"rate: must be positive, got {self.rate}")

    # ``1 − ᾱ`` and ``ᾱ`` are computed separately (sin² / cos², expm1) so that both stay accurate at
    # the ends of [0, 1]: at t → 0 the softmax temperature is 1/(2(1 − ᾱ)).
    def variances(self, t: ArrayLike) -> tuple[Float[Array, "*t"], Float[Array, "*t"]]:
        """Return ``(ᾱ(t), 1 − ᾱ(t))``, each accurate to float32 rounding."""
        t = jnp.asarray(t, jnp.float32)
        if self.kind in ("cosine_legacy", "cosine"):
            # legacy: no offset in the numerator but the 1.008 denominator kept (the paper's choice)
            off, denom = (0.0, 1.008) if self.kind == "cosine_legacy" else (self.offset, 1.0 + self.offset)
            theta = (t + off) / denom * (math.pi / 2)
            return jnp.cos(theta) ** 2, jnp.sin(theta) ** 2
        if self.kind == "linear":
            var = self.beta_min + (self.beta_max - self.beta_min) * t
            return 1.0 - var, var
        if self.kind == "ddpm_linear":
            # log ᾱ at the integer steps (float64 on the host), linear in between: exact at t = (i+1)/T
            log_ab = self._ddpm_log_alpha_bar()
            grid = np.linspace(0.0, 1.0, self.steps + 1)
            la = jnp.interp(jnp.clip(t, 0.0, 1.0), jnp.asarray(grid, jnp.float32), jnp.asarray(log_ab, jnp.float32))
            return jnp.exp(la), -jnp.expm1(la)
        var = -jnp.expm1(-self.rate * t)
        return jnp.exp(-self.rate * t), var

    def _ddpm_log_alpha_bar(self) -> np.ndarray:
        """``log ᾱ`` at ``t = 0, 1/T, …, 1``: 0 (clean) and then after each of the ``T`` steps."""
        betas = np.linspace(self.beta_min, self.beta_max, self.steps, dtype=np.float64)
        return np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])

    def alpha_bar(self, t: ArrayLike) -> Float[Array, "*t"]:
        """``ᾱ(t)``, the signal variance."""
        return self.variances(t)[0]

    def __call__(self, t: ArrayLike) -> tuple[Float[Array, "*t"], Float[Array, "*t"]]:
        """Return ``(a(t), s(t)) = (sqrt(ᾱ), sqrt(1 − ᾱ))``."""
        ab, var = self.variances(t)
        return jnp.sqrt(ab), jnp.sqrt(var)

    def describe(self) -> str:
        """A one-line human-readable formula of ``1 − ᾱ(t)``."""
        if self.kind == "cosine_legacy":
            return "1 - abar(t) = 1 - cos^2(t/1.008 * pi/2)"
        if self.kind == "cosine":
            return f"1 - abar(t) = 1 - cos^2((t+{self.offset})/{1 + self.offset} * pi/2)"
        if self.kind == "linear":
            return f"1 - abar(t) = {self.beta_min} + {self.beta_max - self.beta_min}*t"
        if self.kind == "ddpm_linear":
            return (f"abar((i+1)/{self.steps}) = prod_(j<=i) (1 - beta_j), beta linear from {self.beta_min} to "
                    f"{self.beta_max} over {self.steps} steps; abar(0) = 1")
        return f"1 - abar(t) = 1 - exp(-{self.rate}*t)"


def cosine_legacy() -> Schedule:
    """The paper's schedule: ``1 − ᾱ(t) = 1 − cos²(t/1.008 · π/2)``.

    Noise-free at ``t = 0``; at ``t = 1`` a small signal remains (``a(1) ≈ 0.0125``).
    """
    return Schedule("cosine_legacy")


def cosine(offset: float = 0.008) -> Schedule:
    """Nichol & Dhariwal's cosine: ``1 − ᾱ(t) = 1 − cos²((t + offset)/(1 + offset) · π/2)``.

    ``a(1) = 0`` (pure noise) and ``s(0) > 0`` for ``offset > 0``.
    """
    return Schedule("cosine", offset=float(offset))


def linear(beta_min: float = 0.01, beta_max: float = 0.98) -> Schedule:
    """Linear noise variance: ``1 − ᾱ(t) = beta_min + (beta_max − beta_min)·t``.

    The defaults are the reference implementation's ``linear_noise_schedule`` (0.01 + 0.97·t).
    """
    return Schedule("linear", beta_min=float(beta_min), beta_max=float(beta_max))


def exponential(rate: float = 2.0) -> Schedule:
    """Exponential decay of the signal variance: ``1 − ᾱ(t) = 1 − exp(−rate·t)`` (reference: rate 2)."""
    return Schedule("exponential", rate=float(rate))


def ddpm_linear(beta_start: float = 1e-4, beta_end: float = 0.02, steps: int = 1000) -> Schedule:
    """Ho et al.'s discrete linear-β DDPM schedule (the locality protocol's: 1e-4 to 0.02 over 1000 steps).

    ``ᾱ_i = Π_{j ≤ i} (1 − β_j)`` with ``β_j`` linear from ``beta_start`` to ``beta_end``
    (diffusers' ``beta_schedule="linear"``); step ``i = 0 … steps−1`` sits at ``t = (i + 1)/steps``,
    ``t = 0`` is clean (``ᾱ = 1``, diffusers' ``set_alpha_to_one``: where DDIM's last step lands), and
    ``log ᾱ`` is linear in between. DDIM's ``t_idx`` 900, 800, …, 0 are ``t = (idx + 1)/1000``.
    """
    return Schedule("ddpm_linear", beta_min=float(beta_start), beta_max=float(beta_end), steps=int(steps))


_BUILDERS = {"cosine_legacy": cosine_legacy, "cosine": cosine, "linear": linear, "exponential": exponential,
             "ddpm_linear": ddpm_linear}


def get(name: str | Schedule) -> Schedule:
    """Look a schedule up by name (``cosine_legacy``, ``cosine``, ``linear``, ``exponential``)."""
    if isinstance(name, Schedule):
        return name
    try:
        return _BUILDERS[name]()
    except (KeyError, TypeError):
        raise ValueError(f"schedule: unknown schedule {name!r}; known: {sorted(_BUILDERS)}") from None


def paper_times(nsteps: int = 20) -> np.ndarray:
    """The paper's reverse-time grid: ``t_i = (nsteps − 1 − i)/nsteps`` for ``i = 0 … nsteps − 1``.

    The reference sampler starts from pure noise treated as ``t = (nsteps−1)/nsteps`` and takes
    ``nsteps − 1`` deterministic DDIM steps down to ``t = 0``. With ``nsteps = 20``:
    ``[0.95, 0.90, …, 0.05, 0.0]`` (20 times, 19 steps).
    """
    if not isinstance(nsteps, (int, np.integer)) or nsteps < 2:
        raise ValueError(f"nsteps: need an integer >= 2, got {nsteps!r}")
    return (np.arange(nsteps - 1, -1, -1) / nsteps).astype(np.float32)
