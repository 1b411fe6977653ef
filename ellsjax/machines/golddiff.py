r"""GoldDiff: the PCA-locality posterior over a retrieved "golden subset" of training images (Shang et
al., "Fast and Scalable Analytical Diffusion", ICML 2026; release ``github.com/shangxinyi/GoldDiff``),
and a certified mode of the same retrieval that no release has.

The machine is :mod:`ellsjax.machines.pca`'s (same neighbourhoods ``N_t(m)``, the release's rule):

.. math::

    \hat x_0(m) = \sum_{j \in S_t} \mathrm{softmax}_j\Big(-\frac{\|(x_t - a\,\phi_j)_{N_t(m)}\|^2}{2 s^2 T}\Big)\,\phi_j(m)

but over a subset ``S_t`` instead of all ``N`` images. **Published mode** (``tolerance=None``), as in
the release (``methods/base.py``, ``BaseDenoiser._get_knn_subset_and_distances``; the CIFAR-10
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

**Certified mode** (``tolerance=ε ≥ 0``): no random pre-sample; the images are visited in the
coarse-to-fine order (proxy distance, the first ``k_max`` re-sorted by full-resolution distance),
in chunks of ``chunk`` images, each scored exactly, and the pass stops once the mass of every image
not yet visited is provably negligible for every output. The proof: for each output group ``g`` (the
``f×f`` pixels and channels of one proxy cell) let ``I_g = ∩_{m∈g} N_t(m)``. Every output of the
group reads at least ``I_g`` and (when ``m ∈ N_t(m)``) its own entry, so with ``e = x_t − aφ_j``

.. math::

    \|e_{N_t(m)}\|^2 \;\ge\; L_{mj} = \sum_{n \in I_g} e_n^2 + [m \in N_t(m) \setminus I_g]\, e_m^2 ,

a ``[N, D]×[D, G]`` product per step (``G = D/(f²C)`` groups: ``1/(f²C)`` of the exact pass). The kernel's score of image
``j`` for output ``m`` is ``τ(‖x_{N(m)}‖² − ‖(x − aφ_j)_{N(m)}‖²)``, so the unvisited images' scores are
at most ``τ(‖x_{N(m)}‖² − L_gj) + δ_m``, and with ``R_m`` their total mass and ``Z_m`` the mass seen.
``δ_m = 8u·τ·Σ_{n∈N(m)} (|x_n| + a·max_j|φ_j(n)|)²`` (``u = 2⁻²⁴``) allows for the float32 rounding of the
kernel's scores as XLA's GEMMs accumulate them (in blocks; the worst-case bound ``γ_{|N(m)|}`` is
``|N(m)|/8`` times larger and, at ``τ = 5000``, larger than the whole underflow margin). The bound is
on the posterior mean of the scores as the kernel computes them:

* ``ε = 0``: the pass stops when every unvisited score is more than 104 below the running maximum
  (float32 ``exp`` gives exactly 0): the result is the exact PCA machine's up to summation order;
* ``ε > 0``: it stops when ``R_m ≤ ε/(2·max_j|φ_j(m)|)·Z_m``; then
  ``|x̂0(m) − exact| ≤ R_m/(Z_m + R_m)·(max_j|φ_j(m)| + |x̂0(m)|) ≤ ε``, the bound
  :meth:`GoldDiff.denoise_with_bound` returns per output.

When nothing certifies early the pass visits every image: the exact machine, never a wrong answer.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax import kernel as _kernel
from ellsjax import schedules as _schedules
from ellsjax.machines import _pruning, _registry
from ellsjax.machines.base import build, prepare_training_set, register
from ellsjax.machines.pca import PCALocality, pca_fields

__all__ = ["GoldDiff", "golddiff", "certified", "subset_sizes", "proxy_side_for"]

_U32 = _pruning._U32

#: The release's per-dataset parameters (``configs/ours/<dataset>.yaml``): CIFAR-10's file is
#: ``k_min = 2500 = N/20``, ``k_max = 5000 = N/10``, ``mask_threshold = 0.03``, ``low_res_dim = 16``.
#: Other datasets use the same fractions of their ``N`` (the config's own comments) and θ = 0.02 (the
#: PCA release's default).
RELEASE_DEFAULTS = {"cifar10": {"threshold": 0.03, "proxy_side": 16, "k_min_fraction": 1 / 20, "k_max_fraction": 1 / 10}}


def proxy_side_for(resolution: int, preferred: int = 0) -> int:
    """The release's proxy side (``BaseDenoiser._choose_low_res_dim``): ``preferred`` if it divides
    ``resolution``, else its largest divisor below it; ``0``: the largest divisor ``4 ≤ d ≤ res/2``."""
    def best(res):
        cand = [d for d in range(4, res // 2 + 1) if res % d == 0] or [d for d in range(1, res // 2 + 1) if res % d == 0]
        return cand[-1] if cand else res

    if preferred <= 0:
        return best(resolution)
    if resolution % preferred == 0:
        return preferred
    divs = [d for d in range(1, preferred + 1) if resolution % d == 0]
    return divs[-1] if divs else best(resolution)


def subset_sizes(s: Float[ArrayLike, "*t"], n: int, k_min: int, k_max: int):
    """The release's schedules at noise ``s = sqrt(1 − ᾱ)``: ``(n_t, k_t)``, the pre-sample size
    ``round(k_max + (n − k_max)(1 − s))`` in ``[k_max, n]`` and the subset size
    ``max(k_min, round(k_max − (k_max − k_min)(1 − s)))``."""
    lam = 1.0 - jnp.clip(jnp.asarray(s, jnp.float32), 0.0, 1.0)
    n_pre = jnp.clip(jnp.round(k_max + (n - k_max) * lam), k_max, n).astype(jnp.int32)
    k_t = jnp.maximum(k_min, jnp.round(k_max - (k_max - k_min) * lam)).astype(jnp.int32)
    return n_pre, k_t


@dataclasses.dataclass(frozen=True, eq=False)
class GoldDiff(PCALocality):
    """The GoldDiff machine. Build with :func:`golddiff`. ``scale`` is accepted and ignored.

    Attributes (beyond :class:`~ellsjax.machines.PCALocality`):
        proxy: ``[N, D̄]`` the training images average-pooled to ``proxy_side`` (the coarse screen's keys).
        k_min, k_max: the subset-size bounds (already clipped to ``N``).
        proxy_side: the proxy's side in pixels (its height; the width scales alike).
        tolerance: ``None`` (published, random pre-sample) or ``ε ≥ 0`` (certified).
        seed: the pre-sample's base key (published mode).
        chunk: images per scored chunk (certified mode).
    """

    proxy: Float[Array, "n dl"] | None = None
    k_min: int = 1
    k_max: int = 1
    proxy_side: int = 1
    tolerance: float | None = None
    seed: int = 0
    chunk: int = 256

    _DATA_FIELDS: ClassVar[tuple[str, ...]] = PCALocality._DATA_FIELDS + ("proxy",)

    # ------------------------------------------------------------------------------ shared pieces
    def _pool(self, x):
        """``[..., H, W, C]`` → ``[..., D̄]`` average over ``f×f`` cells (per channel)."""
        h, w, ch = self.image_shape
        f = h // self.proxy_side
        y = x.reshape(*x.shape[:-3], h // f, f, w // f, f, ch).mean(axis=(-4, -2))
        return y.reshape(*x.shape[:-3], -1)

    def _members_ok(self, lb):
        n = self.num_images
        if lb is None:
            return jnp.ones((n,), bool)
        size = jnp.asarray(self.class_sizes, jnp.int32)[lb]
        members = self.class_members[lb]
        keep = jnp.arange(members.shape[0]) < size
        return jnp.zeros((n,), bool).at[members].max(keep)

    def _subset_bank(self, idx, ok, x, a):
        """:meth:`_image_bank` of the training images ``idx``."""
        return self._image_bank(self.images[idx].reshape(idx.shape[0], -1), ok, x, a)

    def _coarse_fine_order(self, x, a, eligible):
        """Images by proxy distance (ineligible last), the first ``k_max`` re-sorted by full distance."""
        n = self.num_images
        d_proxy = jnp.sum((self._pool(x)[None] - a * self.proxy) ** 2, -1)
        d_proxy = jnp.where(eligible, d_proxy, jnp.inf)
        order = jnp.argsort(d_proxy)
        head = order[: self.k_max]
        phi = self.images[head].reshape(self.k_max, -1)
        d_fine = jnp.sum((x[None] - a * phi) ** 2, -1)
        d_fine = jnp.where(jnp.isfinite(d_proxy[head]), d_fine, jnp.inf)
        head = head[jnp.argsort(d_fine)]
        order = jnp.concatenate([head, order[self.k_max:]]) if self.k_max < n else head
        return order, jnp.isfinite(d_proxy[order])

    # ----------------------------------------------------------------------------- published mode
    def _published_one(self, x, t, key, lb, mask):
        ab, var = self.schedule.variances(t)
        a, s = jnp.sqrt(ab), jnp.sqrt(var)
        ok = self._members_ok(lb)
        n_eff = jnp.sum(ok)
        n_pre, k_t = subset_sizes(s, self.num_images, self.k_min, self.k_max)
        n_pre = jnp.minimum(n_pre, n_eff)
        # the random pre-sample: the n_pre eligible images of smallest uniform draw
        r = jnp.where(ok, jax.random.uniform(key, (self.num_images,)), 2.0)
        rank = jnp.argsort(jnp.argsort(r))
        order, real = self._coarse_fine_order(x, a, ok & (rank < n_pre))
        sub = order[: self.k_max]
        keep = real[: self.k_max] & (jnp.arange(self.k_max) < k_t)
        means, _ = _kernel.streaming_softmax(self._mask_queries(mask, a, var),
                                             lambda i: self._subset_bank(sub, keep, x, a), 1)
        return jnp.diagonal(means, axis1=1, axis2=2).reshape(-1)

    # ----------------------------------------------------------------------------- certified mode
    def _bound_structure(self, mask):
        """What the certified lower bounds read of ``N_t``: ``I [G, D]``, the intersection of the
        neighbourhoods of every output of group ``g`` (the ``f×f`` pixels and channels of one proxy
        cell), and each output's group."""
        h, w, ch = self.image_shape
        f = h // self.proxy_side
        pw = w // f
        spatial = (np.arange(h)[:, None] // f * pw + np.arange(w)[None, :] // f)  # [H, W] cell of each pixel
        group = np.broadcast_to(spatial[:, :, None], (h, w, ch)).reshape(-1)  # output → group
        inter = jax.ops.segment_min(mask, jnp.asarray(group), num_segments=int(group.max()) + 1)
        return inter, jnp.asarray(group)

    def _certified_one(self, x, t, lb, mask, structure):
        """``(x̂0 [D], bound [D], chunks visited)`` for one image (see the module docstring)."""
        inter, group = structure
        h, w, ch = self.image_shape
        d, row = h * w * ch, w * ch
        n, c = self.num_images, self.chunk
        ab, var = self.schedule.variances(t)
        a = jnp.sqrt(ab)
        queries = self._mask_queries(mask, a, var)
        tau = queries.inv_temp[0, 0]
        finite = jnp.isfinite(tau)
        kappa = jnp.where(finite, tau, 1.0)  # scores are raw where τ = ∞ (nearest-image limit)
        order, real = self._coarse_fine_order(x, a, self._members_ok(lb))
        nch = -(-n // c)
        pad = nch * c - n
        order = jnp.pad(order, (0, pad))
        real = jnp.pad(real, (0, pad))
        phi = self.images[order].reshape(nch * c, d)  # in visiting order
        # every output of group g reads at least the pixels of I_g, and output m its own pixel when
        # m ∈ N(m): Σ_{n∈I_g} e_n² + [m ∈ N(m) \ I_g]·e_m² ≤ ‖e_{N(m)}‖²
        e2 = (x[None] - a * phi) ** 2
        low_g = jnp.matmul(e2, inter.T, precision="highest")  # [N', G]
        own = (jnp.diagonal(mask) > 0.5) & (inter[group, jnp.arange(d)] < 0.5)
        low = (low_g[:, group] + jnp.where(own[None], e2, 0.0)) * (1.0 - 4 * (d + 4) * _U32)  # float32 sums
        # τ‖x_N(m)‖² and the rounding slack δ_m of the kernel's scores: 8u·Σ|terms| (see the module
        # docstring: the blocked accumulation of float32 GEMMs; the worst case γ_n would forbid any skip)
        phimax, phimin = jnp.max(self.images.reshape(n, d), 0), jnp.min(self.images.reshape(n, d), 0)
        xn2 = jnp.matmul(mask, x * x, precision="highest")
        big = jnp.matmul(mask, (jnp.abs(x) + a * jnp.maximum(phimax, -phimin)) ** 2, precision="highest")
        slack = kappa * 8 * _U32 * (big + xn2)
        ub = jnp.where(real[:, None], kappa * (xn2 - low) + slack, -jnp.inf)  # [N', D] ≥ every score
        cub = ub.reshape(nch, c, d)
        smax, slse = _pruning.suffix_bounds(jnp.max(cub, 1), jax.nn.logsumexp(cub, 1), axis=0)  # [nch + 1, D]
        spread = (phimax - phimin).reshape(h, row)  # |φ_j(m) − x̂0(m)| ≤ spread
        eps = self.tolerance or 0.0

        def done(i, st):
            mx, tot = st.max, st.total  # [H, W·C]: one query per output
            up = smax[i].reshape(h, row)
            nearest = (up < mx) | (spread == 0)
            if self.tolerance == 0:
                ok = jnp.where(finite, (up - mx < -_pruning.UNDERFLOW_MARGIN) | (spread == 0), nearest)
            else:
                ok = jnp.where(finite, jnp.exp(slse[i].reshape(h, row) - mx) * spread <= eps * tot, nearest)
            return jnp.all(ok)

        def chunk_stats(i):
            idx = jax.lax.dynamic_slice_in_dim(order, i * c, c)
            ok = jax.lax.dynamic_slice_in_dim(real, i * c, c)
            return _kernel.chunk_stats(queries, self._subset_bank(idx, ok, x, a))

        def cond(carry):
            i, st = carry
            return (i < nch) & ~done(i, st)

        def body(carry):
            i, st = carry
            return i + 1, _kernel.merge_stats(st, chunk_stats(i), queries.inv_temp)

        i, st = jax.lax.while_loop(cond, body, (jnp.int32(1), chunk_stats(0)))
        mean = jnp.diagonal(_kernel.finalize(st), axis1=1, axis2=2).reshape(d)  # each output's own value
        mx, tot = st.max.reshape(d), st.total.reshape(d)
        # |x̂ − x̂_S| = |Σ_U w_j (φ_j − x̂_S)| / (Z_S + Z_U) ≤ Σ_U ŵ_j |φ_j − x̂_S| / Z_S, ŵ_j = e^{ub_j − max}
        unvisited = (jnp.arange(nch * c) >= i * c)[:, None] & real[:, None]
        dev = jnp.abs(phi - mean[None])
        contrib = jnp.where(unvisited & (dev > 0), jnp.exp(jnp.minimum(ub - mx[None], 80.0)) * dev, 0.0)
        bound = jnp.sum(contrib, 0) / tot
        nearest = jnp.where(jnp.any(unvisited & (dev > 0) & (ub >= mx[None]), 0), jnp.inf, 0.0)
        bound = jnp.where(finite, jnp.where(jnp.max(jnp.where(unvisited, ub - mx[None], -jnp.inf), 0) >= 80.0,
                                            jnp.inf, bound), nearest)
        return mean, jnp.where(i >= nch, 0.0, bound), i

    # ----------------------------------------------------------------------------------- driver
    def _run(self, x_t, t, label):
        base = jax.random.key(self.seed)

        def one(x, tb, lb, idx, per_t):
            if self.tolerance is None:
                key = jax.random.fold_in(jax.random.fold_in(base, jax.lax.bitcast_convert_type(tb, jnp.int32)), idx)
                out = self._published_one(x, tb, key, lb, per_t)
                return out, jnp.full_like(out, jnp.inf), jnp.int32(0)
            return self._certified_one(x, tb, lb, *per_t)

        # the certified bounds' structure comes from the mask: built with it, once per distinct t
        derive = (lambda mask: mask) if self.tolerance is None else (lambda mask: (mask, self._bound_structure(mask)))
        out, bound, visited = self._map_batch(one, x_t, t, label, derive)
        return out.reshape(x_t.shape), bound.reshape(x_t.shape), visited

    def _denoise(self, x_t, t, label, scale):
        return self._run(x_t, t, label)[0]

    def _denoise_bounded(self, x_t, t, label, scale):
        out, bound, _ = self._run(x_t, t, label)
        return out, jnp.max(bound, -1)

    def denoise_with_bound(self, x_t, t, *, scale=None, label=None):
        """Certified ``(x̂0 [B, H, W, C], bound [B, H, W])``: ``|x̂0 − exact PCA| ≤ bound`` in every
        channel (certified mode only; the published mode bounds nothing)."""
        if self.tolerance is None:
            raise ValueError("tolerance: the published GoldDiff bounds nothing; build with tolerance=ε (>= 0) "
                             "for a certified estimate")
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        return _jit_bounded(self, x_t, t, label)

    def with_search(self, *, tolerance: float | None, chunk: int | None = None, **golddiff_options) -> PCALocality:
        """The same subset machine with another ``tolerance`` (``None``: the published mode)."""
        if golddiff_options:
            raise TypeError(f"with_search: unexpected options {sorted(golddiff_options)} for a GoldDiff machine")
        tol = None if tolerance is None else _check_tolerance(tolerance)
        return dataclasses.replace(self, tolerance=tol, chunk=self.chunk if chunk is None else min(
            self.num_images, _checks.check_positive_int(chunk, "chunk")))

    def visited_chunks(self, x_t, t, *, label=None) -> Int[Array, " b"]:
        """Certified mode: how many chunks of ``chunk`` images each image's pass scored (diagnostics)."""
        x_t, t, label, _ = self.check_inputs(x_t, t, scale=None, label=label)
        return _jit_visits(self, x_t, t, label)


@jax.jit
def _jit_bounded(m, x_t, t, label):
    return m._denoise_bounded(x_t, t, label, None)


@jax.jit
def _jit_visits(m, x_t, t, label):
    return m._run(x_t, t, label)[2]


register(GoldDiff)


def golddiff(
    images: Float[ArrayLike, "n h w c"],
    labels: Int[ArrayLike, " n"] | None = None,
    *,
    dataset: str | None = None,
    k_min: int | None = None,
    k_max: int | None = None,
    threshold: float | None = None,
    proxy_side: int | None = None,
    tolerance: float | None = None,
    seed: int = 0,
    chunk: int | None = None,
    relative_to: Literal["row", "global"] = "global",
    temperature: float = 1.0,
    rank: int | None = None,
    ddof: int = 1,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
) -> GoldDiff:
    """GoldDiff (Shang et al., ICML 2026): the PCA-locality posterior over a coarse-to-fine retrieved
    subset; with ``tolerance`` a certified version (see the module docstring).

    Args:
        images: ``[N, H, W, C]`` float training images in ``[-1, 1]``.
        labels: optional ``[N]`` int class ids (``denoise(..., label=y)`` retrieves from class ``y``).
        dataset: a name with release parameters (``"cifar10"``) for the defaults below.
        k_min: smallest subset (default ``N/20``, the release's CIFAR-10 ratio; 2500 at ``N = 50 000``).
        k_max: largest subset and coarse-screen size (default ``N/10``).
        threshold: the PCA mask's ``θ`` (default 0.03 for CIFAR-10, else 0.02).
        proxy_side: the proxy's side (default 16 for CIFAR-10, else the release's rule,
            :func:`proxy_side_for`).
        tolerance: ``None`` (published: random pre-sample, no bound) or ``ε ≥ 0`` (certified).
        seed: base of the pre-sample's key (published mode; folded with ``t`` and the batch index).
        chunk: images per scored chunk in certified mode (default ``max(k_min, 64)``, at most ``N``).
        relative_to, temperature, rank, ddof: as :func:`ellsjax.machines.pca`.
        schedule: noise schedule (object or name).
        image_range: the pixel range the training images are checked against (``None``: any).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (40, 8, 8, 1), minval=-1, maxval=1)
        >>> m = ej.machines.golddiff(imgs, tolerance=1e-3, chunk=8)
        >>> x0, bound = m.denoise_with_bound(imgs[:2] * 0.9, 0.1)
        >>> bool((bound <= 1e-3).all())
        True
    """
    imgs, _, _ = prepare_training_set(images, labels, image_range=image_range)
    n, h, w, _ = imgs.shape
    if dataset is not None and not isinstance(dataset, str):
        raise TypeError(f"dataset: expected a name, got {dataset!r}")
    rel = RELEASE_DEFAULTS.get(dataset or "", {})
    k_min, k_max, side = _subset_params(n, h, w, dataset, k_min, k_max, proxy_side)
    threshold = rel.get("threshold", 0.02) if threshold is None else threshold
    if tolerance is not None:
        tolerance = _check_tolerance(tolerance)
    chunk = min(n, max(k_min, 64)) if chunk is None else min(n, _checks.check_positive_int(chunk, "chunk"))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    base = pca_fields(imgs, threshold=threshold, relative_to=relative_to, temperature=temperature, rank=rank,
                      ddof=ddof)
    m = build(GoldDiff, imgs, labels, schedule=schedule, image_range=image_range, **base,
              k_min=k_min, k_max=k_max, proxy_side=side, tolerance=tolerance, seed=int(seed), chunk=chunk)
    return dataclasses.replace(m, proxy=m._pool(m.images))


def _check_tolerance(tolerance) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < np.inf:
        raise ValueError(f"tolerance: expected None or a finite float >= 0, got {tolerance!r}")
    return float(tolerance)


def _subset_params(n, h, w, dataset, k_min, k_max, proxy_side):
    """The release's defaults and the checks of the subset parameters: ``(k_min, k_max, proxy_side)``."""
    rel = RELEASE_DEFAULTS.get(dataset or "", {})
    k_min = max(1, round(n * rel.get("k_min_fraction", 1 / 20))) if k_min is None else k_min
    k_max = max(1, round(n * rel.get("k_max_fraction", 1 / 10))) if k_max is None else k_max
    k_min = _checks.check_positive_int(k_min, "k_min")
    k_max = _checks.check_positive_int(k_max, "k_max")
    if k_min > k_max:
        raise ValueError(f"k_min, k_max: need k_min <= k_max, got {k_min} > {k_max}")
    side = proxy_side_for(h, rel.get("proxy_side", 0)) if proxy_side is None else _checks.check_positive_int(
        proxy_side, "proxy_side")
    if h % side or w % (h // side):
        raise ValueError(f"proxy_side: {side} must divide the image height {h}, and the pooling factor {h // side} "
                         f"the width {w}")
    return min(k_min, n), min(k_max, n), side  # the release clips both sizes to N


def certified(machine: PCALocality, *, tolerance: float, chunk: int | None = None, k_min: int | None = None,
              k_max: int | None = None, proxy_side: int | None = None, dataset: str | None = None) -> GoldDiff:
    """The certified search for a PCA-locality machine (its ``with_search``): a :class:`GoldDiff` in
    certified mode on the machine's images, covariance, θ, rule, temperature, schedule and policy."""
    n, h, w, _ = machine.images.shape
    k_min, k_max, side = _subset_params(n, h, w, dataset, k_min, k_max, proxy_side)
    chunk = min(n, max(k_min, 64)) if chunk is None else min(n, _checks.check_positive_int(chunk, "chunk"))
    fields = {f.name: getattr(machine, f.name) for f in dataclasses.fields(PCALocality)}
    m = GoldDiff(**fields, k_min=k_min, k_max=k_max, proxy_side=side, tolerance=_check_tolerance(tolerance),
                 chunk=chunk)
    return dataclasses.replace(m, proxy=m._pool(m.images))




_registry.register(_registry.MachineSpec(
    name="golddiff", builder=golddiff, scale_kind="none",
    summary="GoldDiff: PCA locality over a coarse-to-fine retrieved subset (tolerance=ε: certified)",
    reference="Shang et al., ICML 2026 (github shangxinyi/GoldDiff)",
))
