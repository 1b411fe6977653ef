r"""A local posterior mixed with a whole-image one: the ELS machine plus a per-step global part.

The ELS machine is local by construction: each output pixel sees one ``k×k`` window. A network with
self-attention can also coordinate distant parts of the image (Kamb & Ganguli, Sec. 6: a UNet with
self-attention is only moderately predicted by ELS). The simplest correction keeps the local
posterior and lets a whole-image posterior carry a weight ``w(t)`` per step,

.. math::

    \hat x_0(x_t, t) = \big(1 - w\big)\,\hat x_0^{\mathrm{local}}(x_t, t; k)
                       + w\,\hat x_0^{\mathrm{global}}(x_t, t),

with the local part an ELS/bbELS machine (or its soft-window twin) at its per-step scale ``k`` and
the global part a denoiser without a scale: the ideal score (the training set's posterior, which
memorizes) or the Wiener filter (the Gaussian posterior of the whole image). ``w = 0`` is the local
machine, ``w = 1`` the global one. The per-step ``scale`` is the pair ``(k, w)``; ``w`` is an array
argument of the compiled call (one program per local scale, differentiable in ``w``), and
:func:`ellsjax.calibration.calibrate_mixture` learns the weights from gradients along a network's
trajectories (this is not in the paper: it is ellsjax's test of what the local theory misses).

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.mixture(ej.machines.els(imgs), ej.machines.ideal(imgs))
    >>> x = imgs[:2] * 0.5
    >>> local = ej.machines.els(imgs).denoise(x, 0.5, scale=3)
    >>> float(abs(m.denoise(x, 0.5, scale=(3, 0.0)) - local).max()) < 1e-6
    True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax.denoiser import Denoiser, _join
from ellsjax.machines import _export

__all__ = ["LocalGlobalMixture", "mixture"]


@dataclasses.dataclass(frozen=True)
class LocalGlobalMixture(Denoiser):
    """``(1 − w)·x̂0_local(k) + w·x̂0_global`` with the per-step scale ``(k, w)`` (final).

    Build with :func:`mixture`. The local and global denoisers share the image shape, the noise
    schedule and conditioning; labels go to both.

    Attributes:
        local: a denoiser with a locality scale (ELS, bbELS, LS, or a soft-window machine).
        global_: a denoiser without one (the ideal score, the Wiener filter, …).
    """

    local: Denoiser
    global_: Denoiser

    scale_kind: ClassVar[str] = "mixture"

    def __post_init__(self):
        if not isinstance(self.local, Denoiser) or not self.local.needs_scale:
            raise TypeError(f"local: expected a denoiser with a locality scale (e.g. ej.machines.bbels), got "
                            f"{type(self.local).__name__}")
        if not isinstance(self.global_, Denoiser) or self.global_.needs_scale:
            raise TypeError(f"global_: expected a denoiser without a scale (ej.machines.ideal or wiener), got "
                            f"{type(self.global_).__name__}")
        if self.local.image_shape != self.global_.image_shape:
            raise ValueError(f"global_: its images are {self.global_.image_shape}, the local machine's "
                             f"{self.local.image_shape}")
        if self.local.schedule != self.global_.schedule:
            raise ValueError("global_: its noise schedule differs from the local machine's; build both with the "
                             "same schedule")
        if self.local.conditional != self.global_.conditional:
            raise ValueError(f"global_: conditional={self.global_.conditional} but the local machine has "
                             f"conditional={self.local.conditional}")

    schedule = property(lambda self: self.local.schedule, doc="The (shared) noise schedule.")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.local.image_shape

    @property
    def conditional(self) -> bool:
        return self.local.conditional

    def check_label(self, label) -> None:
        self.local.check_label(label)
        self.global_.check_label(label)

    def _label_ok(self, label):
        ok = self.local._label_ok(label)
        other = self.global_._label_ok(label)
        return ok if other is None else other if ok is None else ok & other

    def check_scale(self, scale: Any) -> tuple[Any, Any]:
        """``(k, w)``: ``k`` a scale of the local machine (its own check), ``w`` the global part's
        weight, a float in ``[0, 1]`` (or a 0-d float array, checked when the program runs if traced)."""
        if not isinstance(scale, (tuple, list)) or len(scale) != 2:
            raise TypeError(f"scale: a mixture's scale is the pair (local scale, weight w in [0, 1]), got {scale!r}")
        k, w = scale
        k = self.local.check_scale(k)
        if isinstance(w, jax.Array):
            if w.ndim != 0 or not jnp.issubdtype(w.dtype, jnp.floating):
                raise TypeError(f"scale: the weight w must be a float or a 0-d float array, got {w.dtype}{list(w.shape)}")
            if _checks.is_concrete(w):
                w = float(w)
            else:
                bad = ~(jnp.isfinite(w) & (w >= 0) & (w <= 1))
                return k, _checks.runtime_check(w, bad, _checks.fail("scale: the weight w must lie in [0, 1]"))
        if isinstance(w, (bool, jnp.bool_)) or not isinstance(w, numbers.Real):
            raise TypeError(f"scale: the weight w must be a float in [0, 1], got {w!r}")
        if not (math.isfinite(float(w)) and 0.0 <= float(w) <= 1.0):
            raise ValueError(f"scale: the weight w must lie in [0, 1], got {w!r}")
        return k, float(w)

    def _split_scale(self, scale):
        """(the local machine's static part, (its traced part, ``w``)): one program per local scale."""
        k, w = scale
        static, traced = self.local._split_scale(k)
        return static, (traced, jnp.asarray(w, jnp.float32))

    def prepare(self, scales: Any = (None,), *, conditional: bool = False) -> LocalGlobalMixture:
        """Prepare the local machine for the local parts of ``scales`` (and the global one)."""
        local = [self.check_scale(s)[0] for s in scales if s is not None] or [None]
        return dataclasses.replace(self, local=self.local.prepare(tuple(local), conditional=conditional),
                                   global_=self.global_.prepare((None,), conditional=conditional))

    def _ready(self, scale: Any, label: Any) -> LocalGlobalMixture:
        return dataclasses.replace(self, local=self.local._ready(scale[0], label),
                                   global_=self.global_._ready(None, label))

    def _denoise(self, x_t, t, label, scale):
        first, second = scale
        if isinstance(second, tuple):  # the compiled call's (static, (traced, w))
            traced, w = second
            k = _join(first, traced)
        else:  # a checked (k, w), as the samplers pass it
            k, w = first, second
        return self.denoise_weight(x_t, t, label, w, local_scale=k)

    def denoise_weight(
        self, x_t: Float[ArrayLike, "b h w c"], t: Float[ArrayLike, "*b"], label: Int[Array, " b"] | None,
        weight: Float[ArrayLike, ""], *, local_scale: Any,
    ) -> Float[Array, "b h w c"]:
        """Pure ``x̂0`` at weight ``weight`` (a float or a traced scalar: differentiable) and the local
        machine's (checked) scale ``local_scale``; unchecked, as ``_denoise`` is."""
        x_t = jnp.asarray(x_t, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
        w = jnp.asarray(weight, jnp.float32)
        local = self.local._denoise(x_t, t, label, local_scale)
        glob = self.global_._denoise(x_t, t, label, None)
        return local + w * (glob - local)


def _register():
    jax.tree_util.register_dataclass(LocalGlobalMixture, data_fields=["local", "global_"], meta_fields=[])
    LocalGlobalMixture.__repr__ = _export.short_repr
    _export.register_serialization(LocalGlobalMixture, [])


_register()


def mixture(local: Denoiser, global_: Denoiser) -> LocalGlobalMixture:
    """The local machine ``local`` mixed with the whole-image denoiser ``global_``, per step:
    ``x̂0 = (1 − w)·x̂0_local(k) + w·x̂0_global`` with the scale ``(k, w)``.

    Args:
        local: ELS, bbELS, LS or a soft-window machine.
        global_: a denoiser without a scale built on the same images and schedule
            (:func:`~ellsjax.machines.ideal`, :func:`~ellsjax.machines.wiener`).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
        >>> m = mixture(ej.machines.bbels(imgs), ej.machines.wiener(imgs))
        >>> m.denoise(imgs[:1], 0.5, scale=(3, 0.25)).shape
        (1, 8, 8, 1)
    """
    return LocalGlobalMixture(local, global_)
