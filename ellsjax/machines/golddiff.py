r"""GoldDiff: the PCA-locality posterior over a retrieved "golden subset" of training images (Shang et
al., "Fast and Scalable Analytical Diffusion", ICML 2026; release ``github.com/shangxinyi/GoldDiff``).

The machine is :mod:`ellsjax.machines.pca`'s (same neighbourhoods ``N_t(m)``, the release's rule):

.. math::

    \hat x_0(m) = \sum_{j \in S_t} \mathrm{softmax}_j\Big(-\frac{\|(x_t - a\,\phi_j)_{N_t(m)}\|^2}{2 s^2 T}\Big)\,\phi_j(m)

but over a subset ``S_t`` instead of all ``N`` images, chosen as in the release (``methods/base.py``, ``BaseDenoiser._get_knn_subset_and_distances``; the CIFAR-10
parameters from ``configs/ours/cifar10.yaml``), with ``λ = 1 − s`` (``s = sqrt(1 − ᾱ)``):

1. a uniform random pre-sample of ``n_t = k_max + (N − k_max)·λ`` images (rounded, in
   ``[k_max, N]``), drawn per image and step from ``key`` (folded with ``t`` and the batch index);
2. a coarse screen: the ``k_max`` pre-sampled images nearest to ``x_t`` in a low-resolution proxy
   (``f×f`` average pooling to ``proxy_side`` pixels a side), by ``‖x̄_t − a φ̄_j‖²``;
3. a fine selection: of those, the ``k_t = max(k_min, k_max − (k_max − k_min)·λ)`` nearest at full
   resolution, ``‖x_t − a φ_j‖²``;
4. the exact streaming softmax with the PCA mask over those ``k_t`` images.

It bounds nothing: the subset is chosen by whole-image distances but weighted by masked ones, and at
high noise it is a random sample.

The same coarse-to-fine order without the random pre-sample, scored until a rigorous bound on the
rest is within ``ε``, is a *search* of the PCA-locality machine, not this machine:
``ej.machines.pca(images).with_search(CertifiedSubset(ε))`` (:mod:`ellsjax.machines.pca`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import kernel as _kernel
from ellsjax import schedules as _schedules
from ellsjax.denoiser import Denoiser
from ellsjax.machines import _export, _registry
from ellsjax.machines.base import TrainingImages
from ellsjax.machines.pca import PCALocality, pca, pool, proxy_side_for, release_threshold, subset_params

__all__ = ["GoldDiff", "golddiff", "subset_sizes", "proxy_side_for"]


def subset_sizes(s: Float[ArrayLike, "*t"], n: int, k_min: int, k_max: int):
    """The release's schedules at noise ``s = sqrt(1 − ᾱ)``: ``(n_t, k_t)``, the pre-sample size
    ``round(k_max + (n − k_max)(1 − s))`` in ``[k_max, n]`` and the subset size
    ``max(k_min, round(k_max − (k_max − k_min)(1 − s)))``."""
    lam = 1.0 - jnp.clip(jnp.asarray(s, jnp.float32), 0.0, 1.0)
    n_pre = jnp.clip(jnp.round(k_max + (n - k_max) * lam), k_max, n).astype(jnp.int32)
    k_t = jnp.maximum(k_min, jnp.round(k_max - (k_max - k_min) * lam)).astype(jnp.int32)
    return n_pre, k_t


@dataclasses.dataclass(frozen=True, eq=False)
class GoldDiff(Denoiser):
    """The GoldDiff machine (final). Build with :func:`golddiff`. It has no scale and bounds nothing.

    Attributes:
        pca: the PCA-locality machine whose posterior it takes over the subset (its images,
            covariance, θ, rule, temperature, schedule and labels).
        proxy: ``[N, D̄]`` the training images average-pooled to ``proxy_side`` (the coarse screen's keys).
        k_min, k_max: the subset-size bounds (already clipped to ``N``).
        proxy_side: the proxy's side in pixels (its height; the width scales alike).
        seed: the pre-sample's base key.
    """

    pca: PCALocality
    proxy: Float[Array, "n dl"]
    k_min: int = 1
    k_max: int = 1
    proxy_side: int = 1
    seed: int = 0

    # -- the PCA machine's, read through -----------------------------------------------------------
    schedule = property(lambda self: self.pca.schedule, doc="The noise schedule.")
    images = property(lambda self: self.pca.images, doc="The training images.")
    num_images = property(lambda self: self.pca.num_images)
    threshold = property(lambda self: self.pca.threshold, doc="The PCA mask's ``θ``.")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.pca.image_shape

    @property
    def conditional(self) -> bool:
        return self.pca.conditional

    def check_label(self, label) -> None:
        self.pca.check_label(label)

    def _ready(self, scale, label):
        self.pca._ready(scale, label)
        return self

    def _published_one(self, x, t, key, lb, mask):
        m = self.pca
        ab, var = m.schedule.variances(t)
        a, s = jnp.sqrt(ab), jnp.sqrt(var)
        ok = m._members_ok(lb)
        n_eff = jnp.sum(ok)
        n_pre, k_t = subset_sizes(s, m.num_images, self.k_min, self.k_max)
        n_pre = jnp.minimum(n_pre, n_eff)
        # the random pre-sample: the n_pre eligible images of smallest uniform draw
        r = jnp.where(ok, jax.random.uniform(key, (m.num_images,)), 2.0)
        rank = jnp.argsort(jnp.argsort(r))
        order, real = m._coarse_fine_order(x, a, ok & (rank < n_pre), self.proxy, self.proxy_side, self.k_max)
        sub = order[: self.k_max]
        keep = real[: self.k_max] & (jnp.arange(self.k_max) < k_t)
        means, _ = _kernel.streaming_softmax(m._mask_queries(mask, a, var),
                                             lambda i: m._subset_bank(sub, keep, x, a), 1)
        return jnp.diagonal(means, axis1=1, axis2=2).reshape(-1)

    def _denoise(self, x_t, t, label, scale):
        base = jax.random.key(self.seed)

        def one(x, tb, lb, idx, mask):
            key = jax.random.fold_in(jax.random.fold_in(base, jax.lax.bitcast_convert_type(tb, jnp.int32)), idx)
            return self._published_one(x, tb, key, lb, mask)

        return self.pca._map_batch(one, x_t, t, label).reshape(x_t.shape)


jax.tree_util.register_dataclass(GoldDiff, data_fields=["pca", "proxy"],
                                 meta_fields=["k_min", "k_max", "proxy_side", "seed"])
_export.register_serialization(GoldDiff, ["k_min", "k_max", "proxy_side", "seed"])
GoldDiff.__repr__ = _export.short_repr


def golddiff(
    images: TrainingImages,
    labels: Int[ArrayLike, " n"] | None = None,
    *,
    dataset: str | None = None,
    k_min: int | None = None,
    k_max: int | None = None,
    threshold: float | None = None,
    proxy_side: int | None = None,
    seed: int = 0,
    relative_to: Literal["row", "global"] = "global",
    temperature: float = 1.0,
    rank: int | None = None,
    ddof: int = 1,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
    platform: str | None = None,
) -> GoldDiff:
    """GoldDiff (Shang et al., ICML 2026): the PCA-locality posterior over a coarse-to-fine retrieved
    subset with a random pre-sample, as published (see the module docstring). For a *certified*
    estimate over fewer images use the PCA machine's search:
    ``pca(images, threshold=θ).with_search(CertifiedSubset(ε, dataset=...))``.

    Args:
        images: ``[N, H, W, C]`` float training images in ``[-1, 1]``.
        labels: optional ``[N]`` int class ids (``denoise(..., label=y)`` retrieves from class ``y``).
        dataset: a name with release parameters (``"cifar10"``) for the defaults below.
        k_min: smallest subset (default ``N/20``, the release's CIFAR-10 ratio; 2500 at ``N = 50 000``).
        k_max: largest subset and coarse-screen size (default ``N/10``).
        threshold: the PCA mask's ``θ`` (default 0.03 for CIFAR-10, else 0.02).
        proxy_side: the proxy's side (default 16 for CIFAR-10, else the release's rule,
            :func:`proxy_side_for`).
        seed: base of the pre-sample's key (folded with ``t`` and the batch index).
        relative_to, temperature, rank, ddof: as :func:`ellsjax.machines.pca`.
        schedule: noise schedule (object or name).
        image_range: the pixel range the training images are checked against (``None``: any).
        platform: whose budgets apply (``None``: the images' devices').

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (40, 8, 8, 1), minval=-1, maxval=1)
        >>> m = ej.machines.golddiff(imgs, k_min=4, k_max=8)
        >>> m.denoise(imgs[:2] * 0.9, 0.1).shape
        (2, 8, 8, 1)
    """
    if dataset is not None and not isinstance(dataset, str):
        raise TypeError(f"dataset: expected a name, got {dataset!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    threshold = release_threshold(dataset) if threshold is None else threshold
    base = pca(images, labels, threshold=threshold, relative_to=relative_to, temperature=temperature, rank=rank,
               ddof=ddof, schedule=schedule, image_range=image_range, platform=platform)
    if base.shape_only:
        raise ValueError("images: GoldDiff pools the training images for its proxy; build from data, not shapes")
    n, (h, w, _) = base.num_images, base.image_shape
    k_min, k_max, side = subset_params(n, h, w, dataset, k_min, k_max, proxy_side)
    return GoldDiff(base, pool(base.images, side), k_min=k_min, k_max=k_max, proxy_side=side, seed=int(seed))


_registry.register(_registry.MachineSpec(
    name="golddiff", builder=golddiff, machine=GoldDiff,
    summary="GoldDiff: PCA locality over a coarse-to-fine retrieved subset of a random pre-sample (published)",
    reference="Shang et al., ICML 2026 (github shangxinyi/GoldDiff)",
))
