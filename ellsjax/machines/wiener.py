r"""The Wiener machine: the optimal linear (Gaussian) denoiser from the data mean and covariance.

With the training mean ``μ`` and covariance ``Σ = U diag(λ) Uᵀ`` (one eigendecomposition at build
time, optionally truncated to the top ``rank`` components), the posterior mean of ``x0 ~ N(μ, Σ)``
given ``x_t = a·x0 + s·ε`` is

.. math::

    \hat x_0 = \mu + U\,\mathrm{diag}\Big(\frac{\lambda}{\lambda + \sigma^2}\Big)\,U^\top
               \Big(\frac{x_t}{a} - \mu\Big), \qquad \sigma = s/a,

computed as ``μ + U diag(aλ/(a²λ + s²)) Uᵀ (x_t − aμ)``, which stays finite at ``a = 0`` (it returns
``μ``) and at ``s = 0`` (it projects ``x_t/a − μ`` onto the span of the kept components). This is
the best affine estimator of ``x0`` in mean squared error for any data with these two moments, the
"Gaussian denoiser" of Wang & Vastola (2024) and Li et al. (2024) that Niedoba et al. (ICML 2025)
and Lukoianov et al. (NeurIPS 2025) compare against.

``ddof=0`` (default) uses the moments of the empirical training distribution (as the PSPC release's
Gaussian denoiser); ``ddof=1`` the unbiased covariance (as the PCA-locality release).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax import schedules as _schedules
from ellsjax.machines import _registry
from ellsjax.machines.base import Machine, TrainingImages, build, prepare_training_set, register

__all__ = ["Wiener", "wiener", "gaussian_fit"]


def gaussian_fit(
    flat: np.ndarray, *, ddof: int = 0, rank: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and leading eigenpairs of the covariance of ``flat`` ``[N, D]``, in float64.

    Uses the SVD of the centered data when ``N < D`` and an eigendecomposition of the ``D×D``
    covariance otherwise. Eigenvalues are sorted in decreasing order and clipped at 0.

    Args:
        flat: ``[N, D]`` samples.
        ddof: the covariance is ``Xcᵀ Xc / (N − ddof)``.
        rank: keep the top ``rank`` components (``None``: ``min(N, D)``).

    Returns:
        ``(mean [D], basis [D, r], eigvals [r])``.
    """
    x = np.asarray(flat, np.float64)
    n, d = x.shape
    if n - ddof <= 0:
        raise ValueError(f"ddof: need more than {ddof} image(s) per covariance, got {n}")
    mean = x.mean(0)
    xc = x - mean
    if n < d:
        _, sv, vt = np.linalg.svd(xc, full_matrices=False)
        lam, basis = sv**2 / (n - ddof), vt.T
    else:
        lam, basis = np.linalg.eigh(xc.T @ xc / (n - ddof))
        lam, basis = lam[::-1], basis[:, ::-1]
    r = min(n, d) if rank is None else min(rank, n, d)
    return mean, np.ascontiguousarray(basis[:, :r]), np.clip(lam[:r], 0.0, None)


def check_rank(rank, shape) -> int | None:
    """``None`` or a positive int at most ``min(N, D)`` (the covariance of ``N`` images of ``D``
    values has no more components)."""
    if rank is None:
        return None
    rank = _checks.check_positive_int(rank, "rank")
    n, d = shape[0], int(np.prod(shape[1:]))
    if rank > min(n, d):
        raise ValueError(f"rank: the covariance of {n} images of D = H·W·C = {d} values has at most {min(n, d)} "
                         f"components, got rank={rank}")
    return rank


def fit_images(imgs, *, ddof: int, rank: int | None):
    """``(mean [D], basis [D, r], eigvals [r])`` float32 of the images' covariance
    (:func:`gaussian_fit`); ``jax.ShapeDtypeStruct`` of those shapes for shape-only images."""
    n, d = imgs.shape[0], int(np.prod(imgs.shape[1:]))
    if isinstance(imgs, jax.ShapeDtypeStruct):
        if n - ddof <= 0:
            raise ValueError(f"ddof: need more than {ddof} image(s) per covariance, got {n}")
        r = min(n, d) if rank is None else rank
        return tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in ((d,), (d, r), (r,)))
    mean, basis, lam = gaussian_fit(np.asarray(imgs).reshape(n, -1), ddof=ddof, rank=rank)
    return tuple(jnp.asarray(v, jnp.float32) for v in (mean, basis, lam))


@dataclasses.dataclass(frozen=True, eq=False)
class Wiener(Machine):
    """The optimal linear denoiser. Build with :func:`wiener`. It has no scale.

    Attributes (beyond :class:`~ellsjax.machines.Machine`):
        mean: ``[D]`` training mean (``D = H·W·C``).
        basis: ``[D, r]`` leading covariance eigenvectors.
        eigvals: ``[r]`` their eigenvalues.
        class_mean, class_basis, class_eigvals: the same per class (``[K, …]``), or ``None``.
        ddof: covariance normalisation ``N − ddof``.
        rank: requested rank (``None``: all components).
    """

    mean: Float[Array, " d"] | None = None
    basis: Float[Array, "d r"] | None = None
    eigvals: Float[Array, " r"] | None = None
    class_mean: Float[Array, "k d"] | None = None
    class_basis: Float[Array, "k d rk"] | None = None
    class_eigvals: Float[Array, "k rk"] | None = None
    ddof: int = 0
    rank: int | None = None

    _DATA_FIELDS: ClassVar[tuple[str, ...]] = Machine._DATA_FIELDS + (
        "mean", "basis", "eigvals", "class_mean", "class_basis", "class_eigvals",
    )

    def _denoise(self, x_t, t, label, scale):
        b, h, w, ch = x_t.shape
        ab, var = self.schedule.variances(t)
        a = jnp.sqrt(ab)[:, None]
        x = x_t.reshape(b, h * w * ch)
        if label is None:
            mean, basis, lam = self.mean, self.basis, self.eigvals[None]
        else:
            mean, basis, lam = self.class_mean[label], self.class_basis[label], self.class_eigvals[label]
        # aλ/(a²λ + s²): finite at a = 0 (→ 0) and s = 0 (→ 1/a); 0 for λ = 0 (padding, null space)
        pos = lam > 0
        gain = jnp.where(pos, a * lam / jnp.where(pos, ab[:, None] * lam + var[:, None], 1.0), 0.0)
        if label is None:  # one basis for the batch: two GEMMs
            coef = jnp.matmul(x - a * mean, basis, precision="highest")
            x0 = mean + jnp.matmul(gain * coef, basis.T, precision="highest")
        else:  # each image its class's basis
            coef = jnp.einsum("bdr,bd->br", basis, x - a * mean, precision="highest")
            x0 = mean + jnp.einsum("bdr,br->bd", basis, gain * coef, precision="highest")
        return x0.reshape(b, h, w, ch)


register(Wiener)


def wiener(
    images: TrainingImages,
    labels: Int[ArrayLike, " n"] | None = None,
    *,
    rank: int | None = None,
    ddof: int = 0,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
    platform: str | None = None,
) -> Wiener:
    """The Wiener machine: ``x̂0 = μ + U diag(λ/(λ+σ²)) Uᵀ (x_t/a − μ)``, ``σ = s/a``.

    Args:
        images: ``[N, H, W, C]`` float training images in ``[-1, 1]``.
        labels: optional ``[N]`` int class ids; then ``denoise(..., label=y)`` uses class ``y``'s
            mean and covariance (``label=None`` the whole set's).
        rank: keep the top ``rank`` covariance components (``None``: all). Directions outside them
            are treated as noise-free constants at the mean.
        ddof: covariance normalisation ``N − ddof`` (0: the empirical distribution's moments).
        schedule: noise schedule (object or name).
        image_range: the documented pixel range the training images are checked against
            (``None``: any real data, e.g. samples of a Gaussian).
        platform: whose budgets apply, ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``None``: the platform of the
            devices the images live on).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (16, 6, 6, 1), minval=-1, maxval=1)
        >>> m = ej.machines.wiener(imgs, rank=8)
        >>> m.denoise(imgs[:2], 0.5).shape
        (2, 6, 6, 1)
    """
    imgs, _, sizes = prepare_training_set(images, labels, image_range=image_range)
    rank = check_rank(rank, imgs.shape)
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise ValueError(f"ddof: expected an int >= 0, got {ddof!r}")
    mean, basis, lam = fit_images(imgs, ddof=ddof, rank=rank)
    extra: dict[str, Any] = dict(mean=mean, basis=basis, eigvals=lam)
    if sizes is not None and isinstance(imgs, jax.ShapeDtypeStruct):
        raise ValueError("labels: a conditional Wiener machine fits per-class statistics from data; shape-only "
                         "images (jax.ShapeDtypeStruct) build the unconditional one")
    if sizes is not None:
        flat = np.asarray(imgs).reshape(imgs.shape[0], -1)
        lab = np.asarray(labels)
        d = flat.shape[1]
        fits = {}
        for k, nk in enumerate(sizes):
            if nk == 0:
                continue
            try:
                fits[k] = gaussian_fit(flat[lab == k], ddof=ddof, rank=rank)
            except ValueError:
                raise ValueError(f"ddof: class {k} has {nk} image(s), too few for ddof={ddof}") from None
        r = max(f[2].shape[0] for f in fits.values())
        cm = np.zeros((len(sizes), d))
        cb = np.zeros((len(sizes), d, r))
        cl = np.zeros((len(sizes), r))
        for k, (mk, bk, lk) in fits.items():
            cm[k], cb[k, :, : bk.shape[1]], cl[k, : lk.shape[0]] = mk, bk, lk
        extra.update(class_mean=jnp.asarray(cm, jnp.float32), class_basis=jnp.asarray(cb, jnp.float32),
                     class_eigvals=jnp.asarray(cl, jnp.float32))
    return build(Wiener, imgs, labels, schedule=schedule, image_range=image_range, chunk_size=None, memory_budget=None,
                 ddof=int(ddof), rank=rank, platform=platform, **extra)


_registry.register(_registry.MachineSpec(
    name="wiener", builder=wiener, machine=Wiener,
    summary="Wiener filter: the optimal linear (Gaussian) denoiser from the data mean and covariance",
    reference="Wang & Vastola 2024; Lukoianov et al., NeurIPS 2025",
))
