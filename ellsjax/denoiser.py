r"""The denoiser interface: what every analytic machine and every trained network implements.

A :class:`Denoiser` maps a noisy batch ``x_t = a·x0 + s·ε`` at time ``t`` to the posterior-mean
estimate ``x̂0 = E[x0 | x_t]``; the score and the noise prediction follow from it,

.. math::

    \nabla \log p_t(x_t) = \frac{a\,\hat x_0 - x_t}{s^2}, \qquad
    \hat\varepsilon(x_t) = \frac{x_t - a\,\hat x_0}{s},

with ``a = sqrt(ᾱ(t))``, ``s = sqrt(1 − ᾱ(t))`` from the denoiser's noise :attr:`~Denoiser.schedule`.

Contract (what samplers, calibration and evaluation rely on):

* ``denoise`` / ``score`` / ``eps`` check their arguments and run a cached ``jax.jit``; the value
  checks (times in ``[0, 1]``, finite ``x_t``, labels of classes it knows, a noise level for
  ``score``/``eps``) hold inside a user's ``jax.jit`` too, with the same messages
  (:func:`ellsjax._checks.runtime_check`);
* ``_denoise(x_t, t, label, scale)`` is the pure, unchecked function the samplers call inside their
  own jitted programs (``t`` and ``label`` already per-example arrays, ``scale`` static);
* ``image_shape`` ``(H, W, C)``, ``conditional`` (labels required / accepted) and ``scale_kind``
  (what the per-step locality ``scale`` is: :data:`SCALE_KINDS`) describe it;
* ``prepare(scales)`` returns an equivalent denoiser ready to run at those scales (machines build
  their patch banks there); the default has nothing to prepare;
* it is a pytree (arrays as leaves, the rest static), so it can be passed to ``jax.jit``.

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.els(imgs)
    >>> isinstance(m, ej.Denoiser), m.scale_kind, m.image_shape
    (True, 'size', (8, 8, 1))
"""

from __future__ import annotations

import abc
import math
import numbers
from functools import partial
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ellsjax import _checks
from ellsjax import schedules as _schedules

__all__ = ["Denoiser", "ScaleKind", "SCALE_KINDS", "check_scale_value", "scale_for", "runtime_checks"]

#: Switch the value checks of traced arguments on or off while tracing (a context manager; e.g.
#: off for ``jax.export``, which cannot serialize their host callback): :func:`ellsjax._checks.runtime_checks`.
runtime_checks = _checks.runtime_checks

#: What a denoiser's per-step locality ``scale`` is:
#:
#: * ``"size"``: an odd patch size ``k`` (ELS, bbELS, LS; the paper's scale);
#: * ``"side"``: any positive int window side (PSPC-Square's ``k×k`` windows, even sides too);
#: * ``"width"``: a positive float window width ``ℓ`` in pixels (the soft-window machines);
#: * ``"mixture"``: a pair ``(k, w)``, the local machine's scale and the global part's weight
#:   ``w ∈ [0, 1]`` (:class:`ellsjax.machines.LocalGlobalMixture`);
#: * ``"none"``: no scale (IS, Wiener, PCA-locality, σ-CFDM, trained networks).
ScaleKind = Literal["size", "side", "width", "mixture", "none"]
#: :data:`ScaleKind`'s members as a tuple.
SCALE_KINDS: tuple[str, ...] = ("size", "side", "width", "mixture", "none")

_DESCRIBE = {
    "size": "a positive odd int patch size",
    "side": "a positive int window side",
    "width": "a positive float window width ℓ (pixels)",
    "mixture": "a pair (local scale, weight w in [0, 1])",
    "none": "no scale",
}


def check_scale_value(kind: ScaleKind, value: Any, name: str = "scale") -> int | float | None:
    """Check one scale against its kind (not against an image size: that is the denoiser's
    :meth:`Denoiser.check_scale`). Returns it as a Python int/float (``None`` for kind ``"none"``).

    ``"none"`` accepts only ``None``: a denoiser without a scale refuses one rather than ignore it
    (a comparison passing one schedule to several denoisers gives each :func:`scale_for` it).

    Example:
        >>> check_scale_value("size", 5), check_scale_value("width", 1.5), check_scale_value("none", None)
        (5, 1.5, None)
        >>> check_scale_value("none", 3)
        Traceback (most recent call last):
        ...
        ValueError: scale: this denoiser has no scale; pass scale=None (got 3)
    """
    if kind == "none":
        if value is not None:
            raise ValueError(f"{name}: this denoiser has no scale; pass {name}=None (got {value!r})")
        return None
    if value is None:
        raise ValueError(f"{name}: this denoiser needs a scale: {_DESCRIBE[kind]}")
    if kind == "size":
        return _checks.check_scale(value, name)
    if kind == "mixture":  # the pair's shape and weight; the local scale is its machine's to check
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"{name}: expected {_DESCRIBE[kind]}, got {value!r}")
        w = value[1]
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Real) or not (0.0 <= float(w) <= 1.0):
            raise ValueError(f"{name}: the weight w must be a float in [0, 1], got {w!r}")
        return (value[0], float(w))
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected {_DESCRIBE[kind]}, got {value!r}")
    if kind == "width":
        if not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected {_DESCRIBE[kind]}, got {value!r}")
        if isinstance(value, numbers.Integral):  # most likely a patch-size schedule meant for els/bbels
            raise TypeError(f"{name}: the scale is a window width ℓ (a float, e.g. {float(value)}), not a patch "
                            f"size; got the int {value!r}")
        ell = float(value)
        if not (math.isfinite(ell) and ell > 0):
            raise ValueError(f"{name}: the window width ℓ must be finite and positive, got {value!r}")
        return ell
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected {_DESCRIBE[kind]}, got {value!r}")
    if int(value) <= 0:
        raise ValueError(f"{name}: expected {_DESCRIBE[kind]}, got {int(value)}")
    return int(value)


def scale_for(denoiser: Denoiser, scale: Any) -> Any:
    """``scale`` if ``denoiser`` takes one, else ``None``: how a comparison hands one scale (or one
    per-step schedule) to several denoisers, some without a scale (which refuse any).

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
        >>> scale_for(ej.machines.els(imgs), (5, 3)), scale_for(ej.machines.ideal(imgs), (5, 3))
        ((5, 3), None)
    """
    return scale if denoiser.needs_scale else None


class Denoiser(abc.ABC):
    """Interface: something that returns ``x̂0 = E[x0 | x_t]`` under a noise schedule.

    Subclasses set ``schedule``, :attr:`scale_kind` and implement :attr:`image_shape` and
    :meth:`_denoise`; they may refine :meth:`check_scale` (e.g. a patch no larger than the image),
    :meth:`check_label` (with :meth:`_label_ok`, its device-side half for traced labels) and
    :meth:`prepare`. They must be pytrees so that they can be passed to
    ``jax.jit`` (the machines and :class:`~ellsjax.models.NetworkDenoiser` are registered dataclasses).
    """

    schedule: _schedules.Schedule
    #: What the per-step ``scale`` is (:data:`ScaleKind`).
    scale_kind: ClassVar[ScaleKind] = "none"
    #: ``x̂0`` is defined only where ``ᾱ(t)`` exceeds this (a network divides by ``a``; the machines'
    #: softmax is defined everywhere, hence ``-1``). Samplers check their grids against it.
    min_signal_var: ClassVar[float] = -1.0
    #: Whether it reports which training patch each output pixel comes from
    #: (:func:`ellsjax.explain.provenance`; softmax machines over training patches).
    supports_provenance: ClassVar[bool] = False

    @property
    def needs_scale(self) -> bool:
        """Whether a ``scale`` is required (every :attr:`scale_kind` but ``"none"``)."""
        return self.scale_kind != "none"

    @property
    @abc.abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images it denoises."""

    @property
    def conditional(self) -> bool:
        """Whether it takes class labels."""
        return False

    # -- to implement -------------------------------------------------------------------------------
    @abc.abstractmethod
    def _denoise(
        self, x_t: Float[Array, "b h w c"], t: Float[Array, " b"], label: Int[Array, " b"] | None, scale: Any
    ) -> Float[Array, "b h w c"]:
        """Pure, unchecked ``x̂0`` (``t`` ``[B]``, ``label`` ``[B]`` or ``None``, ``scale`` static)."""

    def check_scale(self, scale: Any) -> Any:
        """Validate a locality scale for this denoiser; return it normalised (``None`` if it has none).

        The default checks the value against :attr:`scale_kind` (:func:`check_scale_value`); a
        denoiser without a scale accepts ``None`` only."""
        return check_scale_value(self.scale_kind, scale)

    def prepare(self, scales: Any = (None,), *, conditional: bool = False) -> Denoiser:
        """Return a denoiser ready to run at these scales (e.g. with prebuilt banks); same results.

        The default has nothing to prepare and returns ``self``.
        """
        return self

    def check_label(self, label: Array | None) -> None:
        """Validate concrete labels (the default accepts only ``None``)."""
        if label is not None:
            raise ValueError("label: this denoiser is unconditional; pass label=None")

    def _label_ok(self, label: Int[Array, " b"]) -> Bool[Array, " b"] | None:
        """The device-side half of :meth:`check_label` for traced labels: ``[B]`` bools, true where a
        label is valid. Where any is false, :meth:`check_label` runs on the host on the concrete
        labels and raises its eager error.

        The default returns ``None``: no device-side test, so :meth:`check_label` runs on the host at
        every call (correct, one host round trip per call); conditional denoisers override it (e.g.
        :func:`ellsjax._checks.labels_present` for classes with training images)."""
        return None

    def checked_label(self, label: Int[Array, " b"] | None) -> Int[Array, " b"] | None:
        """``label`` (``None`` or ``[B]`` int32, from :func:`ellsjax._checks.as_labels`) validated by
        :meth:`check_label`: now when concrete, when the program runs when traced."""
        if label is None or _checks.is_concrete(label) or not self.conditional:
            self.check_label(label)  # an unconditional denoiser refuses any label: no value needed
            return label
        ok = self._label_ok(label)
        bad = jnp.ones(label.shape, bool) if ok is None else ~ok
        return _checks.runtime_check(label, bad, self.check_label, label)

    # -- public, checked --------------------------------------------------------------------------
    def check_inputs(self, x_t: Any, t: Any, *, scale: Any = None, label: Any = None):
        """Check and normalise the arguments of :meth:`denoise`; returns ``(x_t, t, label, scale)``.

        Concrete values are checked now; traced ones (inside a user's ``jax.jit``) when the program
        runs, with the same errors (:func:`ellsjax._checks.runtime_check`)."""
        x_t = _checks.as_image_batch(x_t, "x_t", shape=self.image_shape)
        t = _checks.as_times(t, x_t.shape[0])
        label = self.checked_label(_checks.as_labels(label, x_t.shape[0]))
        return x_t, t, label, self.check_scale(scale)

    def denoise(self, x_t: Any, t: Any, *, scale: Any = None, label: Any = None) -> Float[Array, "b h w c"]:
        """Posterior mean ``x̂0 = E[x0 | x_t]``.

        Args:
            x_t: ``[B, H, W, C]`` float noisy images.
            t: a time in ``[0, 1]`` or one per image (``[B]``).
            scale: the locality scale (see :attr:`scale_kind`).
            label: ``None``, a class id, or one per image (``[B]``), for conditional denoising.
        """
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        return _jit_denoise(self._ready(scale, label), x_t, t, label, *self._split_scale(scale))

    def score(self, x_t: Any, t: Any, *, scale: Any = None, label: Any = None) -> Float[Array, "b h w c"]:
        """Score ``∇ log p_t(x_t) = (a·x̂0 − x_t)/s²``. Undefined at ``s(t) = 0`` (raises)."""
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        t = self._check_noisy(t, "score")
        return _jit_score(self._ready(scale, label), x_t, t, label, *self._split_scale(scale))

    def eps(self, x_t: Any, t: Any, *, scale: Any = None, label: Any = None) -> Float[Array, "b h w c"]:
        """Noise prediction ``ε̂ = (x_t − a·x̂0)/s``. Undefined at ``s(t) = 0`` (raises)."""
        x_t, t, label, scale = self.check_inputs(x_t, t, scale=scale, label=label)
        t = self._check_noisy(t, "eps")
        return _jit_eps(self._ready(scale, label), x_t, t, label, *self._split_scale(scale))

    def _ready(self, scale: Any, label: Any) -> Denoiser:
        """What one checked call runs: ``self`` (the default; machines may prepare what the call needs)."""
        return self

    def _split_scale(self, scale: Any) -> tuple[Any, Any]:
        """``(static, traced)`` parts of a checked scale for the compiled call: by default the whole
        scale is static (one program per patch size); a width machine keeps only its window side
        static and passes ``ℓ`` as an array (one program per side, differentiable in ``ℓ``).
        ``_denoise`` receives ``static`` where ``traced`` is ``None``, else the pair."""
        return scale, None

    def _check_noisy(self, t: Array, what: str) -> Array:
        """``t``, checked for a positive noise level (now, or when the program runs if traced)."""
        msg = (f"t: the {what} diverges where the noise level s(t) is 0 (t = 0 for this schedule); "
               "use denoise() there, which returns the nearest-neighbour limit")
        noiseless = self.schedule.variances(t)[1] <= 0
        if not _checks.is_concrete(t):
            return _checks.runtime_check(t, noiseless, _checks.fail(msg))
        if bool(jnp.any(noiseless)):
            raise ValueError(msg)
        return t

    def _score(self, x_t, t, label, scale):
        a, var = _ab(self.schedule, t)
        x0 = self._denoise(x_t, t, label, scale)
        return (a * x0 - x_t) / var

    def _eps(self, x_t, t, label, scale):
        a, var = _ab(self.schedule, t)
        x0 = self._denoise(x_t, t, label, scale)
        return (x_t - a * x0) / jnp.sqrt(var)


def _ab(schedule, t):
    ab, var = schedule.variances(t)
    return jnp.sqrt(ab)[:, None, None, None], var[:, None, None, None]


def _join(static, traced):
    return static if traced is None else (static, traced)


@partial(jax.jit, static_argnums=(4,))
def _jit_denoise(d, x_t, t, label, static, traced):
    return d._denoise(x_t, t, label, _join(static, traced))


@partial(jax.jit, static_argnums=(4,))
def _jit_score(d, x_t, t, label, static, traced):
    return d._score(x_t, t, label, _join(static, traced))


@partial(jax.jit, static_argnums=(4,))
def _jit_eps(d, x_t, t, label, static, traced):
    return d._eps(x_t, t, label, _join(static, traced))
