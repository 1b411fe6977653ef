"""Analytic denoisers ("machines"): the ideal score, the local score and the equivariant local score,
and the other closed-form denoisers of this literature (PSPC, Wiener, PCA locality, GoldDiff, σ-CFDM).

Every machine is a frozen pytree holding its training set; ``denoise``, ``score`` and ``eps`` take a
noisy batch ``x_t`` ``[B, H, W, C]``, a time ``t`` and (for the local machines) a ``scale``. Bank
machines (:class:`BankMachine`: IS, LS, ELS, bbELS) also take a search strategy and a placement
(:mod:`ellsjax.machines.search`: :class:`Exact`, :class:`TopK`, :class:`Pruned`, :class:`Sharded`). Each
machine module registers a :class:`MachineSpec` (:func:`register`); the command line, calibration,
evaluation and the reproduction presets read their choices from the registry (:func:`spec`,
:func:`specs`, :func:`names`).

Example:
    >>> import jax, ellsjax as ej
    >>> imgs = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), minval=-1, maxval=1)
    >>> m = ej.machines.els(imgs, padding="circular")
    >>> m.score(imgs[:1], 0.5, scale=3).shape
    (1, 8, 8, 1)
"""

# ruff: noqa: I001  (the machine modules are imported in listing order: each registers its specs)
from collections.abc import Iterator, Mapping

from ellsjax.denoiser import Denoiser
from ellsjax.machines import search
from ellsjax.machines._policy import ExecutionPolicy, bank_budget_for, memory_budget_for, memory_budgets
from ellsjax.machines._registry import MachineSpec, for_network, names, register, spec, specs, unregister, variant
from ellsjax.machines.base import BankMachine, Machine
from ellsjax.machines.search import (
    CertifiedSubset,
    Exact,
    Pruned,
    Sharded,
    Single,
    TopK,
)

from ellsjax.machines.ideal import IdealScore, ideal
from ellsjax.machines.patch import EquivariantLocalScore, LocalScore, bbels, els, local
from ellsjax.machines.pspc import PSPC_CIFAR10_SCALES, PatchSetPosteriorComposite, pspc
from ellsjax.machines.wiener import Wiener, wiener
from ellsjax.machines.pca import PCALocality, pca
from ellsjax.machines.pca import neighbourhoods as pca_neighbourhoods
from ellsjax.machines.golddiff import GoldDiff, golddiff
from ellsjax.machines.cfdm import SmoothedClosedForm, cfdm, cfdm_time, from_cfdm_time
from ellsjax.machines.soft import SoftEquivariantLocalScore, soft_bbels, soft_els
from ellsjax.machines.mixture import LocalGlobalMixture, mixture


def _discover() -> None:
    """Import every other public module of this package, so that a new machine module registers its
    spec without being listed here (its builder is then ``ellsjax.machines.spec(name).builder``)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in ("base", "search"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()


class _Builders(Mapping):
    """``name → builder`` of every registered machine (a live view of the registry)."""

    def __getitem__(self, name: str):
        try:
            return spec(name).builder
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __len__(self) -> int:
        return len(names())


#: Machines by name: ``name → builder(images, labels=None, **options)``, a view of the registry
#: (register new machines with :func:`register`).
MACHINES: Mapping = _Builders()


def build(name: str, images, labels=None, **options) -> Machine:
    """Build a machine by its registry name (see :func:`names`), passing ``options`` through.

    Example:
        >>> import jax, ellsjax as ej
        >>> imgs = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
        >>> type(ej.machines.build("bbels", imgs)).__name__
        'EquivariantLocalScore'
    """
    return spec(name).build(images, labels, **options)


__all__ = [
    "Denoiser",
    "Machine",
    "BankMachine",
    "ExecutionPolicy",
    "search",
    "Exact",
    "TopK",
    "Pruned",
    "CertifiedSubset",
    "Single",
    "Sharded",
    "MachineSpec",
    "register",
    "unregister",
    "spec",
    "specs",
    "names",
    "for_network",
    "variant",
    "IdealScore",
    "LocalScore",
    "EquivariantLocalScore",
    "ideal",
    "local",
    "els",
    "bbels",
    "PatchSetPosteriorComposite",
    "Wiener",
    "PCALocality",
    "GoldDiff",
    "golddiff",
    "SmoothedClosedForm",
    "pspc",
    "wiener",
    "pca",
    "cfdm",
    "cfdm_time",
    "from_cfdm_time",
    "pca_neighbourhoods",
    "PSPC_CIFAR10_SCALES",
    "MACHINES",
    "build",
    "SoftEquivariantLocalScore",
    "soft_els",
    "soft_bbels",
    "LocalGlobalMixture",
    "mixture",
    "memory_budget_for",
    "bank_budget_for",
    "memory_budgets",
]
