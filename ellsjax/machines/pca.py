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
from ellsjax.machines import _registry
from ellsjax.machines.base import Machine, build, prepare_training_set, register
from ellsjax.machines.wiener import gaussian_fit

__all__ = ["PCALocality", "pca", "neighbourhoods"]


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
    """The PCA-locality machine. Build with :func:`pca`. ``scale`` is accepted and ignored.

    Attributes (beyond :class:`~ellsjax.machines.Machine`):
        basis: ``[D, r]`` leading covariance eigenvectors of the whole training set.
        eigvals: ``[r]`` their eigenvalues.
        threshold: ``θ``.
        relative_to: ``"global"`` (the release's rule) or ``"row"``.
        temperature: ``T``.
    """

    basis: Float[Array, "d r"] | None = None
    eigvals: Float[Array, " r"] | None = None
    threshold: float = 0.02
    relative_to: Literal["row", "global"] = "global"
    temperature: float = 1.0

    _DATA_FIELDS: ClassVar[tuple[str, ...]] = Machine._DATA_FIELDS + ("basis", "eigvals")

    def with_search(self, *, tolerance: float | None, chunk: int | None = None, **golddiff_options) -> PCALocality:
        """This machine with certified image-level search (or exact again with ``tolerance=None``).

        The images are visited coarse to fine and scored exactly until a rigorous bound on the rest
        is within ``tolerance`` (:mod:`ellsjax.machines.golddiff`, its certified mode, on this
        machine's covariance, θ, rule and temperature); ``denoise_with_bound`` then returns the
        bound. ``golddiff_options``: ``k_min``, ``k_max``, ``proxy_side``, ``dataset``.
        """
        from ellsjax.machines.golddiff import certified

        if tolerance is None:
            return self
        return certified(self, tolerance=tolerance, chunk=chunk, **golddiff_options)

    def denoise_with_bound(self, x_t, t, *, scale=None, label=None):
        """``(x̂0 [B, H, W, C], bound [B, H, W])`` with ``bound = 0``: this machine scores every image, so
        its estimate is the exact one (up to float32 rounding, as every bound in ellsjax). For a
        certified estimate that scores fewer images, :meth:`with_search` (``tolerance=ε``)."""
        out = self.denoise(x_t, t, scale=scale, label=label)
        return out, jnp.zeros(out.shape[:-1], out.dtype)

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

    def _denoise(self, x_t, t, label, scale):
        d = int(np.prod(self.image_shape))

        def one(x, tb, lb, idx, mask):
            ab, var = self.schedule.variances(tb)
            a = jnp.sqrt(ab)
            members, valid, nchunks, c = self._chunking(None if lb is None else lb[None], 4 * (4 * d + 4))

            def bank_fn(i):
                imgs, ok = self._chunk(members, valid, c, i)  # [1, c, H, W, C], [1, c]
                return self._image_bank(imgs.reshape(c, d), ok[0], x, a)

            means, _ = _kernel.streaming_softmax(self._mask_queries(mask, a, var), bank_fn, nchunks)  # [H, W·C, W·C]
            return jnp.diagonal(means, axis1=1, axis2=2).reshape(d)

        return self._map_batch(one, x_t, t, label).reshape(x_t.shape)


register(PCALocality)


def pca(
    images: Float[ArrayLike, "n h w c"],
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
        memory_budget=memory_budget,
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
    if rank is not None:
        rank = _checks.check_positive_int(rank, "rank")
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise ValueError(f"ddof: expected an int >= 0, got {ddof!r}")
    _, basis, lam = gaussian_fit(np.asarray(imgs).reshape(imgs.shape[0], -1), ddof=int(ddof), rank=rank)
    return dict(basis=jnp.asarray(basis, jnp.float32), eigvals=jnp.asarray(lam, jnp.float32),
                threshold=float(threshold), relative_to=relative_to, temperature=float(temperature))


_registry.register(_registry.MachineSpec(
    name="pca", builder=pca, scale_kind="none",
    summary="PCA locality: a softmax over training images with Wiener-matrix neighbourhoods per output",
    reference="Lukoianov, Yuan, Solomon & Sitzmann, NeurIPS 2025 (arXiv 2509.09672)",
))
