r"""Interpretability: patch provenance maps and creativity measures.

The ELS machine's samples are *patch mosaics* (Kamb & Ganguli, arXiv 2412.20292, §5): every pixel
is pulled toward the center of training patches from anywhere in the training set,

.. math::

    \hat x_0(p) = \sum_j w_j(p)\, \phi_j^{\mathrm{center}}, \qquad
    w_j(p) = \mathrm{softmax}_j\big(-\|x_t[\Omega_p] - a\,\phi_j\|^2 / 2s^2\big).

:func:`provenance` replays a DDIM trajectory and records, per step and output pixel, the training
patch ``j* = argmax_j w_j(p)`` (its image and the position of its center), its weight ``w_{j*}`` and
the entropy ``H = −Σ_j w_j log w_j`` of the weights: the streaming kernel tracks them in the same
pass as the posterior mean (:func:`ellsjax.kernel.streaming_softmax` with ``provenance=True``).

:func:`creativity` measures how far samples are from the training set: the distance to the
nearest training image, the nearest/second-nearest ratio and near-copy flag of the memorization
literature, the distance in patch space, the consistency condition of the paper's Theorem 4.1,
and, given provenance, mosaic statistics. :func:`compare` runs several machines from the same
noise and tabulates these (:func:`format_table`); :func:`plot_provenance` draws the maps.

Example:
    >>> import jax.numpy as jnp, ellsjax as ej
    >>> imgs = jnp.stack([jnp.full((6, 6, 1), v) for v in (-0.8, 0.0, 0.8)])  # 3 flat images
    >>> x = jnp.full((1, 6, 6, 1), 0.75)
    >>> p = ej.explain.provenance(ej.machines.els(imgs), x, [0.05, 0.0], scales=[3])
    >>> p.image.shape, p.samples.shape          # [steps, B, H, W], [B, H, W, C]
    ((1, 1, 6, 6), (1, 6, 6, 1))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax import samplers as _samplers
from ellsjax._typing import TimeGrid
from ellsjax.denoiser import Denoiser

__all__ = [
    "Provenance",
    "provenance",
    "nearest_images",
    "patch_distance",
    "consistency",
    "mosaic_stats",
    "creativity",
    "compare",
    "format_table",
    "TABLE_COLUMNS",
    "plot_provenance",
    "COPY_RATIO",
    "CONSISTENCY_TOLERANCE",
    "MOSAIC_MIN_WEIGHT",
]

#: A sample is a near-copy when its distance to the nearest training image is below this fraction
#: of its distance to the second nearest (the ratio test of Yoon et al. 2023 and Gu et al. 2023).
COPY_RATIO = 1.0 / 3.0

#: Two pixel values (in ``[-1, 1]``) are "equal" for the consistency condition when they differ by
#: at most one 8-bit grey level, ``2/255``.
CONSISTENCY_TOLERANCE = 2.0 / 255.0

#: Mosaic statistics count a pixel's source only when its heaviest patch holds at least this weight.
MOSAIC_MIN_WEIGHT = 0.5


class Provenance(NamedTuple):
    """A DDIM trajectory replayed with provenance (see :func:`provenance`).

    ``S`` steps; step ``i`` denoises ``x_{ts[i]}`` (``ts[i] > 0``), so ``[-1]`` is the last,
    least noisy step.

    Attributes:
        samples: ``[B, H, W, C]`` the final samples ``x_{ts[-1]}`` of the replay.
        x0s: ``[S, B, H, W, C]`` the posterior mean ``x̂0`` at each step.
        ts: ``[S+1]`` the times.
        scales: the patch size of each step (``None`` entries for IS).
        image: ``[S, B, H, W]`` int32 training-image index of the patch with the most weight.
        row: ``[S, B, H, W]`` int32 row of that patch's center in its training image (IS: the pixel's row).
        col: ``[S, B, H, W]`` int32 column of the center.
        weight: ``[S, B, H, W]`` that patch's weight ``max_j w_j(p)``.
        entropy: ``[S, B, H, W]`` ``−Σ_j w_j log w_j`` in nats, over every training patch of the bank.
    """

    samples: Float[Array, "b h w c"]
    x0s: Float[Array, "s b h w c"]
    ts: Float[Array, " s1"]
    scales: tuple
    image: Int[Array, "s b h w"]
    row: Int[Array, "s b h w"]
    col: Int[Array, "s b h w"]
    weight: Float[Array, "s b h w"]
    entropy: Float[Array, "s b h w"]


def provenance(
    denoiser: Denoiser,
    x_start: Float[ArrayLike, "b h w c"],
    ts: TimeGrid,
    *,
    scales: Sequence[int] | None = None,
    label: Any = None,
) -> Provenance:
    """Replay deterministic DDIM from ``x_start`` and record where every pixel comes from.

    The trajectory is that of :func:`ellsjax.samplers.ddim` (same steps, same arguments); each
    step's posterior mean streams the training images patch by patch (every patch keeps its image
    and position: no deduplicated bank) through the one kernel pass that also tracks the
    provenance statistics. Samples agree with ``ddim`` up to float32 summation order.

    Args:
        denoiser: an ELS-family machine (``els``, ``bbels``, ``ls``) or the ideal score (``is``).
        x_start: ``[B, H, W, C]`` starting noise at ``ts[0]``.
        ts: strictly decreasing times; the last may be 0.
        scales: ``len(ts) − 1`` patch sizes (required by the patch machines).
        label: ``None``, a class id or ``[B]`` ids for a conditional machine.

    Returns:
        A :class:`Provenance`.

    Example:
        >>> import jax.numpy as jnp, ellsjax as ej
        >>> imgs = jnp.stack([jnp.full((6, 6, 1), v) for v in (-0.8, 0.0, 0.8)])  # 3 flat images
        >>> m = ej.machines.els(imgs)
        >>> p = ej.explain.provenance(m, jnp.full((1, 6, 6, 1), 0.75), [0.05, 0.0], scales=[3])
        >>> int(p.image[-1].min()), int(p.image[-1].max())    # every pixel from image 2
        (2, 2)
    """
    if not isinstance(denoiser, Denoiser) or not getattr(denoiser, "supports_provenance", False):
        raise ValueError(
            f"denoiser: provenance needs a softmax machine over training patches (els, bbels, ls or is), "
            f"got {type(denoiser).__name__}"
        )
    x, label = _samplers.check_denoiser(denoiser, x_start, label)
    ts = _samplers.check_times(ts, denoiser)
    scales = _samplers.check_scales(scales, denoiser, ts.shape[0] - 1)
    # the DDIM trajectory of ellsjax.samplers.ddim, each step's x̂0 from _denoise_provenance
    x, traj, prov = _samplers.run(_samplers.DDIM, denoiser, x, ts, scales=scales, label=label,
                                  return_trajectory=True, x0_fn=_with_provenance, checked=True, prepare=False)
    return Provenance(x, traj.x0s, ts, scales if scales is not None else (None,) * (ts.shape[0] - 1), *prov)


def _with_provenance(denoiser, x_t, t, label, scale):
    """The sampler hook: ``(x̂0, PixelProvenance)`` of one step."""
    return denoiser._denoise_provenance(x_t, t, label, scale)


# -- creativity measures -----------------------------------------------------------------------------------


def _flat(x: Any, name: str) -> np.ndarray:
    return np.asarray(_checks.as_image_batch(x, name), np.float64).reshape(np.shape(x)[0], -1)


def nearest_images(
    samples: Float[ArrayLike, "b h w c"], images: Float[ArrayLike, "n h w c"]
) -> dict[str, np.ndarray]:
    r"""Distance of each sample to its nearest and second-nearest training image (float64).

    ``rms = ‖x − φ_(1)‖/√D`` (root-mean-square pixel difference, in ``[-1, 1]`` units) and
    ``ratio = ‖x − φ_(1)‖ / ‖x − φ_(2)‖``; ``near_copy = ratio < COPY_RATIO`` (1/3).

    Returns:
        dict of ``[B]`` arrays: ``nearest`` (index), ``rms``, ``ratio``, ``near_copy`` (bool).

    Example:
        >>> import numpy as np
        >>> imgs = np.stack([np.full((4, 4, 1), v, np.float32) for v in (-0.5, 0.0, 0.5)])
        >>> r = nearest_images(imgs[2:] + 0.01, imgs)
        >>> int(r["nearest"][0]), bool(r["near_copy"][0])
        (2, True)
    """
    x = _flat(samples, "samples")
    ims = _flat(images, "images")
    if ims.shape[1] != x.shape[1]:
        raise ValueError(f"images: expected images of the samples' shape {np.shape(samples)[1:]}, got {np.shape(images)[1:]}")
    if len(ims) < 2:
        raise ValueError("images: need at least 2 training images for the nearest/second-nearest ratio")
    d2 = np.empty((len(x), len(ims)))
    for lo in range(0, len(ims), 1024):
        blk = ims[lo : lo + 1024]
        d2[:, lo : lo + 1024] = ((x[:, None, :] - blk[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, :2]
    d1 = np.sqrt(np.take_along_axis(d2, order[:, :1], 1)[:, 0])
    d2nd = np.sqrt(np.take_along_axis(d2, order[:, 1:2], 1)[:, 0])
    ratio = np.where(d2nd > 0, d1 / np.where(d2nd > 0, d2nd, 1.0), 0.0)
    return {"nearest": order[:, 0], "rms": d1 / np.sqrt(x.shape[1]), "ratio": ratio, "near_copy": ratio < COPY_RATIO}


def _interior_patches(x: Array, k: int) -> Array:
    """``[N, P, k·k·C]`` every ``k×k`` patch lying fully inside each image (rows, then columns)."""
    n, h, w, c = x.shape
    r = np.arange(h - k + 1)[:, None, None, None] + np.arange(k)[None, None, :, None]
    q = np.arange(w - k + 1)[None, :, None, None] + np.arange(k)[None, None, None, :]
    r, q = np.broadcast_arrays(r, q)
    return x[:, r, q].reshape(n, (h - k + 1) * (w - k + 1), k * k * c)


@partial(jax.jit, static_argnames=("k", "chunk"))
def _patch_nn(samples, images, k, chunk):
    q = _interior_patches(samples, k)  # [B, P, d]
    b, p, d = q.shape
    q = q.reshape(b * p, d)
    qq = jnp.sum(q * q, -1)
    n = images.shape[0]
    nch = -(-n // chunk)
    padded = jnp.concatenate([images, jnp.broadcast_to(images[:1], (nch * chunk - n, *images.shape[1:]))])

    def body(best, i):
        keys = _interior_patches(jax.lax.dynamic_slice_in_dim(padded, i * chunk, chunk), k).reshape(-1, d)
        d2 = qq[:, None] + jnp.sum(keys * keys, -1)[None] - 2 * jnp.dot(q, keys.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.minimum(best, jnp.min(d2, -1)), None

    best, _ = jax.lax.scan(body, jnp.full((b * p,), jnp.inf), jnp.arange(nch))
    return jnp.sqrt(jnp.maximum(best, 0.0) / d).reshape(b, p)


def patch_distance(
    samples: Float[ArrayLike, "b h w c"], images: Float[ArrayLike, "n h w c"], *, patch_size: int = 3
) -> np.ndarray:
    r"""Distance in patch space: for every ``k×k`` patch lying fully inside a sample, the RMS
    distance ``min_j ‖P − φ_j‖/√(k²C)`` to the nearest ``k×k`` patch lying fully inside any training
    image (the ELS bank), averaged over the sample's patches. ``[B]``; float32 (a floor of ~1e-3
    for exact copies, from ``‖P‖² + ‖φ‖² − 2P·φ``).

    Example:
        >>> import numpy as np
        >>> imgs = np.stack([np.full((6, 6, 1), v, np.float32) for v in (-0.8, 0.0, 0.8)])
        >>> bool(patch_distance(imgs[2:], imgs)[0] < 1e-2)    # a training image: all its patches are in the bank
        True
    """
    x = _checks.as_image_batch(samples, "samples")
    ims = _checks.as_image_batch(images, "images", shape=tuple(x.shape[1:]))
    k = _checks.check_scale(patch_size, "patch_size")
    if k > min(x.shape[1:3]):
        raise ValueError(f"patch_size: {k} exceeds the {x.shape[1]}x{x.shape[2]} images")
    npatch = (x.shape[1] - k + 1) * (x.shape[2] - k + 1)
    per_image = 4 * npatch * (2 * x.shape[0] * npatch + k * k * x.shape[-1])  # distances + gathered patches
    chunk = int(max(1, min(ims.shape[0], (32 * 2**20) // per_image)))
    return np.asarray(_patch_nn(x, ims, k, chunk)).mean(axis=1)


def consistency(
    samples: Float[ArrayLike, "b h w c"],
    machine: Denoiser,
    *,
    scale: int | None = None,
    tolerance: float = CONSISTENCY_TOLERANCE,
    label: Any = None,
) -> np.ndarray:
    r"""The consistency condition of the paper's Theorem 4.1: the fraction of pixels ``p`` of each
    sample with ``|x(p) − φ*(p)^center| ≤ tolerance`` in every channel, ``φ*(p)`` the l2-nearest
    patch to ``x[Ω_p]`` in ``machine``'s bank at patch size ``scale``.

    ``machine.denoise(x, 0, scale=scale)`` is exactly that nearest-patch center (the ``s → 0`` limit,
    averaged over exact ties), so any machine with a noise-free limit works: ELS/bbELS/LS (the
    patch consistency of the theorem), IS (the fraction of pixels equal to the nearest image).
    ``tolerance`` defaults to one 8-bit grey level, ``2/255``.

    Returns:
        ``[B]`` fractions in ``[0, 1]``.

    Example:
        >>> import numpy as np, ellsjax as ej
        >>> imgs = np.stack([np.full((6, 6, 1), v, np.float32) for v in (-0.8, 0.0, 0.8)])
        >>> float(consistency(imgs[2:] + 0.1, ej.machines.bbels(imgs), scale=3)[0])   # 0.9 is no patch center
        0.0
    """
    if not float(tolerance) >= 0:
        raise ValueError(f"tolerance: must be >= 0, got {tolerance!r}")
    x = _checks.as_image_batch(samples, "samples", shape=machine.image_shape)
    centers = machine.denoise(x, 0.0, scale=scale, label=label)
    ok = jnp.all(jnp.abs(x - centers) <= float(tolerance), axis=-1)
    return np.asarray(jnp.mean(ok, axis=(1, 2)), np.float64)


def _count(m: np.ndarray, v: int) -> int:
    """Number of 4-connected regions of value ``v`` in a 2-D integer map."""
    from scipy import ndimage

    return int(ndimage.label(m == v)[1])


def mosaic_stats(
    image_map: Int[ArrayLike, "b h w"],
    weight: Float[ArrayLike, "b h w"] | None = None,
    *,
    min_weight: float = MOSAIC_MIN_WEIGHT,
) -> dict[str, np.ndarray]:
    """Mosaic statistics of source-image maps (e.g. ``Provenance.image[-1]``).

    With ``weight`` (e.g. ``Provenance.weight[-1]``) only *attributed* pixels count: those whose
    heaviest patch carries at least ``min_weight`` (default 1/2: one patch holds the majority). The
    others (e.g. MNIST's background, spread over thousands of identical patches, whose argmax is
    decided by float32 rounding) have no meaningful source.

    Returns:
        dict of ``[B]`` arrays: ``sources`` (distinct training images the attributed pixels draw
        from), ``regions`` (4-connected components of attributed pixels with the same source image),
        ``region_size`` (attributed pixels per region; 0 without any) and ``attributed`` (their fraction).

    Example:
        >>> import numpy as np
        >>> m = np.array([[[0, 0, 1], [0, 2, 1], [0, 0, 0]]])
        >>> {k: v.tolist() for k, v in mosaic_stats(m).items()}
        {'sources': [3], 'regions': [3], 'region_size': [3.0], 'attributed': [1.0]}
    """
    m = np.asarray(image_map)
    if m.ndim != 3 or not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"image_map: expected an integer [B, H, W] map of image indices, got {m.dtype} {m.shape}")
    ok = np.ones(m.shape, bool)
    if weight is not None:
        w = np.asarray(weight)
        if w.shape != m.shape:
            raise ValueError(f"weight: expected the map's shape {m.shape}, got {w.shape}")
        ok = w >= float(min_weight)
    m = np.where(ok, m, -1)
    sources = np.array([len(np.unique(x[x >= 0])) for x in m])
    regions = np.array([sum(_count(x, v) for v in np.unique(x[x >= 0])) for x in m])
    n_ok = ok.sum(axis=(1, 2))
    return {
        "sources": sources, "regions": regions,
        "region_size": np.where(regions > 0, n_ok / np.maximum(regions, 1), 0.0),
        "attributed": n_ok / (m.shape[1] * m.shape[2]),
    }


def creativity(
    samples: Float[ArrayLike, "b h w c"],
    images: Float[ArrayLike, "n h w c"],
    *,
    patch_size: int = 3,
    padding: str = "zeros",
    tolerance: float = CONSISTENCY_TOLERANCE,
    provenance: Provenance | None = None,
    step: int = -1,
) -> dict[str, np.ndarray]:
    """All creativity measures of a batch of samples against a training set, per sample.

    - ``nn_rms``, ``nn_ratio``, ``near_copy``, ``nearest``: :func:`nearest_images` (near-copy:
      nearest/second-nearest ratio below :data:`COPY_RATIO`).
    - ``patch_rms``: :func:`patch_distance` at ``patch_size``.
    - ``consistency``: :func:`consistency` against the ELS machine of ``images`` with ``padding``
      (``"zeros"``: bbELS banks at the borders) at ``patch_size``, within ``tolerance``.
    - with ``provenance``: ``sources``, ``regions``, ``region_size``, ``attributed``
      (:func:`mosaic_stats` of ``provenance.image[step]`` over the pixels whose heaviest patch
      holds at least :data:`MOSAIC_MIN_WEIGHT`), ``weight`` and ``entropy`` (pixel means at that step).

    Example:
        >>> import numpy as np
        >>> imgs = np.stack([np.full((6, 6, 1), v, np.float32) for v in (-0.8, 0.0, 0.8)])
        >>> r = creativity(imgs[2:], imgs)                  # a training image
        >>> r["near_copy"].tolist(), r["consistency"].tolist()
        ([True], [1.0])
    """
    from ellsjax.machines.patch import els

    _checks.check_padding(padding)
    nn = nearest_images(samples, images)
    out = {
        "nearest": nn["nearest"], "nn_rms": nn["rms"], "nn_ratio": nn["ratio"], "near_copy": nn["near_copy"],
        "patch_rms": patch_distance(samples, images, patch_size=patch_size),
        "consistency": consistency(samples, els(images, padding=padding), scale=patch_size, tolerance=tolerance),
    }
    if provenance is not None:
        if provenance.image.shape[1] != out["nn_rms"].shape[0]:
            raise ValueError(f"provenance: has {provenance.image.shape[1]} samples, samples has {out['nn_rms'].shape[0]}")
        out.update(mosaic_stats(np.asarray(provenance.image[step]), np.asarray(provenance.weight[step])))
        out["weight"] = np.asarray(provenance.weight[step]).mean(axis=(1, 2))
        out["entropy"] = np.asarray(provenance.entropy[step]).mean(axis=(1, 2))
    return out


#: Columns of :func:`format_table` (mean over samples; ``near_copy`` is the fraction of samples).
TABLE_COLUMNS = ("nn_rms", "nn_ratio", "near_copy", "patch_rms", "consistency", "sources", "region_size",
                 "attributed", "weight", "entropy")


def compare(
    machines: Mapping[str, Denoiser],
    x_start: Float[ArrayLike, "b h w c"],
    ts: TimeGrid,
    *,
    scales: Sequence[int] | None = None,
    images: Float[ArrayLike, "n h w c"] | None = None,
    label: Any = None,
    patch_size: int = 3,
    padding: str = "zeros",
) -> dict[str, dict[str, float]]:
    """Sample every machine from the same noise (with provenance) and summarize its creativity.

    Args:
        machines: ``name → machine`` (e.g. ``{"is": ideal(imgs), "bbels": bbels(imgs)}``).
        x_start: the shared starting noise.
        ts: the shared time grid.
        scales: per-step patch sizes for the patch machines (ignored by IS).
        images: the training set of the measures (default: the first machine's).
        label: class id(s) for conditional machines.
        patch_size, padding: of :func:`creativity`'s patch measures.

    Returns:
        ``name → {measure: mean over samples}`` (the columns :data:`TABLE_COLUMNS`).

    Example:
        >>> import jax.numpy as jnp, ellsjax as ej
        >>> imgs = jnp.stack([jnp.full((6, 6, 1), v) for v in (-0.8, 0.0, 0.8)])
        >>> ms = {"is": ej.machines.ideal(imgs), "els": ej.machines.els(imgs)}
        >>> t = compare(ms, jnp.full((1, 6, 6, 1), 0.75), [0.05, 0.0], scales=[3])
        >>> sorted(t), t["is"]["sources"], t["els"]["near_copy"]     # both copy image 2 here
        (['els', 'is'], 1.0, 1.0)
    """
    if not machines:
        raise ValueError("machines: need at least one machine")
    table = {}
    for name, m in machines.items():
        sc = scales if m.needs_scale else None
        prov = provenance(m, x_start, ts, scales=sc, label=label)
        imgs = images if images is not None else next(iter(machines.values())).images
        res = creativity(np.asarray(prov.samples), imgs, patch_size=patch_size, padding=padding, provenance=prov)
        table[name] = {c: float(np.mean(res[c])) for c in TABLE_COLUMNS}
    return table


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width text table of :func:`compare`'s result, one row per machine."""
    cols = [c for c in TABLE_COLUMNS if any(c in row for row in table.values())]
    width = max([7, *(len(n) for n in table)])
    lines = [f"{'machine':<{width}}  " + "  ".join(f"{c:>11}" for c in cols)]
    for name, row in table.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row.get(c, float('nan')):>11.4g}" for c in cols))
    return "\n".join(lines)


# -- figures -------------------------------------------------------------------------------------------------


def _crop(img: np.ndarray, r: int, c: int, k: int) -> np.ndarray:
    """The ``k×k`` window of ``img`` ``[H, W, C]`` centered at ``(r, c)``, zero outside."""
    h, w, ch = img.shape
    pad = np.pad(img, ((k, k), (k, k), (0, 0)))
    return pad[r - k // 2 + k : r - k // 2 + 2 * k, c - k // 2 + k : c - k // 2 + 2 * k]


def _gray(x: np.ndarray) -> np.ndarray:
    x = np.clip((np.asarray(x, np.float32) + 1) / 2, 0, 1)
    return x[..., 0] if x.shape[-1] == 1 else x


def plot_provenance(
    prov: Provenance,
    images: Float[ArrayLike, "n h w c"],
    path: str | os.PathLike,
    *,
    step: int = -1,
    max_samples: int = 4,
    top: int = 4,
    patch_size: int | None = None,
) -> Path:
    """Render provenance as a PNG: per sample (rows) the sample, its source map (pixels colored by
    the training image of their heaviest patch at ``step``), the max-weight and entropy maps, and
    the ``top`` most used source images' patches cropped from their training images (the
    ``patch_size`` window, default the step's scale, boxed in a ``max(3k, 9)`` context crop around
    the source center of the pixel drawn from that image with the largest weight; IS: the whole image). Pixels whose heaviest patch
    holds less than :data:`MOSAIC_MIN_WEIGHT` are gray in the source map and not ranked.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    imgs = np.asarray(images, np.float32)
    nsteps = prov.image.shape[0]
    if not -nsteps <= step < nsteps:
        raise ValueError(f"step: must index one of the {nsteps} steps, got {step}")
    max_samples = _checks.check_positive_int(max_samples, "max_samples")
    top = _checks.check_positive_int(top, "top")
    k = patch_size if patch_size is not None else prov.scales[step]
    samples = np.asarray(prov.samples)[:max_samples]
    image = np.asarray(prov.image[step])[: len(samples)]
    row, col = np.asarray(prov.row[step]), np.asarray(prov.col[step])
    weight, ent = np.asarray(prov.weight[step]), np.asarray(prov.entropy[step])
    palette = plt.get_cmap("tab10").colors
    ncols = 4 + top
    fig, axes = plt.subplots(len(samples), ncols, figsize=(1.6 * ncols, 1.7 * len(samples)), squeeze=False)
    for b in range(len(samples)):
        ok = weight[b] >= MOSAIC_MIN_WEIGHT
        ids, counts = np.unique(image[b][ok], return_counts=True)
        ranked = ids[np.argsort(-counts, kind="stable")]
        color = {int(v): palette[i % len(palette)] for i, v in enumerate(ranked)}
        rgb = np.array([[color[int(v)] if o else (0.85, 0.85, 0.85) for v, o in zip(line, oks, strict=True)]
                        for line, oks in zip(image[b], ok, strict=True)])
        ax = axes[b]
        ax[0].imshow(_gray(samples[b]), cmap="gray", vmin=0, vmax=1)
        ax[1].imshow(rgb)
        ax[2].imshow(weight[b], cmap="viridis", vmin=0, vmax=1)
        ax[3].imshow(ent[b], cmap="magma")
        if b == 0:
            for a, title in zip(ax[:4], ("sample", "source image", "max weight", "entropy (nats)"), strict=True):
                a.set_title(title, fontsize=8)
        ax[1].set_xlabel(f"{len(ids)} sources (gray: w < {MOSAIC_MIN_WEIGHT:g})", fontsize=6)
        for j in range(top):
            a = ax[4 + j]
            if j < len(ranked):
                src = int(ranked[j])
                sel = np.where(image[b] == src, weight[b], -1.0)
                r0, c0 = np.unravel_index(np.argmax(sel), sel.shape)
                if k is None:
                    a.imshow(_gray(imgs[src]), cmap="gray", vmin=0, vmax=1)
                else:  # the patch (boxed) in some context: a window of 3k (at least 9) pixels
                    ctx = max(3 * int(k), 9)
                    a.imshow(_gray(_crop(imgs[src], int(row[b, r0, c0]), int(col[b, r0, c0]), ctx)), cmap="gray",
                             vmin=0, vmax=1)
                    lo = ctx // 2 - int(k) // 2 - 0.5
                    a.add_patch(Rectangle((lo, lo), int(k), int(k), fill=False, edgecolor=color[src], linewidth=1.5))
                a.set_title(f"#{src} ({int(row[b, r0, c0])},{int(col[b, r0, c0])})", fontsize=7, color=color[src])
                for spine in a.spines.values():
                    spine.set_edgecolor(color[src])
                    spine.set_linewidth(2.5)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    t = float(prov.ts[step % nsteps])
    fig.suptitle(f"provenance at t = {t:.3g} (step {step % nsteps + 1}/{nsteps}, patch {k if k else 'image'})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

