r"""σ-CFDM: the smoothed closed-form score of Scarvelis, Borde & Solomon ("Closed-Form Diffusion
Models", TMLR 2025).

The closed-form (ideal) score is smoothed by averaging its softmax weights over ``M`` perturbed
queries. In the authors' rectified-flow convention (their time ``τ ∈ [0, 1]``, data at ``τ = 1``)

.. math::

    z_\tau = \tau\, x_0 + (1-\tau)\,\varepsilon, \qquad
    \hat x_0(z, \tau) = \frac{1}{M}\sum_{m=1}^{M} \sum_j
        \mathrm{softmax}_j\Big(-\frac{\|z + \sigma\varepsilon_m - \tau\phi_j\|^2}{2(1-\tau)^2}\Big)\,\phi_j ,

and their score is ``(τ·x̂0 − z)/(1−τ)²``. (The issue text writes the same interpolant with the time
reversed, ``x = (1−τ')x0 + τ'ε``, ``τ' = 1 − τ``.)

**Time map.** A VP state ``x_t = a·x0 + s·ε`` has the same signal-to-noise ratio as ``z_τ`` when
``τ/(1−τ) = a/s``:

.. math::

    \tau(t) = \frac{a(t)}{a(t) + s(t)} = \frac{1}{1 + \sigma_{\mathrm{EDM}}(t)}, \qquad
    z = \frac{x_t}{a + s},

(:func:`cfdm_time`, :func:`from_cfdm_time`). ``σ`` stays in the authors' ``z`` units, so a
perturbation ``z + σε`` is ``x_t + σ(a+s)ε`` here, and with it the softmax above is exactly
``softmax_j(−‖x_t + σ(a+s)ε_m − aφ_j‖²/2s²)``, the ideal-score softmax at a perturbed query.
With ``σ = 0`` the machine is the ideal score machine (IS).

**Noise.** The ``M`` perturbations ``ε_m ~ N(0, I)`` are drawn once, at construction, from ``key``
(deterministic given the key) and shared by every image and every call, as the reference code keeps
its noise fixed along a trajectory. :meth:`SmoothedClosedForm.resample` redraws them; the authors
redraw them for every sample, i.e. call ``resample`` per trajectory (or batch) to match.

Each perturbed query's softmax is exact (streamed over the training set by
:func:`ellsjax.kernel.streaming_softmax`); the average over ``m`` is then taken. The authors'
nearest-neighbour estimator (``SmoothedDEANN``) approximates this same quantity.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax import edm as _edm
from ellsjax import kernel as _kernel
from ellsjax import schedules as _schedules
from ellsjax.machines import _registry
from ellsjax.machines.base import Machine, TrainingImages, build, prepare_training_set, register

__all__ = ["SmoothedClosedForm", "cfdm", "cfdm_time", "from_cfdm_time"]


def cfdm_time(t: Float[ArrayLike, "*t"], schedule: _schedules.Schedule | str) -> Float[Array, "*t"]:
    """The σ-CFDM time ``τ = a/(a + s)`` (data at ``τ = 1``) of VP times ``t`` under ``schedule``.

    Example:
        >>> import ellsjax as ej
        >>> tau = ej.machines.cfdm_time(0.5, "cosine_legacy")
        >>> round(float(ej.machines.from_cfdm_time(tau, "cosine_legacy")), 5)
        0.5
    """
    schedule = _schedules.get(schedule)
    a, s = schedule(jnp.asarray(t, jnp.float32))
    return a / (a + s)


def from_cfdm_time(tau: Float[ArrayLike, "*t"], schedule: _schedules.Schedule | str) -> Float[Array, "*t"]:
    """The VP time of σ-CFDM time ``τ ∈ (0, 1]``: ``t = t_EDM((1 − τ)/τ)`` (see :mod:`ellsjax.edm`)."""
    tau = jnp.asarray(tau, jnp.float32)
    if _checks.is_concrete(tau) and bool(jnp.any((tau <= 0) | (tau > 1) | jnp.isnan(tau))):
        raise ValueError("tau: σ-CFDM times must lie in (0, 1] (τ = 0 is pure noise: σ_EDM = inf)")
    return _edm.to_time((1.0 - tau) / tau, schedule)


@dataclasses.dataclass(frozen=True, eq=False)
class SmoothedClosedForm(Machine):
    """σ-CFDM. Build with :func:`cfdm`. It has no scale.

    Attributes (beyond :class:`~ellsjax.machines.Machine`):
        noise: ``[M, H, W, C]`` the fixed perturbations ``ε_m``.
        sigma: smoothing level ``σ`` in σ-CFDM ``z`` units.
    """

    noise: Float[Array, "m h w c"] | None = None
    sigma: float = 0.0

    _DATA_FIELDS: ClassVar[tuple[str, ...]] = Machine._DATA_FIELDS + ("noise",)

    def resample(self, key: jax.Array | int) -> SmoothedClosedForm:
        """A copy with ``M`` fresh perturbations drawn from ``key`` (same ``M``, same ``σ``)."""
        return dataclasses.replace(self, noise=_draw(key, self.noise.shape[0], self.image_shape))

    def _denoise(self, x_t, t, label, scale):
        b, h, w, ch = x_t.shape
        d = h * w * ch
        mm = self.noise.shape[0]
        ab, var = self.schedule.variances(t)
        a, s = jnp.sqrt(ab), jnp.sqrt(var)
        # z + σε in σ-CFDM units is x_t + σ(a+s)ε in ours
        shift = (self.sigma * (a + s))[:, None, None]
        q = x_t.reshape(b, 1, d) + shift * self.noise.reshape(1, mm, d)  # [B, M, d]
        qa = jnp.broadcast_to(a[:, None], (b, mm))
        qt = jnp.broadcast_to((0.5 / var)[:, None], (b, mm))
        if label is None:  # one bank for the batch: B·M queries
            queries = _kernel.Queries(q.reshape(1, b * mm, d), qa.reshape(1, b * mm), qt.reshape(1, b * mm))
            per_image = 4 * (3 * d + 2 * b * mm + 2)
        else:  # each image against its class
            queries = _kernel.Queries(q, qa, qt)
            per_image = 4 * b * (3 * d + 2 * mm + 2)
        members, valid, nchunks, c = self._chunking(label, per_image)

        def bank_fn(i):
            imgs, ok = self._chunk(members, valid, c, i)
            flat = imgs.reshape(imgs.shape[0], c, d)
            return _kernel.make_bank(flat, flat, ok)

        mean, _ = _kernel.streaming_softmax(queries, bank_fn, nchunks)
        return mean.reshape(b, mm, d).mean(axis=1).reshape(b, h, w, ch)


register(SmoothedClosedForm)


def _draw(key: Any, m: int, shape: tuple[int, int, int]) -> jax.Array:
    if isinstance(key, (numbers.Integral,)) and not isinstance(key, bool):
        key = jax.random.key(int(key))
    elif not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
            key = jax.random.wrap_key_data(key)
        else:
            raise TypeError(f"key: expected an int seed or a jax.random key, got {key!r}")
    return jax.random.normal(key, (m, *shape), jnp.float32)


def cfdm(
    images: TrainingImages,
    labels: Int[ArrayLike, " n"] | None = None,
    *,
    sigma: float = 0.5,
    num_noise: int = 8,
    key: jax.Array | int = 0,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    platform: str | None = None,
) -> SmoothedClosedForm:
    """The σ-CFDM machine: ideal-score softmax weights averaged over ``M`` perturbed queries.

    ``x̂0 = (1/M) Σ_m Σ_j softmax_j(−‖x_t + σ(a+s)ε_m − aφ_j‖²/2s²) φ_j`` (the module docstring
    derives it from the authors' convention).

    Args:
        images: ``[N, H, W, C]`` float training images in ``[-1, 1]``.
        labels: optional ``[N]`` int class ids for conditional denoising.
        sigma: smoothing level ``σ ≥ 0`` in σ-CFDM ``z`` units (0: the ideal score). The default 0.5
            is a moderate value for images in ``[-1, 1]``, not a published one: tune it per dataset.
        num_noise: ``M``, the number of perturbations.
        key: int seed or ``jax.random`` key for the perturbations (deterministic given it).
        schedule: noise schedule (object or name).
        image_range: the documented pixel range the training images are checked against
            (``None``: any real data, e.g. samples of a Gaussian).
        chunk_size: training images per streamed chunk (``None``: from ``memory_budget``).
        memory_budget: bytes of temporaries per chunk (``None``: a per-backend default).
        platform: whose budgets apply, ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``None``: the platform of the
            devices the images live on).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (6, 6, 6, 1), minval=-1, maxval=1)
        >>> m = ej.machines.cfdm(imgs, sigma=0.3, num_noise=4, key=1)
        >>> m.denoise(imgs[:2], 0.5).shape
        (2, 6, 6, 1)
    """
    sigma_f = float(sigma) if isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) else None
    if sigma_f is None or not np.isfinite(sigma_f) or sigma_f < 0:
        raise ValueError(f"sigma: expected a finite float >= 0, got {sigma!r}")
    num_noise = _checks.check_positive_int(num_noise, "num_noise")
    imgs, _, _ = prepare_training_set(images, labels, image_range=image_range)
    noise = _draw(key, num_noise, tuple(imgs.shape[1:]))
    return build(
        SmoothedClosedForm, imgs, labels, schedule=schedule, image_range=image_range, chunk_size=chunk_size, memory_budget=memory_budget,
        noise=noise, sigma=sigma_f, platform=platform,
    )


_registry.register(_registry.MachineSpec(
    name="cfdm", builder=cfdm, machine=SmoothedClosedForm,
    summary="σ-CFDM: ideal-score weights averaged over perturbed queries",
    reference="Scarvelis, Borde & Solomon, TMLR 2025",
))
