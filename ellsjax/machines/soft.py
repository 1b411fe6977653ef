r"""Soft-window ELS machines: a continuous locality scale ``ℓ`` instead of a hard patch size.

The ELS/bbELS machines compare a query window with bank patches through the squared distance over a
``k×k`` window. The soft-window machines weight each offset ``δ`` of a ``K×K`` window (``K`` the
maximum *support*, odd) by a Gaussian

.. math::

    w_\ell(\delta) = \exp\!\big(-\|\delta\|^2 / 2\ell^2\big), \qquad
    \hat x_0(p) = \sum_j \mathrm{softmax}_j\Big(-\frac{\sum_\delta w_\ell(\delta)\,(x_t[p+\delta] - a\,\phi_j(\delta))^2}{2 s^2}\Big)\, \phi_j(0).

Since ``Σ_δ w_δ (q_δ − a k_δ)² = ‖√w⊙q − a·√w⊙k‖²``, this *is* the ELS (``padding="circular"``) or
bbELS (``padding="zeros"``) machine at patch size ``K`` with queries and keys multiplied by ``√w``
per offset; the value is still the center pixel. So ``x̂0`` is a smooth function of ``ℓ`` and can be
differentiated through the streaming kernel (see :func:`ellsjax.calibration.differentiable_calibrate`).

Implementation: the stored bank is the hard machine's unweighted bank at side ``K``, shared by every
``ℓ``. The whole window rides on the bank side: each streamed chunk becomes keys ``w⊙k`` with the
"norm" ``Σ_δ w_δ k_δ²`` (:func:`_weight_bank`), and the kernel's raw score
``2a q·(w⊙k) − a² Σ w k²`` is the weighted distance up to the query's own ``Σ w q²``, which cancels in
the softmax. So a change of ``ℓ`` rewrites no bank, the queries do not depend on ``ℓ``, and a
derivative in ``ℓ`` (forward mode) costs one more GEMM per chunk, ``q·(w'⊙k)``, plus elementwise
work on the chunk (splitting ``√w`` between queries and keys, as the formula above suggests, would
cost two).
As ``ℓ → ∞`` the machine becomes the hard ELS/bbELS machine at ``k = K``; small ``ℓ`` concentrates
the weight on the center pixel.

Design: a soft machine *wraps* a hard ELS/bbELS machine (:attr:`SoftEquivariantLocalScore.hard`, whose
prebuilt banks it uses) instead of subclassing it: its scale means a width, not a size. The per-call
``scale`` is ``ℓ`` (a positive float, or a traced scalar: ``jax.grad`` of ``denoise`` in ``ℓ`` works);
only the window side is static, so one program serves every ``ℓ`` of a side. The samplers and
``denoise``/``score``/``eps`` take ``scales=[ℓ_0, ℓ_1, …]``. The window is truncated where the weight is negligible: at a
given ``ℓ`` the machine works at the odd side ``K(ℓ) = min(support, 2⌈truncate·ℓ⌉ + 1)``
(:meth:`SoftEquivariantLocalScore.window_size`; ``truncate = 3``: dropped offsets weigh
``< e^{−4.5} ≈ 0.011``). This matters for ELS: its bank holds the ``K×K`` patches lying *inside* a
training image, so a needlessly large ``K`` would leave out the patch centers near the borders.
Each ``K`` has its own prebuilt bank. A traced ``ℓ`` whose value cannot be read (inside ``jax.jit``)
uses the whole support ``K`` (its truncation needs the value); under ``jax.grad`` alone the value is
read and the side is the same as for the float. :meth:`SoftEquivariantLocalScore.denoise_ell` (``ℓ``
traced, the side given) is what the differentiable calibration uses.

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.soft_els(imgs, support=5)
    >>> m.denoise(imgs[:2], 0.5, scale=1.5).shape
    (2, 8, 8, 1)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from ellsjax import _checks
from ellsjax import kernel as _kernel
from ellsjax import schedules as _schedules
from ellsjax.denoiser import Denoiser
from ellsjax.machines import _export, _registry
from ellsjax.machines.base import Machine, TrainingImages
from ellsjax.machines.patch import EquivariantLocalScore, els
from ellsjax.machines.search import BankMap

__all__ = ["SoftEquivariantLocalScore", "soft_els", "soft_bbels", "window_weights"]


def window_weights(
    ell: Float[ArrayLike, ""], support: int, window: str = "gaussian", edge: float = 0.15
) -> Float[Array, " kk"]:
    """The soft window over the ``support×support`` offsets ``δ``, row-major.

    ``window="gaussian"``: ``w_ℓ(δ) = exp(−‖δ‖²/2ℓ²)``. ``window="box"``: a square with logistic
    edges, ``w_ℓ(δ) = σ((ℓ + ½ − ‖δ‖_∞)/edge)`` — for integer ``ℓ`` and small ``edge`` nearly the hard
    ``(2ℓ+1)×(2ℓ+1)`` patch of the ELS machine, and smooth in ``ℓ`` in between.

    Example:
        >>> import numpy as np
        >>> w = window_weights(1.0, 3)
        >>> bool(np.isclose(float(w[4]), 1.0)), bool(np.isclose(float(w[0]), np.exp(-1.0)))
        (True, True)
    """
    r = jnp.arange(support, dtype=jnp.float32) - support // 2
    ell = jnp.asarray(ell, jnp.float32)
    if window == "box":
        cheb = jnp.maximum(jnp.abs(r)[:, None], jnp.abs(r)[None, :]).reshape(-1)
        return jax.nn.sigmoid((ell + 0.5 - cheb) / edge)
    d2 = (r[:, None] ** 2 + r[None, :] ** 2).reshape(-1)
    return jnp.exp(-d2 / (2.0 * ell * ell))


def _weight_bank(bank, w: Float[Array, " d"]):
    """A bank chunk with keys ``w⊙k`` and squared norms ``Σ_d w_d k_d²`` (the window on the bank side;
    see the module docstring); padding unchanged.

    Applied chunk by chunk inside the streaming pass: the stored bank stays the unweighted one,
    shared by every ``ℓ``, and a derivative in ``ℓ`` costs one more GEMM per chunk, never a pass
    over the whole bank."""
    if isinstance(bank, _kernel.Bank):
        keys = bank.keys * w
        return _kernel.Bank(keys, bank.values, bank.log_count, jnp.sum(keys * bank.keys, axis=-1))
    keys_t = bank.keys_t
    d = keys_t.shape[-2] - 1
    raw = keys_t[..., :d, :]
    k = raw * w[:, None]
    pad = keys_t[..., d, :] >= 0.5 * _kernel.PAD_SQ_NORM
    sq = jnp.where(pad, _kernel.PAD_SQ_NORM, jnp.sum(k * raw, axis=-2))
    return type(bank)(jnp.concatenate([k, sq[..., None, :]], axis=-2), *bank[1:])


@dataclasses.dataclass(frozen=True, eq=False)
class SoftEquivariantLocalScore(Denoiser):
    """ELS/bbELS with a soft window of width ``ℓ`` (the ``scale``) over a ``K×K`` support (final).

    Build with :func:`soft_els` / :func:`soft_bbels`. ``scale`` is ``ℓ > 0`` in pixels (a float or a
    traced scalar). It wraps the hard machine whose banks it streams (``hard``): prepare, policy,
    training set and labels are the hard machine's.

    Attributes:
        hard: the ELS (``padding="circular"``) or bbELS (``"zeros"``) machine.
        support: the largest window side (odd; for ELS ``≤ min(H, W)``, for bbELS ``< min(H, W)``).
        truncate: the Gaussian window at ``ℓ`` reaches ``truncate·ℓ`` pixels from its center (see
            :meth:`window_size`).
        window: ``"gaussian"`` or ``"box"`` (see :func:`window_weights`).
        edge: the box window's edge width.
    """

    hard: EquivariantLocalScore
    support: int = 7
    truncate: float = 3.0
    window: str = "gaussian"
    edge: float = 0.15

    scale_kind: ClassVar[str] = "width"
    # the hard machine's provenance pass streams unweighted windows: not this machine's softmax
    supports_provenance: ClassVar[bool] = False

    def __post_init__(self):
        if isinstance(self.support, bool) or not isinstance(self.support, numbers.Integral) or self.support < 1 \
                or self.support % 2 == 0:
            raise ValueError(f"support: must be an odd positive int, got {self.support!r}")
        h, w, _ = self.image_shape
        if self.padding == "circular" and self.support > min(h, w):
            raise ValueError(f"support: {self.support} is larger than the {h}x{w} image; soft ELS needs K <= {min(h, w)}")
        if self.padding == "zeros" and self.support >= min(h, w):
            raise ValueError(f"support: soft bbELS needs K < min(H, W) = {min(h, w)} (an interior), got {self.support}")
        if not (isinstance(self.truncate, (int, float)) and math.isfinite(self.truncate) and self.truncate > 0):
            raise ValueError(f"truncate: must be a finite positive number, got {self.truncate!r}")
        if self.window not in ("gaussian", "box"):
            raise ValueError(f"window: must be 'gaussian' or 'box', got {self.window!r}")
        if not (isinstance(self.edge, (int, float)) and math.isfinite(self.edge) and self.edge > 0):
            raise ValueError(f"edge: must be a finite positive number, got {self.edge!r}")

    # -- the hard machine's, read through --------------------------------------------------------
    schedule = property(lambda self: self.hard.schedule, doc="The hard machine's noise schedule.")
    padding = property(lambda self: self.hard.padding, doc="``circular`` (soft ELS) or ``zeros`` (soft bbELS).")
    policy = property(lambda self: self.hard.policy, doc="The hard machine's execution policy.")
    images = property(lambda self: self.hard.images, doc="The ``[N, H, W, C]`` training images.")
    banks = property(lambda self: self.hard.banks, doc="The hard machine's prebuilt banks (keyed by side).")
    num_images = property(lambda self: self.hard.num_images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.hard.image_shape

    @property
    def conditional(self) -> bool:
        return self.hard.conditional

    def check_label(self, label) -> None:
        self.hard.check_label(label)

    def _ready(self, scale: Any, label: Any) -> SoftEquivariantLocalScore:
        Machine._ready(self.hard, scale, label)  # a shape-only machine cannot run
        return self

    def with_policy(self, **changes: Any) -> SoftEquivariantLocalScore:
        """This machine with some policy fields of its hard machine changed (same results)."""
        return dataclasses.replace(self, hard=self.hard.with_policy(**changes))

    def window_size(self, ell: float) -> int:
        """The odd window side used at ``ℓ``: Gaussian ``min(support, 2⌈truncate·ℓ⌉ + 1)``; box
        ``min(support, 2⌊ℓ + ½ + 5·edge⌋ + 1)`` (dropped offsets weigh ``< σ(−5) ≈ 0.007``)."""
        if self.window == "box":
            return int(min(self.support, 2 * math.floor(float(ell) + 0.5 + 5 * self.edge) + 1))
        return int(min(self.support, 2 * math.ceil(self.truncate * float(ell)) + 1))

    def check_scale(self, scale: Any) -> Any:
        """``ℓ``: a finite positive float (pixels; ints are refused as likely patch sizes), returned as
        a Python float; or a 0-d float array (traced or not), checked inside ``jax.jit``."""
        if isinstance(scale, jax.Array):  # tracers included
            if scale.ndim != 0 or not jnp.issubdtype(scale.dtype, jnp.floating):
                raise TypeError(f"scale: expected a window width ℓ (a float or a 0-d float array), got "
                                f"{scale.dtype}{list(scale.shape)}")
            value = _concrete(scale)
            if value is not None:
                return Denoiser.check_scale(self, value)
            # inside the caller's jax.jit: the same check, raised when the program runs
            return eqx.error_if(scale, ~(jnp.isfinite(scale) & (scale > 0)),
                                "scale: the window width ℓ must be finite and positive")
        return Denoiser.check_scale(self, scale)

    def _split_scale(self, scale):
        """(static window side, traced ``ℓ``): one program per side, ``ℓ`` an argument (see
        :meth:`ellsjax.denoiser.Denoiser._split_scale`)."""
        value = _concrete(scale)
        side = self.window_size(value) if value is not None else self.support
        return side, jnp.asarray(scale, jnp.float32)

    def prepare(self, scales: Any = (None,), *, conditional: bool = False, sides: Any = None) -> SoftEquivariantLocalScore:
        """Build the hard machine's banks of the window sides that the widths ``scales`` use (or of
        ``sides``)."""
        if sides is None:
            sides = {self.window_size(self.check_scale(s)) for s in scales if s is not None} or {self.support}
        return dataclasses.replace(self, hard=self.hard.prepare(tuple(sorted(sides)), conditional=conditional))

    def _denoise(self, x_t, t, label, scale):
        side, ell = scale if isinstance(scale, tuple) else self._split_scale(scale)
        return self.denoise_ell(x_t, t, label, ell, side=side)

    def denoise_ell(
        self, x_t: Float[ArrayLike, "b h w c"], t: Float[ArrayLike, "*b"], label: Int[Array, " b"] | None,
        ell: Float[ArrayLike, ""], *, side: int | None = None,
    ) -> Float[Array, "b h w c"]:
        """Pure ``x̂0`` at window width ``ell`` (a Python float or a traced scalar: differentiable).

        ``t`` is a float or one per image (``[B]``), ``label`` ``None`` or ``[B]``; ``side`` is the
        (static, odd) window side, default ``support``. A width that is not finite and positive
        raises where its value can be read (a float, or under ``jax.grad``); inside ``jax.jit`` this
        pure function is unchecked (it stays exportable: no host callback), as ``_denoise`` is.
        """
        x_t = jnp.asarray(x_t, jnp.float32)
        b, h, w, ch = x_t.shape
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        value = _concrete(ell)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"scale: the window width ℓ must be finite and positive, got {value!r}")
        ell = jnp.asarray(ell, jnp.float32)
        k = self.support if side is None else int(side)
        weights = jnp.repeat(window_weights(ell, k, self.window, self.edge), ch)  # [K·K·C], offset-major
        bank_map = BankMap(functools.partial(_weight_bank, w=weights), 0)
        return self.hard._denoise_bounded(x_t, t, label, k, bank_map=bank_map)[0]


def _concrete(x) -> float | None:
    """The value of a scalar (Python, numpy, jax array, or a tracer that carries one, as under
    ``jax.grad``), or ``None`` inside ``jax.jit``."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


def _register():
    jax.tree_util.register_dataclass(SoftEquivariantLocalScore, data_fields=["hard"],
                                     meta_fields=["support", "truncate", "window", "edge"])
    SoftEquivariantLocalScore.__repr__ = _export.short_repr
    _export.register_serialization(SoftEquivariantLocalScore, ["support", "truncate", "window", "edge"])


_register()


def soft_els(
    images: TrainingImages,
    labels: Int[ArrayLike, " n"] | None = None,
    padding: _checks.Padding = "circular",
    *,
    support: int = 7,
    truncate: float = 3.0,
    window: str = "gaussian",
    edge: float = 0.15,
    schedule: _schedules.Schedule | str = "cosine_legacy",
    image_range: tuple[float, float] | None = (-1.0, 1.0),
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    bank_budget: int | None = None,
    platform: str | None = None,
) -> SoftEquivariantLocalScore:
    """Soft-window ELS (``padding="circular"``) or bbELS (``"zeros"``) with support ``K = support``.

    ``x̂0(p) = Σ_j softmax_j(−‖√w_ℓ⊙(x_t[Ω_p] − a·P_j)‖²/2s²)·P_j^center`` over the ``K×K`` patches
    ``P_j`` of the ELS (bbELS) bank, ``w_ℓ(δ) = exp(−‖δ‖²/2ℓ²)``; ``scale`` is ``ℓ``.

    Args:
        images: ``[N, H, W, C]`` training images in ``[-1, 1]``.
        labels: optional ``[N]`` class ids for conditional denoising.
        padding: ``"circular"`` (soft ELS) or ``"zeros"`` (soft bbELS).
        support: the largest (odd) window side ``K``.
        truncate: the Gaussian window at ``ℓ`` has side ``min(K, 2⌈truncate·ℓ⌉ + 1)``.
        window: ``"gaussian"`` (``w = exp(−‖δ‖²/2ℓ²)``) or ``"box"`` (a square of half-side ``ℓ``
            with logistic edges of width ``edge``; see :func:`window_weights`).
        edge: the box window's edge width.
        schedule: noise schedule (object or name).
        image_range: the documented pixel range the training images are checked against
            (``None``: any real data, e.g. samples of a Gaussian).
        chunk_size: training images per streamed chunk (``None``: from ``memory_budget``).
        memory_budget: bytes of temporaries per chunk.
        bank_budget: bytes the prebuilt bank of the support may take.
        platform: whose budgets apply (``None``: the images' devices').

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
        >>> soft, hard = ej.machines.soft_els(imgs, support=3), ej.machines.els(imgs)
        >>> x = imgs[:1] * 0.5
        >>> float(abs(soft.denoise(x, 0.5, scale=1e4) - hard.denoise(x, 0.5, scale=3)).max()) < 1e-5
        True
    """
    hard = els(images, labels, padding, schedule=schedule, image_range=image_range, chunk_size=chunk_size,
               memory_budget=memory_budget, bank_budget=bank_budget, platform=platform)
    return SoftEquivariantLocalScore(hard, support=support, truncate=float(truncate), window=window, edge=float(edge))


def soft_bbels(images, labels=None, **kwargs) -> SoftEquivariantLocalScore:
    """Soft-window boundary-broken ELS: ``soft_els(images, labels, padding="zeros", ...)``."""
    return soft_els(images, labels, padding="zeros", **kwargs)


_registry.register(_registry.MachineSpec(
    name="soft-els", builder=soft_els, machine=SoftEquivariantLocalScore, padding="circular", family="soft-els",
    calibration="differentiable",
    summary="soft-window ELS: a continuous window width ℓ (Gaussian or soft box), differentiable in ℓ",
))
_registry.register(_registry.MachineSpec(
    name="soft-bbels", builder=soft_bbels, machine=SoftEquivariantLocalScore, padding="zeros", family="soft-els",
    calibration="differentiable",
    summary="soft-window bbELS: zero padding, a continuous window width ℓ, differentiable in ℓ",
))
