r"""PCA locality: locality from data statistics (Lukoianov, Yuan, Solomon & Sitzmann, NeurIPS 2025,
"Locality in Image Diffusion Models Emerges from Data Statistics", arXiv 2509.09672).

At time ``t`` the Wiener (optimal linear) denoiser of the training set is the matrix

.. math::

    W(t) = U\,\mathrm{diag}\Big(\frac{\bar\alpha\lambda}{\bar\alpha\lambda + 1 - \bar\alpha}\Big)\,U^\top

(``Σ = U diag(λ) Uᵀ`` the data covariance; :mod:`ellsjax.machines.wiener`). Its rows say which input
entries a linear denoiser reads for each output entry. The default neighbourhood rule
(``relative_to="global"``) is the rule of the authors' release, which produced the published numbers
(``local_diffusion/models/pca_locality.py``, ``PCALocalityDenoiser._projection_mask``; the same code in
GoldDiff's ``methods/ours.py``, ``_compute_projection_mask``): ``W`` is normalised by its diagonal,
``M_nm = |W_nm / W_nn|`` (diagonal entries below 1e-6 replaced by 1), binarised at ``θ`` times the
*global* maximum of ``M``, and output ``m`` reads the inputs ``n`` of its column:

.. math::

    N_t(m) = \{\, n : |W_{nm}/W_{nn}| \ge \theta \cdot \max_{ij} |W_{ij}/W_{ii}| \,\}

(the release's distance is ``δ² @ M``, a sum over the first index). The posterior over whole
training images ``φ_j`` is taken with distances inside the neighbourhood only (the paper's Eq. 8):

.. math::

    \hat x_0(m) = \sum_j \mathrm{softmax}_j\Big(-\frac{\sum_{n \in N_t(m)} (x_t(n) - a\,\phi_j(n))^2}
        {2 s^2 T}\Big)\, \phi_j(m)

(``T`` a temperature, 1 in the paper). ``θ = 0`` gives every entry the whole image: the ideal score
machine (the release instead uses the unthresholded ``M`` as weights there).

``relative_to="row"`` is the per-row reading of the paper's text, ``|W_mn| ≥ θ·max_n'|W_mn'|`` (the
diagonal normalisation cancels); outputs differ from the release's rule by up to ~40% on CIFAR-10.
A row of ``W`` that is zero (an entry without variance, or ``ᾱ = 0``) then gets an empty
neighbourhood: uniform weights, the training mean.

**Exactness.** The release streams the training set in chunks and averages the per-chunk softmax
means weighted equally per chunk (its ``WeightedStreamingSoftmax``), which is not the softmax over
the whole set unless every chunk has the same normaliser. Here the softmax over all training images
is exact: one :func:`ellsjax.kernel.streaming_softmax` pass merges chunks with their log-sum-exp
statistics. Results therefore differ from the release whenever it used more than one chunk.

Implementation: the masked distance is a GEMM with the mask,
``−‖(x − aφ)_N‖² = 2a·N·(φ ⊙ (x − aφ/2)) − N·x² ``, so for each image of the batch (``lax.map``;
memory ``D²`` for its mask) the queries are the mask rows, the keys ``φ_j ⊙ (x_b − a φ_j/2)`` with
zero squared norm, and the values each output row's pixels. The mask needs ``W(t)``: ``O(D²·r)``,
built once per call when the batch shares one ``t`` (what the samplers pass; a cond picks this
path at run time) and per image otherwise, on top of the ``O(N·D²)`` softmax per image.

**Certified search** (``m.with_search(CertifiedSubset(tolerance=ε))``, ``ε ≥ 0``; the retrieval order
of GoldDiff, :mod:`ellsjax.machines.golddiff`, without its random pre-sample): the images are visited in the
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
  :meth:`PCALocality.denoise_with_bound` returns per output.

When nothing certifies early the pass visits every image: the exact machine, never a wrong answer.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax import kernel as _kernel
from ellsjax import schedules as _schedules
from ellsjax.machines import _pruning, _registry
from ellsjax.machines.base import Machine, TrainingImages, build, prepare_training_set, register
from ellsjax.machines.search import AbstractSearch, CertifiedSubset, Exact
from ellsjax.machines.wiener import check_rank, fit_images

__all__ = ["PCALocality", "pca", "neighbourhoods", "proxy_side_for", "subset_params", "release_threshold",
           "RELEASE_DEFAULTS"]

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


def release_threshold(dataset: str | None) -> float:
    """The mask threshold ``θ`` the GoldDiff release uses for ``dataset`` (0.03 for CIFAR-10, else the
    PCA release's 0.02)."""
    return RELEASE_DEFAULTS.get(dataset or "", {}).get("threshold", 0.02)


def subset_params(n, h, w, dataset, k_min, k_max, proxy_side):
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


def neighbourhoods(
    basis: Float[Array, "d r"],
    eigvals: Float[Array, " r"],
    alpha_bar: Float[ArrayLike, ""],
    *,
    threshold: float,
    relative_to: Literal["row", "global"] = "global",
) -> Float[Array, "d d"]:
    """The 0/1 neighbourhood matrix ``N[m, n]`` (output ``m`` reads input ``n``) at signal variance ``ᾱ``.

    Args:
        basis: ``[D, r]`` covariance eigenvectors.
        eigvals: ``[r]`` eigenvalues.
        alpha_bar: ``ᾱ(t)`` (scalar).
        threshold: ``θ ∈ [0, 1]``.
        relative_to: ``"global"`` (the authors' release, see the module docstring) or ``"row"``
            (``|W_mn| ≥ θ·max_n'|W_mn'|``).
    """
    ab = jnp.asarray(alpha_bar, jnp.float32)
    pos = eigvals > 0
    gain = jnp.where(pos, ab * eigvals / jnp.where(pos, ab * eigvals + (1.0 - ab), 1.0), 0.0)
    wmat = jnp.matmul(basis * gain[None, :], basis.T, precision="highest")
    if relative_to == "row":
        mag = jnp.abs(wmat)
        rowmax = jnp.max(mag, axis=1, keepdims=True)
        keep = (mag >= threshold * rowmax) & (rowmax > 0)
    else:
        diag = jnp.diagonal(wmat)
        diag = jnp.where(jnp.abs(diag) < 1e-6, 1.0, diag)
        mag = jnp.abs(wmat / diag[:, None])
        keep = (mag >= threshold * jnp.max(mag)).T
    return keep.astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class PCALocality(Machine):
    """The PCA-locality machine. Build with :func:`pca`. It has no scale. Its attributes are
    :class:`~ellsjax.machines.Machine`'s and these.

    Attributes:
        basis: ``[D, r]`` leading covariance eigenvectors of the whole training set.
        eigvals: ``[r]`` their eigenvalues.
        threshold: ``θ``.
        relative_to: ``"global"`` (the release's rule) or ``"row"``.
        temperature: ``T``.
        search: :class:`~ellsjax.machines.search.Exact` (every image scored) or
            :class:`~ellsjax.machines.search.CertifiedSubset` (see the module docstring).
        proxy: ``[N, D̄]`` the training images pooled to the certified search's proxy side
            (``None`` with the exact search).
    """

    basis: Float[Array, "d r"] | None = None
    eigvals: Float[Array, " r"] | None = None
    threshold: float = 0.02
    relative_to: Literal["row", "global"] = "global"
    temperature: float = 1.0
    search: AbstractSearch = Exact()
    proxy: Float[Array, "n dl"] | None = None

    _DATA_FIELDS: ClassVar[tuple[str, ...]] = Machine._DATA_FIELDS + ("basis", "eigvals", "proxy")

    def with_search(self, search: AbstractSearch) -> PCALocality:
        """This machine with another search: :class:`~ellsjax.machines.search.Exact` (every image
        scored) or :class:`~ellsjax.machines.search.CertifiedSubset` (images visited coarse to fine
        until a rigorous bound on the rest is within its tolerance; unset options take the GoldDiff
        release's defaults for this training set). :meth:`denoise_with_bound` then returns the bound.

        Example:
            >>> import jax, ellsjax as ej
            >>> from ellsjax.machines.search import CertifiedSubset
            >>> imgs = jax.random.uniform(jax.random.key(0), (40, 8, 8, 1), minval=-1, maxval=1)
            >>> m = ej.machines.pca(imgs).with_search(CertifiedSubset(1e-3, chunk=8))
            >>> x0, bound = m.denoise_with_bound(imgs[:2] * 0.9, 0.1)
            >>> bool((bound <= 1e-3).all())
            True
        """
        if isinstance(search, Exact):
            return dataclasses.replace(self, search=search, proxy=None)
        if not isinstance(search, CertifiedSubset):
            raise TypeError(f"search: the PCA-locality machine takes Exact() or CertifiedSubset(...), got {search!r}")
        if self.shape_only:
            raise ValueError("images: the certified search pools the training images; build from data, not shapes")
        n, (h, w, _) = self.num_images, self.image_shape
        k_min, k_max, side = subset_params(n, h, w, search.dataset, None, search.k_max, search.proxy_side)
        chunk = min(n, max(k_min, 64) if search.chunk is None else search.chunk)
        resolved = dataclasses.replace(search, chunk=chunk, k_max=k_max, proxy_side=side)
        return dataclasses.replace(self, search=resolved, proxy=pool(self.images, side))

    def denoise_with_bound(self, x_t: Any, t: Any, *, scale: Any = None, label: Any = None):
        """``(x̂0 [B, H, W, C], bound [B, H, W])``: what :meth:`denoise` returns, with
        ``|x̂0 − exact| ≤ bound`` in every channel (plus float32 rounding): 0 with the exact search,
        the certified search's bound with :class:`~ellsjax.machines.search.CertifiedSubset`."""
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        return _jit_bounded(self._ready(scale, label), x_t, t, label)

    def visited_chunks(self, x_t: Any, t: Any, *, label: Any = None) -> Int[Array, " b"]:
        """Certified search: how many chunks of images each image's pass scored (diagnostics)."""
        if not isinstance(self.search, CertifiedSubset):
            raise ValueError("search: visited_chunks reports the certified search; this machine scores every image")
        x_t, t, label, _ = self.check_inputs(x_t, t, scale=None, label=label)
        return _jit_visits(self._ready(None, label), x_t, t, label)

    def _mask(self, t):
        ab, _ = self.schedule.variances(t)
        return neighbourhoods(self.basis, self.eigvals, ab, threshold=self.threshold, relative_to=self.relative_to)

    def _mask_queries(self, mask, a, var):
        """One query per output entry: its mask row, at signal ``a`` and variance ``var``."""
        h, w, ch = self.image_shape
        d, row = h * w * ch, w * ch
        tau = 0.5 / (var * self.temperature)
        return _kernel.Queries(mask.reshape(h, row, d), jnp.full((h, row), a), jnp.full((h, row), tau))

    def _image_bank(self, phi, ok, x, a):
        """The kernel bank of training images ``phi`` ``[c, D]`` (``ok`` marks real ones) for one
        image ``x``: keys ``φ ⊙ (x − aφ/2)`` with zero norm (``N·keys = N·(xφ − aφ²/2)``), values each
        output row's pixels."""
        h, w, ch = self.image_shape
        c = phi.shape[0]
        values = phi.reshape(c, h, w * ch).transpose(1, 0, 2)  # [H, c, W·C]
        return _kernel.Bank(phi * (x - 0.5 * a * phi), values, jnp.where(ok, 0.0, -jnp.inf),
                            jnp.zeros((c,), jnp.float32))

    def _map_batch(self, one, x_t, t, label, derive=lambda mask: mask):
        """``lax.map`` of ``one(x [D], t, label | None, index, derive(mask))`` over the batch, with the
        mask (and what ``derive`` builds from it) computed once when every image has the same ``t``
        (what the samplers pass; a ``lax.cond`` picks the path at run time), else per image."""
        b = x_t.shape[0]
        xs = x_t.reshape(b, -1)
        labels = jnp.zeros((b,), jnp.int32) if label is None else label
        lb = (lambda v: None) if label is None else (lambda v: v)  # noqa: E731
        idx = jnp.arange(b)

        def shared():
            per_t = derive(self._mask(t[0]))
            return jax.lax.map(lambda a: one(a[0], t[0], lb(a[1]), a[2], per_t), (xs, labels, idx))

        def per_image():
            return jax.lax.map(lambda a: one(a[0], a[1], lb(a[2]), a[3], derive(self._mask(a[1]))), (xs, t, labels, idx))

        return shared() if b == 1 else jax.lax.cond(jnp.all(t == t[0]), shared, per_image)

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
        return self._image_bank(self.pixels[idx], ok, x, a)

    def _coarse_fine_order(self, x, a, eligible, proxy, proxy_side, k_max):
        """Images by proxy distance (ineligible last), the first ``k_max`` re-sorted by full distance."""
        n = self.num_images
        h, w, ch = self.image_shape
        d_proxy = jnp.sum((pool(x.reshape(h, w, ch), proxy_side)[None] - a * proxy) ** 2, -1)
        d_proxy = jnp.where(eligible, d_proxy, jnp.inf)
        order = jnp.argsort(d_proxy)
        head = order[:k_max]
        phi = self.pixels[head]
        d_fine = jnp.sum((x[None] - a * phi) ** 2, -1)
        d_fine = jnp.where(jnp.isfinite(d_proxy[head]), d_fine, jnp.inf)
        head = head[jnp.argsort(d_fine)]
        order = jnp.concatenate([head, order[k_max:]]) if k_max < n else head
        return order, jnp.isfinite(d_proxy[order])

    # ----------------------------------------------------------------------------- certified search
    def _bound_structure(self, mask):
        """What the certified lower bounds read of ``N_t``: ``I [G, D]``, the intersection of the
        neighbourhoods of every output of group ``g`` (the ``f×f`` pixels and channels of one proxy
        cell), and each output's group."""
        h, w, ch = self.image_shape
        f = h // self.search.proxy_side
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
        n, c = self.num_images, self.search.chunk
        ab, var = self.schedule.variances(t)
        a = jnp.sqrt(ab)
        queries = self._mask_queries(mask, a, var)
        tau = queries.inv_temp[0, 0]
        finite = jnp.isfinite(tau)
        kappa = jnp.where(finite, tau, 1.0)  # scores are raw where τ = ∞ (nearest-image limit)
        order, real = self._coarse_fine_order(x, a, self._members_ok(lb), self.proxy, self.search.proxy_side,
                                              self.search.k_max)
        nch = -(-n // c)
        pad = nch * c - n
        order = jnp.pad(order, (0, pad))
        real = jnp.pad(real, (0, pad))
        phi = self.pixels[order]  # in visiting order
        # every output of group g reads at least the pixels of I_g, and output m its own pixel when
        # m ∈ N(m): Σ_{n∈I_g} e_n² + [m ∈ N(m) \ I_g]·e_m² ≤ ‖e_{N(m)}‖²
        e2 = (x[None] - a * phi) ** 2
        low_g = jnp.matmul(e2, inter.T, precision="highest")  # [N', G]
        own = (jnp.diagonal(mask) > 0.5) & (inter[group, jnp.arange(d)] < 0.5)
        low = (low_g[:, group] + jnp.where(own[None], e2, 0.0)) * (1.0 - 4 * (d + 4) * _U32)  # float32 sums
        # τ‖x_N(m)‖² and the rounding slack δ_m of the kernel's scores: 8u·Σ|terms| (see the module
        # docstring: the blocked accumulation of float32 GEMMs; the worst case γ_n would forbid any skip)
        phimax, phimin = jnp.max(self.pixels, 0), jnp.min(self.pixels, 0)
        xn2 = jnp.matmul(mask, x * x, precision="highest")
        big = jnp.matmul(mask, (jnp.abs(x) + a * jnp.maximum(phimax, -phimin)) ** 2, precision="highest")
        slack = kappa * 8 * _U32 * (big + xn2)
        ub = jnp.where(real[:, None], kappa * (xn2 - low) + slack, -jnp.inf)  # [N', D] ≥ every score
        cub = ub.reshape(nch, c, d)
        smax, slse = _pruning.suffix_bounds(jnp.max(cub, 1), jax.nn.logsumexp(cub, 1), axis=0)  # [nch + 1, D]
        spread = (phimax - phimin).reshape(h, row)  # |φ_j(m) − x̂0(m)| ≤ spread
        eps = self.search.tolerance

        def done(i, st):
            mx, tot = st.max, st.total  # [H, W·C]: one query per output
            up = smax[i].reshape(h, row)
            nearest = (up < mx) | (spread == 0)
            if eps == 0:
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
    def _exact_one(self, x, tb, lb, idx, mask):
        d = int(np.prod(self.image_shape))
        ab, var = self.schedule.variances(tb)
        a = jnp.sqrt(ab)
        members, valid, nchunks, c = self._chunking(None if lb is None else lb[None], 4 * (4 * d + 4))

        def bank_fn(i):
            imgs, ok = self._chunk(members, valid, c, i)  # [1, c, H, W, C], [1, c]
            return self._image_bank(imgs.reshape(c, d), ok[0], x, a)

        means, _ = _kernel.streaming_softmax(self._mask_queries(mask, a, var), bank_fn, nchunks)  # [H, W·C, W·C]
        out = jnp.diagonal(means, axis1=1, axis2=2).reshape(d)
        return out, jnp.zeros_like(out), jnp.int32(0)

    def _run(self, x_t, t, label):
        """``(x̂0, bound per value, chunks visited)`` under the machine's search."""
        if isinstance(self.search, CertifiedSubset):
            # the certified bounds' structure comes from the mask: built with it, once per distinct t
            out, bound, visited = self._map_batch(lambda x, tb, lb, idx, per_t: self._certified_one(x, tb, lb, *per_t),
                                                  x_t, t, label, lambda mask: (mask, self._bound_structure(mask)))
        else:
            out, bound, visited = self._map_batch(self._exact_one, x_t, t, label)
        return out.reshape(x_t.shape), bound.reshape(x_t.shape), visited

    def _denoise(self, x_t, t, label, scale):
        return self._run(x_t, t, label)[0]

    def _denoise_bounded(self, x_t, t, label, scale):
        out, bound, _ = self._run(x_t, t, label)
        return out, jnp.max(bound, -1)


@jax.jit
def _jit_bounded(m, x_t, t, label):
    return m._denoise_bounded(x_t, t, label, None)


@jax.jit
def _jit_visits(m, x_t, t, label):
    return m._run(x_t, t, label)[2]


def pool(x: Float[Array, "*n h w c"], side: int) -> Float[Array, "*n dl"]:
    """``[..., H, W, C]`` → ``[..., D̄]``: the average over ``f×f`` cells, ``f = H/side`` (per
    channel), flattened — the coarse screen's proxy."""
    h, w, ch = x.shape[-3:]
    f = h // side
    y = x.reshape(*x.shape[:-3], h // f, f, w // f, f, ch).mean(axis=(-4, -2))
    return y.reshape(*x.shape[:-3], -1)


register(PCALocality)


def pca(
    images: TrainingImages,
    labels: Int[ArrayLike, " n"] | None = None,
    *,
    threshold: float = 0.02,
    relative_to: Literal["row", "global"] = "global",
    temperature: float = 1.0,
    rank: int | None = None,
    ddof: int = 1,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    platform: str | None = None,
) -> PCALocality:
    """The PCA-locality machine (Lukoianov et al., NeurIPS 2025): an LS-type softmax over whole
    training images with each output entry's distance taken over its Wiener-matrix neighbourhood.

    Args:
        images: ``[N, H, W, C]`` float training images in ``[-1, 1]``.
        labels: optional ``[N]`` int class ids; then ``denoise(..., label=y)`` searches class ``y``
            only. The neighbourhoods always come from the whole training set's covariance.
        threshold: ``θ ∈ [0, 1]`` (default 0.02, the release's ``mask_threshold``; 0 gives IS).
        relative_to: ``"global"`` (default: the release's rule, which produced the published
            numbers; see the module docstring) or ``"row"`` (θ times each row's maximum).
        temperature: ``T > 0`` dividing the logits (1 in the paper).
        rank: keep the top ``rank`` covariance components (``None``: all).
        ddof: covariance normalisation ``N − ddof`` (1 as in the release).
        schedule: noise schedule (object or name).
        image_range: the documented pixel range the training images are checked against
            (``None``: any real data, e.g. samples of a Gaussian).
        chunk_size: training images per streamed chunk (``None``: from ``memory_budget``).
        memory_budget: bytes of temporaries per chunk (``None``: a per-backend default).
        platform: whose budgets apply, ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``None``: the platform of the
            devices the images live on).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (8, 6, 6, 1), minval=-1, maxval=1)
        >>> m = ej.machines.pca(imgs, threshold=0.1)
        >>> m.denoise(imgs[:2], 0.5).shape
        (2, 6, 6, 1)
    """
    imgs, _, _ = prepare_training_set(images, labels, image_range=image_range)
    return build(
        PCALocality, imgs, labels, schedule=schedule, image_range=image_range, chunk_size=chunk_size,
        memory_budget=memory_budget, platform=platform,
        **pca_fields(imgs, threshold=threshold, relative_to=relative_to, temperature=temperature, rank=rank, ddof=ddof),
    )


def pca_fields(imgs, *, threshold, relative_to, temperature, rank, ddof) -> dict:
    """Check the PCA options (as :func:`pca` documents them) and fit the covariance of ``imgs``:
    the machine's own fields (shared with :mod:`ellsjax.machines.golddiff`)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold: expected a float in [0, 1], got {threshold!r}")
    if relative_to not in ("row", "global"):
        raise ValueError(f"relative_to: must be 'row' or 'global', got {relative_to!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (0 < temperature < np.inf):
        raise ValueError(f"temperature: expected a positive finite float, got {temperature!r}")
    rank = check_rank(rank, imgs.shape)
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise ValueError(f"ddof: expected an int >= 0, got {ddof!r}")
    _, basis, lam = fit_images(imgs, ddof=int(ddof), rank=rank)
    return dict(basis=basis, eigvals=lam,
                threshold=float(threshold), relative_to=relative_to, temperature=float(temperature))


_registry.register(_registry.MachineSpec(
    name="pca", builder=pca, machine=PCALocality,
    summary="PCA locality: a softmax over training images with Wiener-matrix neighbourhoods per output",
    reference="Lukoianov, Yuan, Solomon & Sitzmann, NeurIPS 2025 (arXiv 2509.09672)",
))
