r"""The ideal score machine (IS): the exact score of the empirical training distribution.

.. math::

    \hat x_0 = \sum_j \mathrm{softmax}_j\Big(-\frac{\|x_t - a\,\phi_j\|^2}{2 s^2}\Big)\, \phi_j

over whole training images ``φ_j`` (Kamb & Ganguli, arXiv 2412.20292, eq. 5). Sampling with it
only reproduces training images: it memorizes.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Int

from ellsjax import kernel as _kernel
from ellsjax import schedules as _schedules
from ellsjax.machines import _registry
from ellsjax.machines.base import BankMachine, PixelProvenance, TrainingImages, bank_key, build, register

__all__ = ["IdealScore", "ideal"]


@dataclasses.dataclass(frozen=True, eq=False)
class IdealScore(BankMachine):
    """The ideal score machine. Build with :func:`ideal`. It has no scale (``scale`` must be ``None``)."""

    supports_provenance: ClassVar[bool] = True

    def _bank_layout(self, scale):
        h, w, _ = self.image_shape
        return {"image": (np.arange(h * w, dtype=np.int32)[None, None], None)}

    @staticmethod
    def _queries(x_t, t, label, schedule):
        b = x_t.shape[0]
        ab, var = schedule.variances(t)
        a, inv_temp = jnp.sqrt(ab), 0.5 / var
        q = x_t.reshape(b, -1)
        if label is None:  # one bank for the batch: leading dims (G=1,)
            return _kernel.Queries(q[None], a[None], inv_temp[None])
        return _kernel.Queries(q[:, None, None], a[:, None, None], inv_temp[:, None, None])  # (B, G=1)

    def _denoise_bounded(self, x_t, t, label, scale):
        b, h, w, ch = x_t.shape
        d = h * w * ch
        queries = self._queries(x_t, t, label, self.schedule)
        prepared = self.banks.get(bank_key(None, label is not None))
        if prepared is not None:
            mean, bound = self._run_bank(queries, prepared["image"], label, 1)
            return mean.reshape(b, h, w, ch), jnp.broadcast_to(bound.reshape(b, 1, 1), (b, h, w))
        per_image = 4 * (3 * d + 2 * b + 2)
        members, valid, nchunks, c = self._chunking(label, per_image)

        def bank_fn(i):
            imgs, ok = self._chunk(members, valid, c, i)
            flat = imgs.reshape(imgs.shape[0], c, d)
            if label is not None:
                flat, ok = flat[:, None], ok[:, None]
            return _kernel.make_bank(flat, flat, ok)

        mean, _ = _kernel.streaming_softmax(queries, bank_fn, nchunks)
        return mean.reshape(b, h, w, ch), jnp.zeros((b, h, w), mean.dtype)

    def _denoise_provenance(self, x_t, t, label, scale):
        # The images streamed one chunk at a time (no deduplicated bank), each entry named by its
        # image index; every pixel of x̂0 comes from the same pixel of the weighted images.
        b, h, w, ch = x_t.shape
        d = h * w * ch
        queries = self._queries(x_t, t, label, self.schedule)
        members, valid, nchunks, c = self._chunking(label, 4 * (3 * d + 4 * b + 2))

        def bank_fn(i):
            imgs, ok = self._chunk(members, valid, c, i)
            ids = jax.lax.dynamic_slice_in_dim(members, i * c, c, axis=1)
            flat = imgs.reshape(imgs.shape[0], c, d)
            if label is not None:
                flat, ok, ids = flat[:, None], ok[:, None], ids[:, None]
            return _kernel.make_bank(flat, flat, ok), ids

        mean, stats = _kernel.streaming_softmax(queries, bank_fn, nchunks, provenance=True)
        p = _kernel.summarize_provenance(stats, queries.inv_temp)
        per_pixel = lambda v: jnp.broadcast_to(v.reshape(b, 1, 1), (b, h, w))  # noqa: E731
        rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32)[None, :, None], (b, h, w))
        cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32)[None, None, :], (b, h, w))
        prov = PixelProvenance(per_pixel(p.ids), rows, cols, per_pixel(p.weight), per_pixel(p.entropy))
        return mean.reshape(b, h, w, ch), prov


register(IdealScore)


def ideal(
    images: TrainingImages,
    labels: Int[ArrayLike, " n"] | None = None,
    *,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    bank_budget: int | None = None,
    platform: str | None = None,
) -> IdealScore:
    """The ideal score machine (IS): posterior mean over whole training images.

    Args:
        images: ``[N, H, W, C]`` float training images in ``[-1, 1]``.
        labels: optional ``[N]`` int class ids for conditional denoising.
        schedule: noise schedule (object or name).
        image_range: the documented pixel range the training images are checked against
            (``None``: any real data, e.g. samples of a Gaussian).
        chunk_size: training images per streamed chunk (``None``: from ``memory_budget``).
        memory_budget: bytes of temporaries per chunk (``None``: a per-backend default).
        bank_budget: bytes the prebuilt, deduplicated image bank may take (``None``: default).
        platform: whose budgets apply, ``"cpu"``, ``"gpu"`` or ``"tpu"`` (``None``: the platform of the
            devices the images live on).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
        >>> x0 = ej.machines.ideal(imgs).denoise(imgs[:2], 0.01)
        >>> bool(abs(x0 - imgs[:2]).max() < 1e-3)   # low noise: the nearest training image
        True
    """
    return build(
        IdealScore, images, labels, schedule=schedule, image_range=image_range, chunk_size=chunk_size, memory_budget=memory_budget,
        bank_budget=bank_budget, platform=platform,
    )


_registry.register(_registry.MachineSpec(
    name="is", builder=ideal, machine=IdealScore,
    summary="ideal score: the exact posterior over whole training images (memorizes)",
    reference="Kamb & Ganguli, arXiv 2412.20292, eq. 5",
))
