r"""Patch Set Posterior Composite with square patches (PSPC-Square; Niedoba et al., ICML 2025).

For a patch size ``k``, every ``k×k`` window ``C`` that fits inside the image (fixed position, no
padding, ``(H−k+1)(W−k+1)`` windows) gets the exact posterior mean of the training images cropped to
that window (Niedoba et al., eqs. 9–10), and each pixel averages the means of all windows that
contain it (eq. 11):

.. math::

    \hat x_0 = \Big(\sum_{C} C^\top C\Big)^{-1} \sum_{C} C^\top
        \sum_j \mathrm{softmax}_j\Big(-\frac{\|C x_t - a\,C\phi_j\|^2}{2 s^2}\Big)\, C\phi_j .

Unlike ELS the windows are not shared across positions (not translation equivariant), and unlike
LS a window's mean is the whole patch, not only its center. With ``k = H = W`` there is one window:
PSPC is the ideal score machine. Windows are anchored at their top-left corner, so any size
``1 ≤ k ≤ min(H, W)`` works, even ones (the published CIFAR-10 schedule uses 32 and 23).

Implementation: position groups are the windows; the queries of a group are that window of every
``x_t`` (the batch, or one query per image with labels), its bank the same window of each training
image (values: the window itself). One :func:`ellsjax.kernel.streaming_softmax` pass over the
training set, streamed in chunks of images, serves all windows; the window means are folded back
onto pixels and divided by the per-pixel window count.

The authors' CIFAR-10 per-step patch sizes, for the 18-step EDM grid
(``ej.edm.karras_sigmas(18)``), are :data:`PSPC_CIFAR10_SCALES`; their release also adds the
horizontally flipped training images (``jnp.concatenate([x, x[:, :, ::-1]])``).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Int

from ellsjax import kernel as _kernel
from ellsjax import presets as _presets
from ellsjax import schedules as _schedules
from ellsjax.machines import _registry
from ellsjax.machines.base import Machine, TrainingImages, build, register

__all__ = ["PatchSetPosteriorComposite", "pspc", "PSPC_CIFAR10_SCALES"]

#: PSPC-Square patch sizes for 32×32 CIFAR-10 over the 18 steps of the EDM grid
#: ``ej.edm.karras_sigmas(18)`` (σ from 80 to 0.002), step ``i`` at ``σ_i`` (Niedoba et al., ICML 2025,
#: appendix B; github.com/plai-group/pspc ``CIFAR_PATCH_SCHEDULE``; :mod:`ellsjax.presets`).
PSPC_CIFAR10_SCALES: tuple[int, ...] = _presets.PSPC_CIFAR10_SCALES


@functools.lru_cache(maxsize=256)
def _square_windows(h: int, w: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``[G, k·k]`` flat pixel index of every ``k×k`` window inside an ``h×w`` image (rows of
    top-left corners, then columns), and ``[h·w]`` the number of windows covering each pixel."""
    r0 = np.arange(h - k + 1)[:, None, None, None]
    c0 = np.arange(w - k + 1)[None, :, None, None]
    i = np.arange(k)[None, None, :, None]
    j = np.arange(k)[None, None, None, :]
    idx = ((r0 + i) * w + (c0 + j)).reshape(-1, k * k).astype(np.int32)
    count = np.bincount(idx.ravel(), minlength=h * w).astype(np.float32)
    return idx, count


@dataclasses.dataclass(frozen=True, eq=False)
class PatchSetPosteriorComposite(Machine):
    """PSPC-Square. Build with :func:`pspc`; ``scale`` is the window side ``k`` (any int in
    ``[1, min(H, W)]``)."""

    scale_kind: ClassVar[str] = "side"

    def check_scale(self, scale: Any) -> int:
        if scale is None:
            raise ValueError("scale: PSPC needs a patch size (an int window side, 1 <= k <= image size)")
        if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Integral):
            raise TypeError(f"scale: expected an int patch size, got {scale!r}")
        k = int(scale)
        h, w, _ = self.image_shape
        if not 1 <= k <= min(h, w):
            raise ValueError(f"scale: PSPC windows must fit in the {h}x{w} image: need 1 <= k <= {min(h, w)}, got {k}")
        return k

    def _denoise(self, x_t, t, label, scale):
        b, h, w, ch = x_t.shape
        idx, count = _square_windows(h, w, scale)
        g, kk = idx.shape
        d = kk * ch
        ab, var = self.schedule.variances(t)
        a, inv_temp = jnp.sqrt(ab), 0.5 / var  # inv_temp = +inf at s = 0: nearest-patch limit
        cond = label is not None
        q = x_t.reshape(b, h * w, ch)[:, idx].reshape(b, g, d)
        if cond:  # every image its own (class) bank: leading dims (B, G), one query each
            queries = _kernel.Queries(
                q[:, :, None], jnp.broadcast_to(a[:, None, None], (b, g, 1)),
                jnp.broadcast_to(inv_temp[:, None, None], (b, g, 1)),
            )
            bytes_per_image = 4 * b * g * (2 * d + 4)
        else:  # one bank for the batch: leading dim (G,), the batch as queries
            queries = _kernel.Queries(
                q.transpose(1, 0, 2), jnp.broadcast_to(a[None], (g, b)), jnp.broadcast_to(inv_temp[None], (g, b))
            )
            bytes_per_image = 4 * g * (2 * d + 2 * b + 2)
        members, valid, nchunks, c = self._chunking(label, bytes_per_image)

        def bank_fn(i):
            imgs, ok = self._chunk(members, valid, c, i)  # [Gb, c, H, W, C], [Gb, c]
            gb = imgs.shape[0]
            win = imgs.reshape(gb, c, h * w, ch)[:, :, idx].reshape(gb, c, g, d).transpose(0, 2, 1, 3)
            present = jnp.broadcast_to(ok[:, None, :], (gb, g, c))
            if not cond:
                win, present = win[0], present[0]
            return _kernel.make_bank(win, win, present)

        means, _ = _kernel.streaming_softmax(queries, bank_fn, nchunks)
        means = means[:, :, 0] if cond else means.transpose(1, 0, 2)  # [B, G, d]
        total = jnp.zeros((b, h * w, ch), jnp.float32).at[:, idx.reshape(-1)].add(means.reshape(b, g * kk, ch))
        return (total / count[None, :, None]).reshape(b, h, w, ch)


register(PatchSetPosteriorComposite)


def pspc(
    images: TrainingImages,
    labels: Int[ArrayLike, " n"] | None = None,
    *,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    platform: str | None = None,
) -> PatchSetPosteriorComposite:
    """The PSPC-Square machine (Niedoba et al., ICML 2025, eq. 11 with square patch sets).

    ``denoise(x_t, t, scale=k)``: every ``k×k`` window inside the image gets the posterior mean of
    the training images cropped to it; pixels average the windows that cover them.

    Args:
        images: ``[N, H, W, C]`` float training images in ``[-1, 1]``.
        labels: optional ``[N]`` int class ids; then ``denoise(..., label=y)`` searches class ``y`` only.
        schedule: noise schedule (object or name).
        image_range: the documented pixel range the training images are checked against
            (``None``: any real data, e.g. samples of a Gaussian).
        chunk_size: training images per streamed chunk (``None``: from ``memory_budget``).
        memory_budget: bytes of temporaries per chunk (``None``: a per-backend default).
        platform: whose budgets apply, ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``None``: the platform of the
            devices the images live on).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
        >>> m = ej.machines.pspc(imgs)
        >>> m.denoise(imgs[:2], 0.5, scale=4).shape       # even window sizes are fine
        (2, 8, 8, 1)
    """
    return build(
        PatchSetPosteriorComposite, images, labels, schedule=schedule, image_range=image_range, chunk_size=chunk_size,
        memory_budget=memory_budget, platform=platform,
    )


def _published(dataset: str, image_shape: tuple[int, int, int], schedule: Any):
    """PSPC's published schedule: 18 steps on the EDM grid for 32×32 CIFAR-10 (DDIM over the same
    noise levels is Euler's method for that ODE)."""
    from ellsjax import edm
    from ellsjax.scales import ScaleSchedule

    if dataset != "cifar10" or tuple(image_shape[:2]) != (32, 32):
        raise ValueError("PSPC's published scale schedule is for 32x32 CIFAR-10 only; pass --scales")
    ts = edm.karras_times(len(PSPC_CIFAR10_SCALES), schedule)
    return ScaleSchedule(tuple(ts), PSPC_CIFAR10_SCALES, "size",
                         source="PSPC_CIFAR10 (Niedoba et al. 2025, EDM grid of 18 steps)")


_registry.register(_registry.MachineSpec(
    name="pspc", builder=pspc, machine=PatchSetPosteriorComposite, calibration="grid", default_scales=_published,
    summary="PSPC-Square: posterior means of every k×k window inside the image, averaged per pixel",
    reference="Niedoba et al., ICML 2025",
))
