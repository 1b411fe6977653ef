"""The machine registry: one :class:`MachineSpec` per machine, declared by the machine's own module.

Everything outside :mod:`ellsjax.machines` that needs to know about machines — the command line's
choices and checks, the default scale schedules, which machines can be calibrated and how, which one
explains a network of a given padding — asks the registry instead of comparing names. Adding a
machine is therefore its module (a builder and a spec, :func:`register`) plus its tests.

Example:
    >>> import ellsjax as ej
    >>> spec = ej.machines.spec("bbels")
    >>> spec.scale_kind, spec.padding, spec.calibration, spec.family
    ('size', 'zeros', 'grid', 'els')
    >>> ej.machines.for_network("circular").name
    'els'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from ellsjax import _checks
from ellsjax.denoiser import SCALE_KINDS, Denoiser, ScaleKind

__all__ = ["MachineSpec", "register", "unregister", "spec", "specs", "names", "for_network", "variant"]


@dataclasses.dataclass(frozen=True)
class MachineSpec:
    """What the rest of the library needs to know about a machine.

    Attributes:
        name: the registry name (``ellsjax sample --machine NAME``).
        builder: ``builder(images, labels=None, **options) -> Machine``.
        machine: the class its builder returns; what its per-step scale is (:attr:`scale_kind`) and
            whether it reports provenance (:attr:`provenance`) are read from it, never restated.
        summary: one line for listings and help.
        padding: its boundary rule (:data:`ellsjax._checks.Padding`), ``None`` where it has none.
        family: machines that differ only in ``padding`` share a family (``els``: ELS and bbELS),
            so ``--padding`` can switch between them; ``None``: a family of its own.
        calibration: how its scale is calibrated against a network: ``"grid"`` (integer
            candidates), ``"differentiable"`` (gradient descent on a width ``ℓ``) or ``None``.
        explains: the network padding this machine is the analytic model of (the paper's pairing:
            ELS for circular, bbELS for zero-padded networks), or ``None``.
        soft_twin: the registry name of its differentiable (soft-window) twin, if any.
        default_scales: ``(dataset, image_shape, schedule) -> ScaleSchedule``: the published scale
            schedule to use when none is given, for a dataset, an image shape and a noise schedule;
            raises ``ValueError`` (with the reason) where none is published. ``None``: no default.
        reference: where the method comes from (paper, release).
    """

    name: str
    builder: Callable[..., Any]
    machine: type
    summary: str
    padding: str | None = None
    family: str | None = None
    calibration: Literal["grid", "differentiable"] | None = None
    explains: str | None = None
    soft_twin: str | None = None
    default_scales: Callable[[str, tuple[int, int, int], Any], Any] | None = None
    reference: str = ""

    @property
    def scale_kind(self) -> ScaleKind:
        """What its per-step ``scale`` is (:data:`ellsjax.denoiser.ScaleKind`): the class's."""
        return self.machine.scale_kind

    @property
    def provenance(self) -> bool:
        """Whether :func:`ellsjax.explain.provenance` can replay it: the class's ``supports_provenance``."""
        return bool(getattr(self.machine, "supports_provenance", False))

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or "," in self.name or self.name.strip() != self.name:
            raise ValueError(f"name: expected a non-empty name without commas or spaces, got {self.name!r}")
        if not callable(self.builder):
            raise TypeError(f"builder: expected a callable, got {self.builder!r}")
        if not (isinstance(self.machine, type) and issubclass(self.machine, Denoiser)):
            raise TypeError(f"machine: expected the Denoiser class its builder returns, got {self.machine!r}")
        if self.scale_kind not in SCALE_KINDS:
            raise ValueError(f"scale_kind: must be one of {', '.join(SCALE_KINDS)}, got {self.scale_kind!r}")
        if self.padding is not None:
            _checks.check_padding(self.padding)
        if self.explains is not None:
            _checks.check_padding(self.explains, "explains")
        if self.calibration not in (None, "grid", "differentiable"):
            raise ValueError(f"calibration: must be 'grid', 'differentiable' or None, got {self.calibration!r}")
        if self.calibration == "grid" and self.scale_kind not in ("size", "side"):
            raise ValueError("calibration: grid calibration needs integer scales (scale_kind 'size' or 'side')")
        if self.calibration == "differentiable" and self.scale_kind != "width":
            raise ValueError("calibration: differentiable calibration needs a width scale (scale_kind 'width')")

    def build(self, images: Any, labels: Any = None, **options: Any) -> Any:
        """``builder(images, labels, **options)``."""
        return self.builder(images, labels, **options)

    def scales_for(self, dataset: str, image_shape: tuple[int, int, int], schedule: Any) -> Any:
        """The default :class:`~ellsjax.scales.ScaleSchedule` for a dataset, image shape and noise
        schedule (``None`` for a machine without a scale); ``ValueError`` (saying why) where none is
        published."""
        if self.scale_kind == "none":
            return None
        if self.default_scales is None:
            if self.scale_kind == "width":
                raise ValueError(f"machine {self.name!r} needs a soft-window schedule of widths ℓ (a JSON with 'ells' "
                                 "from the differentiable calibration) or widths ℓ (--scales)")
            raise ValueError(f"machine {self.name!r} has no published scale schedule; pass one (--scales)")
        return self.default_scales(dataset, tuple(image_shape), schedule)


_REGISTRY: dict[str, MachineSpec] = {}


def register(s: MachineSpec, *, replace: bool = False) -> MachineSpec:
    """Add a machine to the registry (``replace`` an existing name explicitly); returns the spec."""
    if not isinstance(s, MachineSpec):
        raise TypeError(f"s: expected a MachineSpec, got {type(s).__name__}")
    if s.name in _REGISTRY and not replace and _REGISTRY[s.name] != s:
        raise ValueError(f"name: a machine named {s.name!r} is registered already (pass replace=True)")
    _REGISTRY[s.name] = s
    return s


def unregister(name: str) -> None:
    """Remove a machine from the registry (e.g. a test's toy machine)."""
    _REGISTRY.pop(name, None)


def spec(name: str) -> MachineSpec:
    """The spec of a registered machine; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"name: unknown machine {name!r}; known: {', '.join(names())}") from None


def specs() -> tuple[MachineSpec, ...]:
    """Every registered spec, in registration order."""
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_REGISTRY)


def for_network(padding: str) -> MachineSpec:
    """The machine that explains a network of this padding (:attr:`MachineSpec.explains`)."""
    _checks.check_padding(padding)
    found = [s for s in _REGISTRY.values() if s.explains == padding]
    if len(found) != 1:
        raise ValueError(f"padding: {len(found)} registered machines explain {padding!r} networks "
                         f"({[s.name for s in found]}); expected exactly one")
    return found[0]


def variant(name: str, padding: str | None) -> MachineSpec:
    """``name``'s machine with another ``padding`` (its family member), or itself for ``None``."""
    s = spec(name)
    if padding is None or padding == s.padding:
        return s
    _checks.check_padding(padding)
    twins = [o for o in _REGISTRY.values() if s.family is not None and o.family == s.family and o.padding == padding]
    if not twins:
        raise ValueError(f"padding: machine {name!r} has no {padding} padding variant")
    return twins[0]
