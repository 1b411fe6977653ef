"""Noise schedules, the paper's time grid and the published locality-scale presets.

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
import json
import math
import os
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

__all__ = [
    "Schedule",
    "cosine_legacy",
    "cosine",
    "linear",
    "exponential",
    "get",
    "paper_times",
    "PAPER_SCALES",
    "PAPER_SCALES_SOURCE",
    "paper_scales",
    "resolve_scales",
    "save_scales",
]

_Kind = Literal["cosine_legacy", "cosine", "linear", "exponential"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A variance-preserving noise schedule ``t ↦ (a(t), s(t))`` with ``a² + s² = 1``.

    Build one with :func:`cosine_legacy` (the paper's), :func:`cosine`, :func:`linear` or
    :func:`exponential`; the fields are the schedule's parameters and are hashable.

    Attributes:
        kind: which family.
        offset: cosine offset (``cosine`` only).
        beta_min: ``1 − ᾱ(0)`` (``linear`` only).
        beta_max: ``1 − ᾱ(1)`` (``linear`` only).
        rate: ``ᾱ(t) = exp(−rate·t)`` (``exponential`` only).
    """

    kind: _Kind = "cosine_legacy"
    offset: float = 0.0
    beta_min: float = 0.0
    beta_max: float = 0.0
    rate: float = 2.0

    def __post_init__(self):
        if self.kind not in ("cosine_legacy", "cosine", "linear", "exponential"):
            raise ValueError(f"kind: unknown schedule {self.kind!r}")
        if self.kind == "cosine" and not (0.0 <= self.offset < 1.0):
            raise ValueError(f"offset: must lie in [0, 1), got {self.offset}")
        if self.kind == "linear" and not (0.0 <= self.beta_min < self.beta_max <= 1.0):
            raise ValueError(
                f"beta_min, beta_max: need 0 <= beta_min < beta_max <= 1, got {self.beta_min}, {self.beta_max}"
            )
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
        var = -jnp.expm1(-self.rate * t)
        return jnp.exp(-self.rate * t), var

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


_BUILDERS = {"cosine_legacy": cosine_legacy, "cosine": cosine, "linear": linear, "exponential": exponential}


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


# Published per-step patch sizes, Kamb & Ganguli, "An analytic theory of creativity in convolutional
# diffusion models" (arXiv 2412.20292), as released in github.com/Kambm/convolutional_diffusion,
# files/scales_*.pt (copied from ../shared/reference/kamb_ganguli_scales.json). Index j = 0 … 19,
# 0 = lowest noise. Images 32×32 (MNIST/FashionMNIST resized from 28), cosine_legacy schedule.
# 'zeros' networks pair with the boundary-broken ELS machine, 'circular' with plain ELS.
PAPER_SCALES_SOURCE = (
    "Kamb & Ganguli, arXiv 2412.20292; github.com/Kambm/convolutional_diffusion files/scales_*.pt"
)
PAPER_SCALES: dict[str, tuple[int, ...]] = {
    "CIFAR10_ResNet_circular_conditional": (3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15, 15),
    "CIFAR10_ResNet_zeros_conditional": (3, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 11, 13, 15, 17, 17, 17),
    "CIFAR10_UNet_zeros_conditional": (3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 13, 13, 15, 17, 25),
    "CelebA_ResNet_zeros": (3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 15, 19, 19),
    "CelebA_UNet_zeros": (3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 13, 19, 27),
    "FashionMNIST_ResNet_zeros_conditional": (3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17),
    "FashionMNIST_UNet_zeros_conditional": (3, 3, 5, 5, 7, 7, 7, 9, 11, 11, 11, 13, 15, 15, 21, 23, 25, 25, 25, 25),
    "MNIST_ResNet_circular": (3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 11, 9, 9, 7, 7, 3, 3),
    "MNIST_ResNet_zeros": (3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15),
    "MNIST_UNet_zeros": (3, 3, 3, 5, 5, 7, 7, 7, 9, 9, 9, 11, 13, 15, 17, 21, 23, 23, 25, 27),
}


def paper_scales(
    name: str, *, convention: Literal["sampler", "calibration"] = "sampler"
) -> tuple[int, ...]:
    """Per-step patch sizes of a published preset, aligned with :func:`paper_times` (20 steps).

    Returns 19 scales, ``scales[i]`` used at ``paper_times(20)[i]``, ready for
    ``ej.samplers.ddim(m, x, paper_times(20), scales=...)``.

    The released files are ambiguous by one step: the calibration script stores at index ``j`` the
    best scale found at ``t = (j+1)/20``, while the reference sampler applies index ``j`` at
    ``t = j/20``. ``convention="sampler"`` (default) reproduces the reference sampler, i.e. the
    published figures; ``convention="calibration"`` uses at each ``t`` the scale calibrated there.

    Args:
        name: a key of :data:`PAPER_SCALES`, e.g. ``"MNIST_ResNet_zeros"``.
        convention: ``"sampler"`` or ``"calibration"``.
    """
    if name not in PAPER_SCALES:
        raise ValueError(f"name: unknown scale preset {name!r}; known: {sorted(PAPER_SCALES)}")
    raw = PAPER_SCALES[name]
    n = len(raw)
    if convention == "sampler":  # t = j/n uses raw[j], j = n-1 … 1
        return tuple(raw[j] for j in range(n - 1, 0, -1))
    if convention == "calibration":  # t = j/n uses raw[j-1]
        return tuple(raw[j - 1] for j in range(n - 1, 0, -1))
    raise ValueError(f"convention: must be 'sampler' or 'calibration', got {convention!r}")


def resolve_scales(spec: Any, *, nsteps: int = 20) -> tuple[np.ndarray, tuple[int, ...]]:
    """Turn a scale specification into a time grid and per-step scales for the sampler.

    Args:
        spec: a preset name of :data:`PAPER_SCALES` (with :func:`paper_times` ``(20)``), a path to a
            JSON schedule (``{"ts": [...], "scales": [...]}``, ``len(scales) == len(ts) − 1``; the
            format written by :func:`save_scales` and the calibration tools), a sequence of ints
            (one per step of ``paper_times(nsteps)``), a comma-separated string of them, or one int
            (the same scale at every step).
        nsteps: grid size used when ``spec`` carries no times.

    Returns:
        ``(ts, scales)`` with ``len(scales) == len(ts) − 1``.

    Example:
        >>> ts, sc = resolve_scales("MNIST_ResNet_zeros")
        >>> len(ts), len(sc)
        (20, 19)
    """
    if isinstance(spec, str) and spec in PAPER_SCALES:
        return paper_times(20), paper_scales(spec)
    if isinstance(spec, (str, os.PathLike)) and (os.fspath(spec).endswith(".json") or os.path.exists(spec)):
        path = os.fspath(spec)
        try:
            with open(path) as f:
                obj = json.load(f)
            ts, scales = np.asarray(obj["ts"], np.float32), tuple(int(k) for k in obj["scales"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"spec: cannot read a scale schedule from {path!r}: {e}") from None
        if ts.ndim != 1 or len(scales) != len(ts) - 1:
            raise ValueError(f"spec: {path!r} needs len(scales) == len(ts) - 1, got {len(scales)} and {ts.shape}")
        return ts, scales
    if isinstance(spec, str):
        try:
            spec = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"spec: {spec!r} is neither a preset ({sorted(PAPER_SCALES)}), a JSON file, nor comma-separated ints"
            ) from None
        if len(spec) == 1:
            spec = spec[0]
    ts = paper_times(nsteps)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return ts, (int(spec),) * (nsteps - 1)
    scales = tuple(int(k) for k in spec)
    if len(scales) != nsteps - 1:
        raise ValueError(f"spec: expected {nsteps - 1} scales for a {nsteps}-point grid, got {len(scales)}")
    return ts, scales


def save_scales(path: str | os.PathLike, ts: Any, scales: Any, **meta: Any) -> None:
    """Write a JSON scale schedule readable by :func:`resolve_scales` (extra ``meta`` is kept)."""
    ts = [float(t) for t in np.asarray(ts).ravel()]
    scales = [int(k) for k in scales]
    if len(scales) != len(ts) - 1:
        raise ValueError(f"scales: expected len(ts) - 1 = {len(ts) - 1} values, got {len(scales)}")
    with open(path, "w") as f:
        json.dump({"ts": ts, "scales": scales, **meta}, f, indent=1)
